"""What client-side work needs in any process: the federated data, the model builder, the seed.

A worker process holds one ``ClientWorld`` for the whole run and makes a ``ClientContext`` for
each client it runs. ``run_train`` and ``run_eval`` are the single place where a client's work is
run, guarded and checked, for every executor.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fedhet.communication.upload import PackedUpload, pack_upload, unpack_upload
from fedhet.core import rng
from fedhet.core.algorithm import Algorithm, check_examples, load_params_for, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, ConfigKey, Metrics, Params, config_key
from fedhet.data.federated import FederatedDataset
from fedhet.models import build_model
from fedhet.models.ensemble import Ensemble
from fedhet.models.moe import MixtureOfExperts
from fedhet.simulation.attacks import Attack
from fedhet.training.local import evaluate_grouped, rows_independent

SIZE_KEYS = ("width", "depth", "density")

#: one client's work: (client id, task, info, store entry)
Job = tuple[int, ClientTask, ClientInfo, dict[str, Any]]


@dataclass
class ClientWorld:
    dataset: FederatedDataset
    model: str
    model_options: dict[str, Any]
    seed: int
    device: str = "cpu"
    #: FedPAQ: quantize every upload with this many levels (None: send it as it is)
    upload_levels: int | None = None
    #: what the simulated attackers do (``fedhet.simulation.attacks``), and which clients they are
    attack: Attack | None = None
    attackers: frozenset[int] = frozenset()
    #: evaluate clients sent the same parameters together (``eval.group_clients``; see ``eval_groups``)
    group_eval: bool = True
    _models: dict[ConfigKey, nn.Module] = field(default_factory=dict, repr=False)
    _rowwise: dict[ConfigKey, bool] = field(default_factory=dict, repr=False)
    _initial: dict[ConfigKey, Params] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_models"] = {}
        return state

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def _new_model(self, config: Config) -> nn.Module:
        """A model of ``config``: its size (``width``, ``depth``, ``density``); ``ensemble: n`` builds
        ``n`` independent bases of that size (``fedhet.models.ensemble``); ``moe_features: d`` (with
        ``moe_shared_width`` and ``moe_gate_hidden``) builds pFedMoE's mixture of a shared expert of
        width ``moe_shared_width`` and a local expert of the config's size (``fedhet.models.moe``);
        any other key overrides the run's model option of that name (e.g. ``exits="all"`` for a
        server-side multi-exit model)."""
        size = ModelSize(width=float(config.get("width", 1.0)), depth=config.get("depth"), density=float(config.get("density", 1.0)))  # type: ignore[arg-type]
        options = {**self.dataset.model_options, **self.model_options}
        # pFedMoE's keys describe the mixture, never an option of the experts' architecture
        moe_keys = ("moe_features", "moe_shared_width", "moe_gate_hidden")
        options.update({k: v for k, v in config.items() if k not in SIZE_KEYS and k != "ensemble" and k not in moe_keys})

        def one(at: ModelSize, num_classes: int) -> nn.Module:
            return build_model(
                self.model,
                input_shape=self.dataset.input_shape,
                num_classes=num_classes,
                size=at,
                **options,
            )

        with rng.seeded(self.seed, "model_init"):
            n = config.get("ensemble")
            model: nn.Module
            if any(k in config for k in moe_keys):
                features = config.get("moe_features")
                shared_width = config.get("moe_shared_width", 1.0)
                gate_hidden = config.get("moe_gate_hidden", 64)
                if isinstance(features, bool) or not isinstance(features, int) or features < 1:
                    raise ValueError(f"model config moe_features: got {features!r}, allowed: an integer >= 1")
                if isinstance(gate_hidden, bool) or not isinstance(gate_hidden, int) or gate_hidden < 1:
                    raise ValueError(f"model config moe_gate_hidden: got {gate_hidden!r}, allowed: an integer >= 1")
                if isinstance(shared_width, bool) or not isinstance(shared_width, (int, float)) or not 0.0 < shared_width <= 1.0:
                    raise ValueError(f"model config moe_shared_width: got {shared_width!r}, allowed: a number with 0 < width <= 1")
                if n is not None:
                    raise ValueError(f"model config: ensemble ({n!r}) and moe_features cannot be combined; allowed: one of them")
                # the shared expert is built first, so its initial values are the same in every config
                model = MixtureOfExperts(
                    shared=one(ModelSize(width=float(shared_width)), features),
                    local=one(size, features),
                    input_shape=self.dataset.input_shape,
                    features=features,
                    num_classes=self.dataset.num_classes,
                    gate_hidden=gate_hidden,
                )
            elif n is None:
                model = one(size, self.dataset.num_classes)
            else:
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise ValueError(f"model config ensemble: got {n!r}, allowed: an integer >= 1")
                model = Ensemble([one(size, self.dataset.num_classes) for _ in range(n)])
        return model.to(self.torch_device)

    def build_model(self, config: Config) -> nn.Module:
        """A model for ``config``, reused across clients (its state is overwritten by the caller)."""
        key = config_key(config)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self._new_model(config)
        return model

    def rows_independent(self, config: Config) -> bool:
        """Whether the model of ``config`` evaluates each example on its own (asked once a config)."""
        key = config_key(config)
        if key not in self._rowwise:
            self._rowwise[key] = rows_independent(self.build_model(config))
        return self._rowwise[key]

    def initial_params(self, config: Config) -> Params:
        """The seeded initial parameters of a model of ``config`` (the same in every process), kept
        for the clients that start from them (personal models, masks): read-only."""
        key = config_key(config)
        if key not in self._initial:
            self._initial[key] = self.fresh_params(config)
        return self._initial[key]

    def fresh_params(self, config: Config) -> Params:
        """A new copy of the seeded initial parameters of a model of ``config``, not kept: the server
        sets up its global model once, and an algorithm whose clients never ask for them (FedAvg and
        its family) then holds no copy of the initial model for the whole run (in every worker)."""
        key = config_key(config)
        if key in self._initial:
            return {k: v.clone() for k, v in self._initial[key].items()}
        return {k: v.cpu() for k, v in model_params(self._new_model(config)).items()}

    def context(self, info: ClientInfo, rnd: int, store: dict[str, Any], stream: str = "train") -> ClientContext:
        cid = info.id
        return ClientContext(
            client=info,
            train=self.dataset.clients_train[cid],
            test=self.dataset.clients_test[cid],
            build_model=self.build_model,
            device=self.torch_device,
            generator=rng.generator(self.seed, stream, rnd, cid),
            store=store,
            initial_params=self.initial_params,
            transform=self.dataset.train_transform,
            seed=self.seed,
            round=rnd,
        )


@dataclass
class ClientOutcome:
    """One client's train run: its result (or the error that kept it out) and its new store."""

    cid: int
    result: ClientResult | None
    error: str | None
    store: dict[str, Any] | None
    #: the upload's encoded size where it is not the dense size of the result (quantized uploads)
    upload_bytes: int | None = None
    #: a quantized upload as the client sends it (``result`` holds what the server rebuilds from it)
    packed: PackedUpload | None = None


