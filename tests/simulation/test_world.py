"""ClientWorld model configs: size keys, option overrides and ensembles."""

from __future__ import annotations

import pytest
import torch

from fedhet.data import federate, load_dataset
from fedhet.models.ensemble import Ensemble, base_id, first_bases, rename
from fedhet.simulation.world import ClientWorld


@pytest.fixture(scope="module")
def world():
    data = federate(load_dataset("synthetic"), num_clients=2, seed=0)
    return ClientWorld(data, "mlp", {"hidden": (8, 8)}, seed=0)


def test_size_keys_and_option_overrides(world):
    half = world.build_model({"width": 0.5, "depth": 1, "density": 1.0})
    assert [tuple(v.shape) for v in half.state_dict().values()][:2] == [(4, world.dataset.input_shape[0]), (4,)]
    multi = world.build_model({"width": 1.0, "depth": None, "density": 1.0, "exits": "all"})
    assert "exits.0.weight" in multi.state_dict() and "head.weight" in multi.state_dict()
    assert world.build_model({"width": 1.0, "depth": None, "density": 1.0}) is not multi
    with pytest.raises(TypeError, match="unknown option 'bogus'"):
        world.build_model({"width": 1.0, "bogus": 1})


def test_ensembles_are_seeded_independent_bases(world):
    ens = world.build_model({"width": 0.5, "ensemble": 3})
    assert isinstance(ens, Ensemble) and len(ens.bases) == 3
    w = [ens.bases[i].body[0].weight for i in range(3)]
    assert not torch.equal(w[0], w[1])  # each base is its own draw
    again = world.initial_params({"width": 0.5, "ensemble": 3})
    assert torch.equal(again["bases.2.body.0.weight"], w[2].detach())
    x = torch.randn(4, *world.dataset.input_shape)
    ens.train()
    outs = ens(x)
    ens.eval()
    assert torch.allclose(ens(x), torch.stack(outs).mean(0))
    with pytest.raises(ValueError, match="ensemble: got 0"):
        world.build_model({"width": 0.5, "ensemble": 0})


def test_ensemble_names_map_between_slots_and_global_bases():
    params = {"bases.0.w": torch.tensor(1.0), "bases.1.w": torch.tensor(2.0)}
    glob = rename(params, [5, 2], to_global=True)
    assert glob == {"bases.5.w": torch.tensor(1.0), "bases.2.w": torch.tensor(2.0)}
    assert rename(glob, [5, 2], to_global=False) == params
    assert base_id("bases.12.body.0.weight") == 12
    assert list(first_bases({"bases.0.a": 0, "bases.3.a": 1}, 2)) == ["bases.0.a"]
    with pytest.raises(KeyError, match="not an entry of an ensemble"):
        base_id("body.0.weight")


def test_initial_parameters_are_kept_only_when_clients_ask_for_them(world):
    from fedhet.core.types import config_key

    config = {"width": 0.5, "depth": None, "density": 1.0}
    model = world.build_model(config)
    fresh = world.fresh_params(config)
    assert config_key(config) not in world._initial  # building a model or a fresh copy keeps nothing
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())  # not yet trained: the same draw
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a client trains the reused model
    kept = world.initial_params(config)
    assert all(torch.equal(kept[k], fresh[k]) for k in fresh) and world.initial_params(config) is kept
    assert config_key(config) in world._initial
    again = world.fresh_params(config)
    assert all(torch.equal(again[k], kept[k]) and again[k] is not kept[k] for k in kept)  # a copy of the kept one
