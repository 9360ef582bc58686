"""``SubmodelSpec``: which part of each global tensor a client holds, and the one aggregation rule
over such parts, ``coverage_mean``.

A spec maps every global state-dict name a client holds to a ``Part``: per dimension either the
whole dimension or the global indices kept (width), plus an optional boolean mask over the kept
block (sparsity). Names a spec does not hold are absent on the client (depth). Every method's
sub-model is one of these, built from the model's own declaration (``width_axes``,
``depth_blocks``; see ``fedhet.submodel.architecture``):

- ``width_spec``: the first ``k`` channels of every group (prefix, HeteroFL/FjORD), or a window that
  rolls with the round (rolling, FedRolex);
- ``depth_spec``: the stem, the first ``k`` blocks and their exits;
- ``mask_spec``: whole tensors under a boolean mask (DisPFL);
- ``select``: whole tensors of the named entries only (Split-Mix bases, pFedMoE's shared part).

``extract`` cuts a client's tensors out of global ones; ``embed`` puts them back as full-size values
with a coverage indicator; ``CoverageSum``/``coverage_mean`` average every element over the clients
that hold it and leave elements no client holds unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedhet.aggregation import robust
from fedhet.aggregation.base import Accumulator, KeepsUpdates
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.core.types import Params
from fedhet.submodel.architecture import CLASSES, DepthBlock, WidthAxes, split_axis

#: per dimension: ``None`` (whole), a ``slice`` (a contiguous run) or a LongTensor of global indices
Index = torch.Tensor | slice | None
Shape = tuple[int, ...]

WIDTH_MODES = ("prefix", "rolling")


@dataclass(frozen=True)
class Part:
    """How a client holds one global tensor: kept indices per dimension, and an optional boolean
    mask over the kept block (elements outside it are zero on the client and not covered)."""

    index: tuple[Index, ...]
    mask: torch.Tensor | None = None

    def shape(self, global_shape: Shape) -> Shape:
        out = []
        for dim, size in enumerate(global_shape):
            idx = self.index[dim] if dim < len(self.index) else None
            if idx is None:
                out.append(size)
            elif isinstance(idx, slice):
                out.append(idx.stop - idx.start)
            else:
                out.append(int(idx.numel()))
        return tuple(out)

    @property
    def whole(self) -> bool:
        return self.mask is None and all(i is None for i in self.index)

    def _contiguous(self) -> bool:
        return all(i is None or isinstance(i, slice) for i in self.index)

    def _slices(self) -> tuple[slice, ...]:
        return tuple(slice(None) if i is None else i for i in self.index)  # type: ignore[misc]

    def _advanced(self, global_shape: Shape, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Broadcastable index tensors for every dimension (for ``index_put_``)."""
        n = len(global_shape)
        out = []
        for dim, size in enumerate(global_shape):
            idx = self.index[dim] if dim < len(self.index) else None
            if idx is None:
                t = torch.arange(size, device=device)
            elif isinstance(idx, slice):
                t = torch.arange(idx.start, idx.stop, device=device)
            else:
                t = idx.to(device)
            out.append(t.reshape([-1 if d == dim else 1 for d in range(n)]))
        return tuple(out)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The client's block of ``tensor`` (a view where the index is contiguous; differentiable)."""
        out = tensor
        if self._contiguous():
            out = tensor[self._slices()] if any(i is not None for i in self.index) else tensor
        else:
            for dim, idx in enumerate(self.index):
                if idx is None:
                    continue
                if isinstance(idx, slice):
                    out = out.narrow(dim, idx.start, idx.stop - idx.start)
                else:
                    out = out.index_select(dim, idx.to(out.device))
        if self.mask is not None:
            out = out * self.mask.to(device=out.device, dtype=out.dtype) if out.is_floating_point() else out
        return out

    def add_into(self, dst: torch.Tensor, src: torch.Tensor | float) -> None:
        """``dst[block] += src`` (``src`` client-shaped, or a scalar)."""
        if self._contiguous():
            view = dst[self._slices()]
            view.add_(src if not isinstance(src, torch.Tensor) else src.to(dst.dtype))
            return
        idx = self._advanced(tuple(dst.shape), dst.device)
        values = src.to(dst.dtype) if isinstance(src, torch.Tensor) else torch.full(self.shape(tuple(dst.shape)), float(src), dtype=dst.dtype)
        dst.index_put_(idx, values, accumulate=True)

    def put_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst[block] = src``."""
        if self._contiguous():
            dst[self._slices()] = src.to(dst.dtype)
        else:
            dst.index_put_(self._advanced(tuple(dst.shape), dst.device), src.to(dst.dtype))


class SubmodelSpec:
    """The part of the global model one client holds (see the module docstring)."""

    def __init__(self, parts: Mapping[str, Part], global_shapes: Mapping[str, Shape]) -> None:
        unknown = sorted(set(parts) - set(global_shapes))
        if unknown:
            raise KeyError(f"SubmodelSpec: {unknown[:3]} are not entries of the global model")
        self.parts = dict(parts)
        self.global_shapes = {k: tuple(v) for k, v in global_shapes.items()}

    # -- description ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.parts)

    def holds(self, name: str) -> bool:
        return name in self.parts

    def shapes(self) -> dict[str, Shape]:
        """The shape of every tensor the client holds."""
        return {n: p.shape(self.global_shapes[n]) for n, p in self.parts.items()}

    def numel(self) -> int:
        """Elements the client holds (mask-aware: a masked tensor counts its kept elements)."""
        total = 0
        for name, part in self.parts.items():
            if part.mask is not None:
                total += int(part.mask.sum())
            else:
                n = 1
                for s in part.shape(self.global_shapes[name]):
                    n *= s
                total += n
        return total

    def __repr__(self) -> str:
        return f"SubmodelSpec({len(self.parts)}/{len(self.global_shapes)} entries, {self.numel()} elements)"

    # -- composition ------------------------------------------------------------------------------
    def restrict(self, names: Iterable[str]) -> SubmodelSpec:
        """The same spec holding only ``names`` (each must be held)."""
        keep = list(names)
        missing = [n for n in keep if n not in self.parts]
        if missing:
            raise KeyError(f"SubmodelSpec.restrict: {missing[:3]} are not held by this spec")
        return SubmodelSpec({n: self.parts[n] for n in keep}, self.global_shapes)

    def masked(self, masks: Mapping[str, torch.Tensor]) -> SubmodelSpec:
        """The same spec with boolean ``masks`` (client-shaped) on the named entries, combined with
        any mask already there."""
        parts = dict(self.parts)
        for name, mask in masks.items():
            if name not in parts:
                raise KeyError(f"SubmodelSpec.masked: {name!r} is not held by this spec")
            shape = parts[name].shape(self.global_shapes[name])
            if tuple(mask.shape) != shape or mask.dtype != torch.bool:
                raise ValueError(f"SubmodelSpec.masked: mask for {name!r} must be bool of shape {shape}, got {mask.dtype} {tuple(mask.shape)}")
            old = parts[name].mask
            parts[name] = replace(parts[name], mask=mask if old is None else old & mask)
        return SubmodelSpec(parts, self.global_shapes)

    # -- moving values ----------------------------------------------------------------------------
    def extract(self, params: Mapping[str, torch.Tensor], *, copy: bool = True) -> Params:
        """The client's tensors cut from global ``params``. With ``copy=False`` contiguous cuts are
        views (and differentiable), which is how ordered dropout trains nested widths."""
        out: Params = {}
        for name, part in self.parts.items():
            value = part.take(params[name])
            out[name] = value.clone() if copy and value.data_ptr() == params[name].data_ptr() else value
        return out

    def embed(self, client: Mapping[str, torch.Tensor]) -> tuple[Params, Params]:
        """Full-size ``(values, coverage)``: the client's values at the positions it holds (0
        elsewhere) and a 0/1 tensor of the positions it holds. Names the client does not hold are
        absent from both."""
        values: Params = {}
        coverage: Params = {}
        for name, part in self.parts.items():
            src = client[name]
            full = torch.zeros(self.global_shapes[name], dtype=src.dtype, device=src.device)
            cov = torch.zeros(self.global_shapes[name], dtype=torch.float32, device=src.device)
            held = part.mask.to(src.device) if part.mask is not None else None
            part.put_into(full, src if held is None else torch.where(held, src, torch.zeros_like(src)))
            part.put_into(cov, held.float() if held is not None else torch.ones(part.shape(self.global_shapes[name]), device=src.device))
            values[name] = full
            coverage[name] = cov
        return values, coverage

    def check(self, client: Mapping[str, torch.Tensor]) -> None:
        """ValueError when ``client`` does not have exactly this spec's names and shapes."""
        shapes = self.shapes()
        missing = sorted(set(shapes) - set(client))
        extra = sorted(set(client) - set(shapes))
        if missing or extra:
            raise ValueError(f"client parameters differ from the sub-model: missing {missing[:3]}, extra {extra[:3]}")
        for name, shape in shapes.items():
            if tuple(client[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(client[name].shape)}, the sub-model holds {shape}")


# -- constructors -------------------------------------------------------------------------------------


def full_spec(global_shapes: Mapping[str, Shape]) -> SubmodelSpec:
    """Every entry, whole."""
    return SubmodelSpec({n: Part(()) for n in global_shapes}, global_shapes)


def select(global_shapes: Mapping[str, Shape], names: Iterable[str]) -> SubmodelSpec:
    """The named entries, whole."""
    return full_spec(global_shapes).restrict(names)


def group_indices(full: int, keep: int, mode: str = "prefix", offset: int = 0) -> Index:
    """Indices of the ``keep`` channels of a group of ``full`` a client holds: the first ``keep``
    (``prefix``) or ``keep`` consecutive channels starting at ``offset mod full`` and wrapping
    around (``rolling``)."""
    if mode not in WIDTH_MODES:
        raise ValueError(f"width mode: got {mode!r}, allowed: {', '.join(WIDTH_MODES)}")
    if not 1 <= keep <= full:
        raise ValueError(f"a group of {full} channels cannot keep {keep}")
    if keep == full:
        return None
    start = offset % full if mode == "rolling" else 0
    if start + keep <= full:
        return slice(start, start + keep)
    return torch.cat([torch.arange(start, full), torch.arange(0, start + keep - full)])


def width_spec(
    axes: WidthAxes,
    global_shapes: Mapping[str, Shape],
    client_groups: Mapping[str, int],
    *,
    mode: str = "prefix",
    offset: int = 0,
) -> SubmodelSpec:
    """Every entry of ``axes`` with each dimension of group ``g`` cut to ``client_groups[g]``
    channels (see ``group_indices``). Dimensions of group ``None`` or ``CLASSES`` stay whole; entries
    on a group missing from ``client_groups`` (a block a shallower model does not have) are not held."""
    full_groups: dict[str, int] = {}
    for name, groups in axes.items():
        for dim, axis in enumerate(groups):
            if axis is not None and axis != CLASSES:
                g, repeat = split_axis(axis)
                full_groups[g] = global_shapes[name][dim] // repeat
    unknown = sorted(set(client_groups) - set(full_groups))
    if unknown:
        raise KeyError(f"width_spec: channel groups {unknown[:3]} are not groups of the global model")
    index: dict[str, Index] = {
        g: group_indices(n, int(client_groups[g]), mode, offset) for g, n in full_groups.items() if g in client_groups
    }

    def dim_index(axis: object) -> Index:
        if axis is None or axis == CLASSES:
            return None
        g, repeat = split_axis(axis)  # type: ignore[arg-type]
        return _repeat(index[g], repeat)

    def present(groups: tuple[object, ...]) -> bool:
        return all(a is None or a == CLASSES or split_axis(a)[0] in index for a in groups)  # type: ignore[arg-type]

    parts = {name: Part(tuple(dim_index(a) for a in groups)) for name, groups in axes.items() if present(groups)}
    return SubmodelSpec(parts, global_shapes)


def _repeat(idx: Index, repeat: int) -> Index:
    """Channel indices expanded to ``repeat`` consecutive features per channel."""
    if idx is None or repeat == 1:
        return idx
    if isinstance(idx, slice):
        return slice(idx.start * repeat, idx.stop * repeat)
    return (idx[:, None] * repeat + torch.arange(repeat)[None, :]).reshape(-1)


def depth_names(blocks: Sequence[DepthBlock], names: Iterable[str], depth: int | None, exits: str = "last") -> list[str]:
    """The entries a model cut to ``depth`` blocks holds: the stem (in no block or exit), the first
    ``depth`` blocks, and the exit of the last of them (``exits="last"``) or of each (``"all"``)."""
    if exits not in ("last", "all"):
        raise ValueError(f"exits: got {exits!r}, allowed: last, all")
    k = len(blocks) if depth is None else depth
    if not 1 <= k <= len(blocks):
        raise ValueError(f"depth: got {depth!r}, allowed: 1..{len(blocks)} blocks")
    keep_exits = list(range(k)) if exits == "all" else [k - 1]
    out = []
    for name in names:
        in_block = [i for i, b in enumerate(blocks) if b.holds(name)]
        in_exit = [i for i, b in enumerate(blocks) if b.exit_holds(name)]
        if in_exit:
            if any(i in keep_exits for i in in_exit):
                out.append(name)
        elif in_block:
            if in_block[0] < k:
                out.append(name)
        else:
            out.append(name)
    return out


def depth_spec(
    blocks: Sequence[DepthBlock], global_shapes: Mapping[str, Shape], depth: int | None, exits: str = "last"
) -> SubmodelSpec:
    """The first ``depth`` blocks (with the stem and their exits), whole."""
    return select(global_shapes, depth_names(blocks, global_shapes, depth, exits))


def mask_spec(global_shapes: Mapping[str, Shape], masks: Mapping[str, torch.Tensor]) -> SubmodelSpec:
    """Every entry whole, with boolean ``masks`` on the named ones."""
    return full_spec(global_shapes).masked(masks)


# -- aggregation --------------------------------------------------------------------------------------


class CoverageSum(KeepsUpdates):
    """Σ_k w_k θ_k and Σ_k w_k per element over the clients holding each element, in float64.

    ``mean`` divides the two where some client holds an element and keeps the reference value
    elsewhere. The client's spec comes from ``spec_of(task)``; ``contribute_of(task)``, when given,
    returns boolean client-shaped masks of the elements a client contributes (HeteroFL's classifier
    rows of the labels a client has); elements outside it are treated as not held.

    With a robust rule (``use_rule``) it keeps each client's update on the elements it holds, and
    ``mean`` is the rule's combination, per element over the clients holding it
    (``fedhet.aggregation.robust``); ``weights`` still sums the holders' weights per element.
    """

    def __init__(self, spec_of, weighting: str = "uniform", contribute_of=None, rule: robust.RobustRule | None = None) -> None:  # noqa: ANN001
        if weighting not in ("uniform", "examples"):
            raise ValueError(f"weighting: got {weighting!r}, allowed: uniform, examples")
        self.spec_of = spec_of
        self.contribute_of = contribute_of
        self.weighting = weighting
        self.rule = rule if rule is not None and rule.active else None
        self.kept: dict[int, robust.ClientUpdate] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.count = 0

    def empty(self) -> CoverageSum:
        return CoverageSum(self.spec_of, self.weighting, self.contribute_of, self.rule)

    def reject(self, cids: Collection[int]) -> None:
        for cid in cids:
            if self.kept.pop(cid, None) is not None:
                self.count -= 1
        # the holders' weights, summed again over the clients kept (small integer sums: exact)
        self.weights = {}
        for update in self.kept.values():
            for name in update.delta:
                _, held = update.full(name)
                if name not in self.weights:
                    self.weights[name] = torch.zeros(update.shapes[name], dtype=torch.float64)
                self.weights[name] += held.to(torch.float64) * update.weight

    def add_spec(
        self,
        spec: SubmodelSpec,
        params: Mapping[str, torch.Tensor],
        weight: float,
        contribute: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        for name, part in spec.parts.items():
            if name not in params:
                continue
            value = params[name].detach().cpu()
            shape = spec.global_shapes[name]
            if name not in self.sums:
                self.sums[name] = torch.zeros(shape, dtype=torch.float64)
                self.weights[name] = torch.zeros(shape, dtype=torch.float64)
            held = _held(part.mask, contribute.get(name) if contribute is not None else None)
            if held is None:
                part.add_into(self.sums[name], value.to(torch.float64) * weight)
                part.add_into(self.weights[name], float(weight))
            else:
                h = held.to(torch.float64)
                part.add_into(self.sums[name], value.to(torch.float64) * h * weight)
                part.add_into(self.weights[name], h * weight)
        self.count += 1

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        weight = float(result.num_examples) if self.weighting == "examples" else 1.0
        contribute = self.contribute_of(task) if self.contribute_of is not None else None
        spec = self.spec_of(task)
        if self.rule is not None:
            held = {n: _held(p.mask, contribute.get(n) if contribute is not None else None) for n, p in spec.parts.items()}
            update = robust.make_update(cid, weight, result.params, task.params, spec.global_shapes, spec.parts, held)
            self.kept[cid] = update
            self.count += 1
            for name in update.delta:
                _, mask = update.full(name)
                if name not in self.weights:
                    self.weights[name] = torch.zeros(update.shapes[name], dtype=torch.float64)
                self.weights[name] += mask.to(torch.float64) * weight
            return
        self.add_spec(spec, result.params, weight, contribute)

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, CoverageSum)
        self.kept.update(other.kept)
        for name, value in other.sums.items():
            if name in self.sums:
                self.sums[name] += value
                self.weights[name] += other.weights[name]
            else:
                self.sums[name] = value.clone()
                self.weights[name] = other.weights[name].clone()
        self.count += other.count

    def mean(self, reference: Mapping[str, torch.Tensor]) -> Params:
        """Per element: the weighted mean over the clients holding it, or the reference value where
        none does. Integer entries are rounded; dtypes and devices follow ``reference``. With a robust
        rule: ``reference`` moved by the rule's combination of the kept updates."""
        if self.rule is not None:
            return robust.apply(reference, *robust.combine(list(self.kept.values()), self.rule))
        out: Params = {}
        for name, ref in reference.items():
            if name not in self.sums:
                out[name] = ref.detach().clone()
                continue
            w = self.weights[name]
            avg = self.sums[name] / w.clamp_min(1e-300)
            if not ref.is_floating_point():
                avg = torch.round(avg)
            out[name] = torch.where(w > 0, avg, ref.detach().cpu().to(torch.float64)).to(dtype=ref.dtype, device=ref.device)
        return out

    def covered(self) -> dict[str, torch.Tensor]:
        """Per entry, the elements some client held this round."""
        return {n: w > 0 for n, w in self.weights.items()}


def _held(mask: torch.Tensor | None, contribute: torch.Tensor | None) -> torch.Tensor | None:
    """The elements of a part a client contributes: its mask and its ``contribute`` mask."""
    if mask is None:
        return contribute
    return mask if contribute is None else mask & contribute


def coverage_mean(
    reference: Mapping[str, torch.Tensor],
    specs: Sequence[SubmodelSpec],
    params: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> Params:
    """Every element averaged (weights ``weights``) over the clients whose spec holds it; elements no
    client holds keep ``reference``. With every client at full size this is ``weighted_mean``."""
    if not len(specs) == len(params) == len(weights):
        raise ValueError(f"coverage_mean: {len(specs)} specs, {len(params)} parameter sets, {len(weights)} weights")
    acc = CoverageSum(spec_of=None)
    for spec, p, w in zip(specs, params, weights, strict=True):
        if w < 0:
            raise ValueError(f"coverage_mean: weight {w!r} is negative; allowed: weights >= 0")
        acc.add_spec(spec, p, float(w))
    return acc.mean(reference)
