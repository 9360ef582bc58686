"""``ModelFamily``: the global model's declaration and the shape of the model at every size a
client may train, read once on the server from models really built at those sizes.

An algorithm keeps one in its state and asks it for the spec of a client's size; the spec's shapes
are checked against the model built at that size, so a spec can never disagree with the network a
client trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.core.types import Config, config_key
from fedhet.submodel.architecture import CLASSES, DepthBlock, WidthAxes, depth_blocks, group_sizes, width_axes
from fedhet.submodel.spec import Shape, SubmodelSpec, width_spec


def size_config(size: ModelSize | Mapping[str, Any]) -> Config:
    """The model config of a size (what ``build_model`` takes)."""
    return dict(size.as_config()) if isinstance(size, ModelSize) else dict(size)



@dataclass
class ModelFamily:
    """Architecture facts of a global model and of its sub-models (picklable; no model kept)."""

    axes: WidthAxes
    blocks: list[DepthBlock]
    global_config: Config
    global_shapes: dict[str, Shape]
    #: per size key: (channel group sizes, state-dict names, shapes) of the model built at that size
    members: dict[tuple[tuple[str, Any], ...], tuple[dict[str, int], tuple[str, ...], dict[str, Shape]]]

    # specs are a cache (not a field, not pickled): rebuilt on demand from the fields above
    @property
    def _specs(self) -> dict[Any, SubmodelSpec]:
        return self.__dict__.setdefault("_spec_cache", {})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_spec_cache", None)
        return state

    @classmethod
    def build(
        cls, build_model: Callable[[Config], nn.Module], global_config: Mapping[str, Any], sizes: Iterable[ModelSize | Mapping[str, Any]]
    ) -> ModelFamily:
        """Build the global model and one model per size; read their declarations and shapes."""
        gconf = size_config(global_config)
        model = build_model(gconf)
        axes = width_axes(model)
        try:
            blocks = depth_blocks(model)
        except TypeError:
            blocks = []
        fam = cls(axes, blocks, gconf, _shapes(model), {})
        fam.members[config_key(gconf)] = (group_sizes(model), tuple(model.state_dict()), _shapes(model))
        for size in sizes:
            fam.add(build_model, size)
        return fam

    def add(self, build_model: Callable[[Config], nn.Module], size: ModelSize | Mapping[str, Any]) -> None:
        config = size_config(size)
        key = config_key(config)
        if key in self.members:
            return
        model = build_model(config)
        shapes = _shapes(model)
        unknown = sorted(set(shapes) - set(self.global_shapes))
        if unknown:
            raise ValueError(
                f"the model at size {config} has entries the global model lacks ({unknown[:3]}); "
                "build the global model with every exit a client may hold (model option exits='all')"
            )
        self.members[key] = (group_sizes(model), tuple(shapes), shapes)

    def configs(self) -> list[Config]:
        return [dict(k) for k in self.members]

    def spec(self, config: Mapping[str, Any], *, mode: str = "prefix", offset: int = 0) -> SubmodelSpec:
        """The spec of a client training the model of ``config`` (cut by width with ``mode``/``offset``,
        and to the entries that model holds)."""
        key = config_key(size_config(config))
        cache_key = (key, mode, offset if mode == "rolling" else 0)
        spec = self._specs.get(cache_key)
        if spec is not None:
            return spec
        if key not in self.members:
            allowed = "; ".join(str(dict(k)) for k in self.members)
            raise KeyError(f"model size {dict(key)} is not one the family was built for; known: {allowed}")
        groups, names, shapes = self.members[key]
        spec = width_spec(self.axes, self.global_shapes, groups, mode=mode, offset=offset).restrict(names)
        got = spec.shapes()
        for name, shape in shapes.items():
            if got[name] != shape:
                raise ValueError(f"sub-model spec for {dict(key)}: {name} has shape {got[name]} but the model built at that size has {shape}")
        self._specs[cache_key] = spec
        return spec

    def class_dims(self) -> dict[str, int]:
        """Entries with a class-output dimension, and which dimension it is."""
        return {n: g.index(CLASSES) for n, g in self.axes.items() if CLASSES in g}

    def num_classes(self) -> int:
        """The size of the class-output dimension (ValueError when the model declares none)."""
        dims = self.class_dims()
        if not dims:
            raise ValueError("the model declares no class-output dimension (CLASSES in width_axes)")
        name, dim = next(iter(dims.items()))
        return self.global_shapes[name][dim]

    def label_masks(self, spec: SubmodelSpec, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean client-shaped masks selecting, in every class-output entry the spec holds, only the
        positions of ``labels`` (a bool vector over classes)."""
        out: dict[str, torch.Tensor] = {}
        for name, dim in self.class_dims().items():
            if not spec.holds(name):
                continue
            shape = spec.shapes()[name]
            view = [1] * len(shape)
            view[dim] = shape[dim]
            out[name] = labels.to(torch.bool).reshape(view).expand(shape).clone()
        return out


def _shapes(model: nn.Module) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