def run_train(
    algorithm: Algorithm[Any], world: ClientWorld, info: ClientInfo, task: ClientTask, store: dict[str, Any]
) -> ClientOutcome:
    """Run ``local_update`` for one client; any exception or invalid result leaves the client out
    of the round with its error, and its store unchanged."""
    try:
        ctx = world.context(info, task.round, store)
        attack = world.attack if info.id in world.attackers else None
        if attack is not None:
            ctx = replace(ctx, train=attack.poison_data(ctx.train, world.dataset.num_classes))
        # draws from torch's global generator inside the model (dropout) are keyed like every other
        # draw, so a client's result does not depend on what ran before it in this process
        with rng.seeded(world.seed, "global", "train", task.round, info.id):
            result = algorithm.local_update(task, ctx)
        if attack is not None:
            result = attack.poison_result(task, result, world.seed, info.id)
        result = ClientResult(
            params={k: v.detach().cpu() for k, v in result.params.items()},
            num_examples=result.num_examples,
            metrics=result.metrics,
            extras={k: v.detach().cpu() for k, v in result.extras.items()},
        )
        algorithm.validate_result(task, result)
        check_examples(info, result)
        nbytes, packed = None, None
        if world.upload_levels is not None:
            gen = rng.generator(world.seed, "quantize", task.round, info.id)
            reference = algorithm.upload_reference(task)
            packed = pack_upload(task, result, world.upload_levels, gen, reference)
            params, extras = unpack_upload(task, packed, reference)
            result, nbytes = replace(result, params=params, extras=extras), packed.nbytes
    except Exception as exc:  # a client's failure must never stop or corrupt the round
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        loc = f" at {where.filename}:{where.lineno}" if where else ""
        return ClientOutcome(info.id, None, f"round {task.round}, client {info.id}, local_update: {type(exc).__name__}: {exc}{loc}", None)
    return ClientOutcome(info.id, result, None, ctx.store, nbytes, packed)


