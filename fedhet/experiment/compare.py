"""Comparisons: one base config and named variants (overrides of it), run one after another, then
summarised as a table, an accuracy-against-round plot and a Markdown report."""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhet.experiment.config import ConfigError, ExperimentConfig, apply_overrides, dump_config, read_yaml, validate

_ALLOWED = {"base": "a run config's sections", "variants": "variant name -> overrides of base"}


@dataclass(frozen=True)
class Comparison:
    name: str
    variants: dict[str, ExperimentConfig]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_comparison(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None) -> Comparison:
    """Read and validate a comparison; ``only``: the variants to keep (validated alone)."""
    p = Path(path)
    data = read_yaml(p) or {}
    if not isinstance(data, dict) or "variants" not in data:
        raise ConfigError(f"{p}: a comparison needs 'base' and 'variants' sections")
    for key in ("base", "variants"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{key}: got {data[key]!r}, allowed: a mapping ({_ALLOWED[key]})")
    unknown = set(data) - {"name", "base", "variants"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key in a comparison; allowed: name, base, variants")
    base = apply_overrides(copy.deepcopy(data.get("base") or {}), overrides or [])
    variants = {}
    declared = data["variants"] or {}
    if only:
        unknown = [n for n in only if n not in declared]
        if unknown:
            raise ConfigError(f"--only: unknown variant {unknown[0]!r}; allowed: {', '.join(map(str, declared))}")
        declared = {n: declared[n] for n in only}
    for vname, over in declared.items():
        if over is not None and not isinstance(over, dict):
            raise ConfigError(f"variants.{vname}: got {over!r}, allowed: a mapping of overrides of base, such as {{algorithm: {{name: fedprox}}}}")
        try:
            variants[str(vname)] = validate(_merge(base, over or {}))
        except ConfigError as err:
            raise ConfigError(f"variants.{vname}: {err}") from None
    if not variants:
        raise ConfigError("variants: empty; allowed: a mapping of name -> overrides of base")
    folders: dict[str, str] = {}
    for vname in variants:
        other = folders.setdefault(run_dir_name(vname), vname)
        if other != vname:
            raise ConfigError(
                f"variants {other!r} and {vname!r} would share the run folder {run_dir_name(vname)!r}; allowed: names "
                "that differ in their letters, digits or . _ + -"
            )
    return Comparison(str(data.get("name", p.stem)), variants)


def run_dir_name(variant: str) -> str:
    """A variant's run folder, shell-friendly: every run of characters other than letters, digits and
    ``. _ + -`` becomes one ``_`` ("InclusiveFL w/o MD" -> "InclusiveFL_w_o_MD", "FjORD (KD)" ->
    "FjORD_KD"), so every variant is one folder directly under the comparison's."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", variant).strip("_.")
    return name or "variant"


def headline_metric(row: dict[str, Any]) -> tuple[str, float | None]:
    """The score a row reports: the task's headline metric (the row's ``metric``, accuracy when
    absent) of the first global target the algorithm lists (its ``eval_targets`` order), else the
    clients' mean (personalized runs)."""
    metric = row.get("metric") or "accuracy"
    for k in row:
        if k.startswith("eval/") and k.endswith(f"/{metric}") and row[k] is not None:
            return k, row[k]
    return f"clients/{metric}_mean", row.get(f"clients/{metric}_mean")


def summarize(name: str, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One table row for a run. ``final_accuracy`` / ``best_accuracy`` hold the task's headline
    metric (``metric_name``: accuracy, f1, pearson); ``final_metrics`` every metric of the headline
    target in the last evaluation (F1 per entity type, Spearman, ...)."""
    last = history[-1]
    metric = next((r["metric"] for r in reversed(history) if r.get("metric")), "accuracy")
    last = {"metric": metric, **last}
    evals = [r for r in history if any(k.startswith(("eval/", "clients/")) for k in r)]
    key, final = headline_metric(last)
    best = max((r.get(key) for r in evals if r.get(key) is not None), default=None)
    target = key[: -len(metric)] if key.startswith("eval/") else None
    return {
        "variant": name,
        "metric": key,
        "metric_name": metric,
        "final_accuracy": final,
        "best_accuracy": best,
        "final_metrics": {
            k[len(target) :]: v
            for k, v in last.items()
            if target and k.startswith(target) and k[len(target) :] not in ("width", "loss") and v is not None
        },
        "client_accuracy_mean": last.get(f"clients/{metric}_mean"),
        "client_accuracy_p10": last.get(f"clients/{metric}_p10"),
        "bytes_total": sum((r.get("bytes_up") or 0) + (r.get("bytes_down") or 0) for r in history),
        "train_flops": sum(r.get("train_flops") or 0 for r in history),
        "failures": sum(r.get("failures") or 0 for r in history),
        # on the simulated clock (device profiles): the run's simulated seconds and its stragglers
        "sim_time": last.get("sim_time"),
        "stragglers": sum(r.get("stragglers") or 0 for r in history) if "sim_time" in last else None,
        "rounds": last["round"],
        "seconds": seconds,
        "width_accuracy": width_accuracy(last),
        "model_metrics": model_metrics(last),
    }


def model_metrics(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every metric of every model a metrics row evaluated: each global target (``eval/<t>/<m>``,
    in the algorithm's order) and each tier's client mean (``clients/tier_<t>/<m>_mean``, as
    ``"clients, tier <t>"``). Losses and widths are left out."""
    out: dict[str, dict[str, float]] = {}
    for k, v in row.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k.startswith("eval/"):
            target, _, metric = k[len("eval/") :].partition("/")
            if metric not in ("loss", "width"):
                out.setdefault(target, {})[metric] = float(v)
        elif k.startswith("clients/tier_") and k.endswith("_mean"):
            tier, _, metric = k[len("clients/tier_") : -len("_mean")].partition("/")
            out.setdefault(f"clients, tier {tier}", {})[metric] = float(v)
    return out


def width_accuracy(row: dict[str, Any]) -> dict[str, float]:
    """The headline metric of every evaluated width in a metrics row, keyed by the width (``"0.5"``).
    When several targets run at one width (DepthFL's exits, InclusiveFL's tiers), the first the
    algorithm lists stands for it."""
    out: dict[str, float] = {}
    metric = row.get("metric") or "accuracy"
    for k, v in row.items():
        if k.startswith("eval/") and k.endswith("/width") and v is not None:
            acc = row.get(k[: -len("width")] + metric)
            if acc is not None:
                out.setdefault(f"{v:g}", acc)
    return dict(sorted(out.items(), key=lambda kv: -float(kv[0])))


def check_out(cmp: Comparison, out_dir: Path, overwrite: bool = False) -> None:
    """Refuse, before anything runs, a variant's folder under ``out_dir`` that another run is
    writing, or that holds an earlier run (unless ``overwrite``)."""
    from fedhet.experiment.rundir import check_free, refuse_earlier_run

    for vname in cmp.variants:
        check_free(out_dir / run_dir_name(vname))
        if not overwrite:
            refuse_earlier_run(out_dir / run_dir_name(vname), f"--out (variant {vname!r})", resume_hint=False)


def run_comparison(cmp: Comparison, out_dir: Path, *, progress: str | None = None, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every variant into its own folder under ``out_dir``. A variant's folder that another run
    is writing is refused, and so is one that holds an earlier run unless ``overwrite`` (checked for
    every variant before the first starts); folders of variants not run here are left as they are.
    The variants' sinks (``logging.sinks``) are grouped: TensorBoard sub-folders of
    ``out_dir/tensorboard``, one MLflow experiment whose parent run gets the report."""
    from fedhet.experiment.build import build_run, load_federated
    from fedhet.experiment.logging import write_run_header
    from fedhet.experiment.rundir import claim
    from fedhet.experiment.sinks import Group, make_sinks
    from fedhet.simulation.loop import run_rounds

    check_out(cmp, out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    group = Group(cmp.name, out_dir, cmp.variants)
    group.start()
    status = "failed"
    try:
        rows = []
        data_cache: dict[str, Any] = {}
        for vname, cfg in cmp.variants.items():
            if progress is not None:
                cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"progress": progress})})
            run_dir = out_dir / run_dir_name(vname)
            key = json.dumps([cfg.seed, cfg.data.model_dump(mode="json")], sort_keys=True)
            if key not in data_cache:
                data_cache[key] = load_federated(cfg)
            where = f"--out (variant {vname!r})"
            with claim(run_dir, fresh=True, overwrite=overwrite, where=where, resume_hint=False):
                write_run_header(run_dir, dump_config(cfg), data_cache[key])
                t0 = time.perf_counter()
                run = build_run(cfg.model_copy(update={"name": vname}), run_dir, dataset=data_cache[key])
                run.sinks = make_sinks(cfg, group.context(cfg, vname))
                try:
                    result = run_rounds(run)
                finally:
                    run.executor.close()
            rows.append(summarize(vname, result.history, time.perf_counter() - t0))
        # variants of earlier runs into the same folder stay in the summary and report (``--only``)
        summary = out_dir / "summary.json"
        ran = {r["variant"] for r in rows}
        earlier = [r for r in json.loads(summary.read_text()) if r["variant"] not in ran] if summary.exists() else []
        rows = earlier + rows
        summary.write_text(json.dumps(rows, indent=2))
        from fedhet.experiment.report import write_report

        write_report(out_dir, cmp.name, rows, {r["variant"]: out_dir / run_dir_name(r["variant"]) for r in rows})
        status = "finished"
    except KeyboardInterrupt:
        status = "stopped"
        raise
    finally:
        group.finish(status)
    return rows
