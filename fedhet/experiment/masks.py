"""Do learned sparse masks follow the clients' data? (DisPFL's mask analysis.)

From a finished run with personalized masks in its client store, :func:`mask_analysis` computes, for
every pair of clients, the normalised Hamming distance between their masks (over the positions of
the tensors some client keeps sparse) and the cosine similarity
of their training label distributions, draws the two as heatmaps side by side (clients ordered by
their most frequent label, so that clients with similar data sit together) and reports how the two
relate across pairs (Pearson and Spearman correlation of the off-diagonal entries: negative means
clients with similar labels learned similar masks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhet.data.tasks import pearson, spearman
from fedhet.experiment.checkpoint import load_checkpoint
from fedhet.experiment.config import load_config

#: store keys that hold a client's learned mask, in order of preference
MASK_KEYS = ("dispfl.shared_mask", "dispfl.mask")


def hamming_matrix(masks: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """``D[i, j]``: share of positions where the masks of clients ``i`` and ``j`` differ."""
    flat = torch.stack([torch.cat([m[n].reshape(-1) for n in sorted(m)]) for m in masks]).to(torch.float32)
    # |a − b| summed = a·1 + b·1 − 2 a·b for 0/1 vectors
    ones = flat.sum(dim=1)
    inter = flat @ flat.T
    return ((ones[:, None] + ones[None, :] - 2 * inter) / flat.shape[1]).double().numpy()


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``C[i, j]``: cosine similarity of rows ``i`` and ``j`` (0 for an all-zero row)."""
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    return unit @ unit.T


def client_masks(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every client's learned mask from the run's last checkpoint (memory or disk store)."""
    from fedhet.simulation.store import make_store

    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"{run_dir}: no checkpoint to read client masks from")
    cfg = load_config(Path(run_dir) / "config.yaml")
    store = make_store(cfg.runtime.store, Path(run_dir))
    store.restore(ckpt["store"])
    out = {}
    for cid in store.clients():
        state = store.get(cid)
        key = next((k for k in MASK_KEYS if k in state), None)
        if key is not None:
            out[cid] = state[key]
    if not out:
        raise ValueError(f"{run_dir}: no client holds a mask ({', '.join(MASK_KEYS)}); allowed: a run of a mask-based algorithm (dispfl)")
    return out


def mask_analysis(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Hamming distances of the learned masks beside label-distribution cosines; writes
    ``masks.png`` and ``masks.json`` to ``out_dir`` (default: the run folder) and returns the summary."""
    from fedhet.experiment.build import load_federated

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = client_masks(run_dir)
    fed = load_federated(load_config(run_dir / "config.yaml"))
    ids = sorted(masks)
    labels = np.array([fed.label_counts(c) for c in ids], dtype=np.float64)
    # order clients by their most frequent label (then by its share) so similar clients sit together
    share = labels / np.maximum(labels.sum(axis=1, keepdims=True), 1)
    order = sorted(range(len(ids)), key=lambda i: (int(share[i].argmax()), -float(share[i].max())))
    ids = [ids[i] for i in order]
    labels = labels[order]
    # tensors every client keeps whole (ERK makes small ones dense) are the same everywhere: left out
    sparse = sorted(n for n in masks[ids[0]] if any(not bool(masks[c][n].all()) for c in ids))
    if not sparse:
        raise ValueError(f"{run_dir}: every client's mask is dense; there is nothing to compare")
    ham = hamming_matrix([{n: masks[c][n] for n in sparse} for c in ids])
    cos = cosine_matrix(labels)
    iu = np.triu_indices(len(ids), k=1)
    summary = {
        "clients": ids,
        "tensors": sparse,
        "hamming": ham.round(5).tolist(),
        "label_cosine": cos.round(5).tolist(),
        "pearson": pearson(ham[iu], cos[iu]) if len(iu[0]) > 1 else float("nan"),
        "spearman": spearman(ham[iu], cos[iu]) if len(iu[0]) > 1 else float("nan"),
        "mean_hamming": float(ham[iu].mean()) if len(iu[0]) else float("nan"),
    }
    (out_dir / "masks.json").write_text(json.dumps(summary, indent=1))
    _plot(ham, cos, ids, out_dir / "masks.png", summary)
    return summary


def _plot(ham: np.ndarray, cos: np.ndarray, ids: list[int], path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    # the diagonal (0 distance, cosine 1) is left blank so the colours span the pairs' range
    off = ~np.eye(len(ids), dtype=bool)
    for ax, mat, title, cmap in (
        (axes[0], ham, "mask Hamming distance", "viridis"),
        (axes[1], cos, "label-distribution cosine similarity", "magma"),
    ):
        shown = np.where(off, mat, np.nan)
        im = ax.imshow(shown, cmap=cmap, vmin=float(mat[off].min()), vmax=float(mat[off].max()))
        ax.set_title(title)
        ticks = range(len(ids))
        ax.set_xticks(list(ticks), [str(c) for c in ids], fontsize=6, rotation=90)
        ax.set_yticks(list(ticks), [str(c) for c in ids], fontsize=6)
        ax.set_xlabel("client")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"pairs: Pearson {summary['pearson']:.2f}, Spearman {summary['spearman']:.2f} (Hamming vs label cosine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