def run_probe(
    algorithm: Algorithm[Any], world: ClientWorld, info: ClientInfo, task: ClientTask, store: dict[str, Any], what: str, batch: int | None
) -> torch.Tensor | str:
    """``Algorithm.probe`` for one client (a selector's question before the round); an error is
    returned as its message, and the client is then not a candidate."""
    try:
        with rng.seeded(world.seed, "global", "probe", task.round, info.id):
            value = algorithm.probe(task, world.context(info, task.round, store, stream="probe"), what, batch).detach().cpu()
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"probe {what!r} is not finite")
        return value
    except Exception as exc:
        return f"round {task.round}, client {info.id}, probe {what}: {type(exc).__name__}: {exc}"


#: clients evaluated together hold at most this many test examples between them: one forward of
#: the size of an evaluation batch, so memory is that of evaluating one client
GROUP_ROWS = 256


def eval_groups(
    algorithm: Algorithm[Any], world: ClientWorld, cids: Sequence[int], tasks: Mapping[int, ClientTask], infos: Mapping[int, ClientInfo]
) -> list[list[int]]:
    """``cids`` (in their order) cut into runs evaluated together: consecutive clients sent the
    very same parameter dict at the same config, whose evaluation is that of the model as sent
    (``Algorithm.evaluates_as_sent``), of a model whose examples do not interact in evaluation and a
    task that scores several splits in one pass, holding at most :data:`GROUP_ROWS` test examples
    between them; every other client is a group of one, evaluated by ``run_eval`` as before.

    The groups depend on the tasks alone, never on how an executor shares the clients out (a
    sharded executor cuts its shares between groups), so every executor computes the same numbers.
    With thousands of clients of a few examples each this turns thousands of small forwards into
    tens of full ones (``benchmarks/bench_fedavg.py --workload mlp --configs plain_eval,eval``)."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    key: tuple[int, ConfigKey] | None = None
    can_group = world.group_eval and world.dataset.task.splits_metrics
    for cid in cids:
        task, n = tasks[cid], infos[cid].num_test
        k = None
        if can_group and n <= GROUP_ROWS and algorithm.evaluates_as_sent(task) and world.rows_independent(task.config):
            k = (id(task.params), config_key(task.config))
        if k is not None and k == key and rows + n <= GROUP_ROWS:
            current.append(cid)
            rows += n
            continue
        if current:
            groups.append(current)
        current, rows, key = [cid], n, k
    if current:
        groups.append(current)
    return groups


def run_eval_group(algorithm: Algorithm[Any], world: ClientWorld, jobs: Sequence[Job], eval_pass: object | None = None) -> dict[int, Metrics | str]:
    """Evaluate a group of ``eval_groups`` (``jobs``: ``(cid, task, info, store)`` each): one
    client through ``run_eval``; several through shared forwards of the model they were all sent
    (``evaluate_grouped``), drawing from torch's global RNG seeded by the first client's key. Should
    that fail, each client of the group is evaluated on its own, so a client whose split cannot be
    batched with the others (a different shape, say) fails alone."""
    if len(jobs) > 1:
        cid, task = jobs[0][0], jobs[0][1]
        try:
            with torch.no_grad(), rng.seeded(world.seed, "global", "eval", task.round, cid):
                model = world.build_model(task.config)
                load_params_for(model, task.params, eval_pass)
                tests = [world.dataset.clients_test[job[0]] for job in jobs]
                metrics = evaluate_grouped(model, tests, device=world.torch_device)
            return {job[0]: m for job, m in zip(jobs, metrics)}
        except Exception:  # noqa: BLE001 - each client again on its own, with its own error
            pass
    return {c: run_eval(algorithm, world, info, task, store, eval_pass) for c, task, info, store in jobs}


def run_eval(
    algorithm: Algorithm[Any],
    world: ClientWorld,
    info: ClientInfo,
    task: ClientTask,
    store: dict[str, Any],
    eval_pass: object | None = None,
) -> Metrics | str:
    """``evaluate_client`` for one client; an error is returned as its message. ``eval_pass``: a
    token shared by the clients an executor evaluates together (``ClientContext.eval_pass``)."""
    try:
        with torch.no_grad(), rng.seeded(world.seed, "global", "eval", task.round, info.id):
            ctx = world.context(info, task.round, store, stream="eval")
            ctx.eval_pass = eval_pass
            return algorithm.evaluate_client(task, ctx)
    except Exception as exc:
        return f"round {task.round}, client {info.id}, evaluate_client: {type(exc).__name__}: {exc}"
