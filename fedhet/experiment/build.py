"""Build the pieces of a run from a validated config."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from fedhet.aggregation.robust import RobustRule
from fedhet.core.messages import ModelSize
from fedhet.core.registry import ALGORITHMS
from fedhet.data.federated import split_sizes
from fedhet.devices import Availability, parse_tiers
from fedhet.devices.fleet import Fleet, resolve_policy
from fedhet.experiment.config import ConfigError, ExperimentConfig, parse_value
from fedhet.experiment.sinks import make_sinks
from fedhet.selection.base import ClientSelector
from fedhet.server_opt import build_server_optimizer
from fedhet.simulation.attacks import Attack
from fedhet.simulation.executors import Executor, SequentialExecutor
from fedhet.simulation.loop import Run
from fedhet.simulation.store import ClientStore, make_store
from fedhet.simulation.world import ClientWorld
from fedhet.training.local import LocalTraining


def _error(err: Exception) -> ConfigError:
    """A config error in one line (a multi-line message, such as a list of folders searched, is
    joined with "; ")."""
    msg = str(err.args[0]) if err.args else str(err)
    out = ""
    for part in (p.strip(" -") for p in msg.splitlines() if p.strip()):
        out += part if not out else (" " if out.endswith(":") else "; ") + part  # "Looked in: a; b"
    return ConfigError(out)


def build_algorithm(cfg: ExperimentConfig) -> Any:
    cls = ALGORITHMS.get(cfg.algorithm.name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = dict(cfg.algorithm.model_extra or {})
    hints = typing.get_type_hints(cls)
    for key, value in extra.items():
        if key not in fields or key in ("local", "server"):
            allowed = ", ".join(n for n in fields if n not in ("local", "server")) or "(none)"
            raise ConfigError(
                f"algorithm.{key}: unknown field for algorithm {cfg.algorithm.name!r}; allowed: {allowed}"
            )
        try:
            checked = TypeAdapter(hints[key]).validate_python(value)
            extra[key] = value if checked == value else checked  # keep 0 as the user wrote it
        except ValidationError as err:
            raise ConfigError(f"algorithm.{key}: got {value!r}, allowed: {err.errors()[0]['msg'].lower()}") from None
    try:
        local = LocalTraining(**cfg.local.model_dump())
        kwargs: dict[str, Any] = {"local": local, **extra}
        if "server" in fields:
            server_extra = dict(cfg.server.model_extra or {})
            kwargs["server"] = build_server_optimizer(
                cfg.server.name, clip=cfg.server.clip, noise_std=cfg.server.noise_std, seed=cfg.seed, **server_extra
            )
        elif cfg.server.name != "fedavg" or cfg.server.model_extra:
            raise ConfigError(
                f"server.name: got {cfg.server.name!r}, but algorithm {cfg.algorithm.name!r} has no server optimizer; allowed: fedavg"
            )
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise _error(err) from None


def build_selector(cfg: ExperimentConfig, num_clients: int) -> ClientSelector:
    """The configured selector (``SELECTORS[selection.name]``); a ``selection`` key that the chosen
    selector does not use is refused."""
    from fedhet.core.registry import SELECTORS
    from fedhet.selection.builtins import SELECTION_KEYS

    sel = cfg.selection
    factory = SELECTORS.get(sel.name)
    uses = tuple(getattr(factory, "uses", ()))
    for key in SELECTION_KEYS:
        if getattr(sel, key) is not None and key not in uses:
            raise ConfigError(
                f"selection.{key}: got {getattr(sel, key)!r}, but selection {sel.name!r} does not use it; allowed: unset"
            )
    options = {k: getattr(sel, k) for k in uses if getattr(sel, k) is not None}
    own = _keywords(factory, exclude={"clients_per_round", "fraction", "num_clients", *SELECTION_KEYS})
    for key in sel.options:
        if own is not None and key not in own:
            raise ConfigError(
                f"selection.options.{key}: unknown option of selection {sel.name!r}; allowed: {', '.join(sorted(own)) or 'none'}"
            )
    per_round, fraction = sel.clients_per_round, sel.fraction
    target = round_target(cfg, num_clients)
    if target is not None:  # over-commitment: select more than the round aggregates
        per_round, fraction = min(num_clients, math.ceil(target * sel.overcommit - 1e-9)), None
    try:
        return factory(
            clients_per_round=per_round, fraction=fraction, num_clients=num_clients,
            **options, **sel.options,
        )  # fmt: skip
    except (ValueError, TypeError) as err:
        raise _error(err) from None


def _keywords(fn: Any, exclude: set[str]) -> set[str] | None:
    """The keyword arguments ``fn`` takes, less ``exclude``; None when it takes any (``**kwargs``) or
    its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - exclude


def round_target(cfg: ExperimentConfig, num_clients: int) -> int | None:
    """With ``selection.overcommit`` > 1: the clients a round aggregates (``clients_per_round``, or
    ``fraction`` of the clients rounded up); ``None`` without over-commitment."""
    sel = cfg.selection
    if sel.overcommit == 1.0:
        return None
    if cfg.devices.profiles is None:
        raise ConfigError(
            f"selection.overcommit: got {sel.overcommit!r}, but without devices.profiles there is no clock to tell "
            "who finishes first; allowed: 1.0, or set devices.profiles"
        )
    if sel.clients_per_round is None and sel.fraction is None:
        raise ConfigError(
            f"selection.overcommit: got {sel.overcommit!r}, but every client is selected already; allowed: with "
            "selection.clients_per_round or selection.fraction"
        )
    return sel.clients_per_round or max(1, math.ceil(sel.fraction * num_clients - 1e-9))  # type: ignore[operator]


def build_fleet_parts(cfg: ExperimentConfig) -> tuple[list[Any], str]:
    try:
        tiers = parse_tiers(cfg.devices.tiers)
    except ValueError as err:
        raise _error(err) from None
    heterogeneous = ALGORITHMS.get(cfg.algorithm.name).heterogeneous
    try:
        policy = resolve_policy(cfg.devices.policy, heterogeneous, cfg.algorithm.name)
    except ValueError as err:
        raise _error(err) from None
    return tiers, policy


def build_profiles(cfg: ExperimentConfig, tiers: list[Any], num_clients: int) -> list[Any]:
    """Each client's device profile from ``devices.profiles`` (see :mod:`fedhet.devices.profiles`)."""
    from fedhet.data._cifar10 import data_root
    from fedhet.devices.profiles import COLUMNS, DeviceProfile, flash_population, preset, read_profiles
    from fedhet.devices.tiers import assign_tiers

    p = cfg.devices.profiles
    assert p is not None
    try:
        if p.source == "flash":
            return flash_population(
                num_clients, cfg.seed, data_root(cfg.data.root),
                flops_per_score=p.flops_per_score, memory_fraction=p.memory_fraction, latency=p.latency,
            )  # fmt: skip
        if p.source == "file":
            return read_profiles(p.path, num_clients, cfg.seed)  # type: ignore[arg-type]
        devices = []
        for i, tier in enumerate(tiers):
            where = f"devices.tiers[{i}].device"
            if tier.device is None:
                raise ValueError(
                    f"{where}: missing (tier {tier.name!r}), allowed: a preset ({', '.join(_presets())}) or a mapping of "
                    "profile fields; required by devices.profiles.source 'tiers'"
                )
            if isinstance(tier.device, str):
                try:
                    devices.append(preset(tier.device))
                except ValueError:
                    raise ValueError(f"{where}: unknown device {tier.device!r}; allowed: {', '.join(_presets())}") from None
                continue
            unknown = sorted(set(tier.device) - set(COLUMNS))
            if unknown:
                raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(COLUMNS)}")
            missing = [f for f in ("flops", "memory", "down", "up") if f not in tier.device]
            if missing:
                raise ValueError(f"{where}: missing {missing[0]} (tier {tier.name!r}); allowed: a number > 0")
            # YAML 1.1 reads 1.0e9 (no sign after e) as a string; a number is meant
            values = {k: parse_value(v) if isinstance(v, str) else v for k, v in tier.device.items()}
            try:
                devices.append(DeviceProfile(**{"name": tier.name, **values}))
            except ValueError as err:  # "devices.profiles (NAME): FIELD got ..." names the tier's entry instead
                raise ValueError(f"{where}: {str(err).split(': ', 1)[-1]}") from None
        return [devices[t] for t in assign_tiers(num_clients, tiers, mode="fixed", seed=cfg.seed, rnd=1)]
    except (ValueError, FileNotFoundError) as err:
        raise _error(err) from None


def _presets() -> list[str]:
    from fedhet.devices.profiles import PRESETS

    return list(PRESETS)


@dataclasses.dataclass(frozen=True)
class Devices:
    """The devices of a run with profiles: the fleet's fields, the clock, and what ``devices.json`` records."""

    profiles: tuple[Any, ...]
    capacity: tuple[str | None, ...]
    memory_fit: tuple[str | None, ...]
    fitted: bool
    clock: Any
    record: dict[str, Any]


def build_devices(
    cfg: ExperimentConfig, tiers: list[Any], policy: str, world: ClientWorld, num_train: tuple[int, ...], local: LocalTraining, target: int | None
) -> Devices:
    """Profiles, each client's capacity (:mod:`fedhet.devices.capacity`), the availability schedule
    and the clock of a run with ``devices.profiles``; a deadline no client can meet is refused."""
    from fedhet.devices.capacity import expected_examples, expected_seconds, fastest_round, fit_capacity, size_needs
    from fedhet.devices.clock import Clock
    from fedhet.devices.schedule import daily_schedule, read_trace

    dev = cfg.devices
    n = len(num_train)
    profiles = build_profiles(cfg, tiers, n)
    # the distinct sizes, largest first, each named by its first tier
    order = sorted(range(len(tiers)), key=lambda i: (-tiers[i].size.scale(), i))
    named: dict[Any, str] = {}
    for i in order:
        named.setdefault(tiers[i].size, tiers[i].name)
    sizes = list(named)
    sample = world.dataset.test.x[:1]
    try:
        needs = size_needs(world.build_model, sizes, world.dataset.input_shape, sample.dtype, local)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"devices.profiles: measuring the training memory of the tiers' sizes failed: {err}") from None
    fits, memory = fit_capacity(profiles, needs, num_train, local, dev.deadline)
    if dev.deadline is not None:
        best = fastest_round(profiles, needs, num_train, local)
        if best > dev.deadline:
            raise ConfigError(
                f"devices.deadline: got {dev.deadline:g} s, but no client can finish a round in time "
                f"(the fastest expected round is {best:.4g} s); allowed: a deadline >= {best:.4g}"
            )
    capacity = tuple(None if f is None else named[sizes[f]] for f in fits)
    memory_fit = tuple(None if f is None else named[sizes[f]] for f in memory)
    schedule = None
    av = dev.availability
    if av is not None and av.trace:
        try:
            schedule = read_trace(av.trace, n, av.period)
        except (ValueError, FileNotFoundError) as err:
            raise _error(err) from None
    elif av is not None or any(pr.online_hours < 24 for pr in profiles):
        hours = [av.daily_hours if av is not None and av.daily_hours is not None else pr.online_hours for pr in profiles]
        schedule = daily_schedule(hours, [pr.online_start for pr in profiles], cfg.seed)
    clock = Clock(tuple(profiles), cfg.seed, deadline=dev.deadline, target=target, schedule=schedule)
    fitted = dev.policy == "auto" and policy == "tiered"
    record = {
        "source": dev.profiles.source if dev.profiles else None,
        "deadline": dev.deadline,
        "sizes": [
            {"tier": named[s], **s.as_config(), "train_memory_bytes": nd.memory, "train_flops_per_example": nd.flops_per_example, "bytes": nd.bytes}
            for s, nd in zip(sizes, needs)
        ],
        "clients": [
            {
                "client": cid,
                **pr.as_json(),
                "capacity": capacity[cid],
                "memory_fit": memory_fit[cid],
                "expected_seconds": {
                    named[s]: expected_seconds(pr, nd, expected_examples(num_train[cid], local)) for s, nd in zip(sizes, needs)
                },
            }
            for cid, pr in enumerate(profiles)
        ],
    }
    return Devices(tuple(profiles), capacity, memory_fit, fitted, clock, record)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: got {name!r}, but no CUDA device is available; allowed here: auto, cpu")
    return name


def load_federated(cfg: ExperimentConfig) -> Any:
    from fedhet.data import federate, load_dataset

    try:
        bundle = load_dataset(cfg.data.dataset, root=cfg.data.root, seed=cfg.seed, **cfg.data.options)
        return federate(
            bundle,
            num_clients=cfg.data.num_clients,
            partitioner=cfg.data.partitioner,
            seed=cfg.seed,
            client_test_fraction=cfg.data.client_test_fraction,
            train_subset=cfg.data.train_subset,
            test_subset=cfg.data.test_subset,
            rotate_fraction=cfg.data.rotate_fraction,
            rotate_degrees=cfg.data.rotate_degrees,
            **cfg.data.partitioner_options(),
        )
    except TypeError as err:
        found = _error(err)
        raise ConfigError(f"data.options: {found}" if str(found).startswith("dataset ") else str(found)) from None
    except FileNotFoundError as err:
        found = _error(err)
        if re.match(r"^[a-z_]+(\.[a-z_]+)+:", str(found)):  # names its own field (data.path, ...)
            raise found from None
        root = cfg.data.root if cfg.data.root is not None else os.environ.get("FEDHET_DATA")
        given = repr(root) if root is not None else "unset (~/.cache/fedhet/data)"
        raise ConfigError(f"data.root: got {given}: {found}") from None
    except (ValueError, ImportError) as err:
        raise _error(err) from None


def _driver_device(cfg: ExperimentConfig) -> str | None:
    """Where the driver computes (server-side evaluation), when that is not ``runtime.device``: with
    Ray, ``runtime.device`` is where the actors' clients train, and the driver may have no GPU."""
    rt = cfg.runtime
    if rt.executor != "ray" or not rt.device.startswith("cuda"):
        return None
    if rt.ray.gpus_per_worker == 0:
        raise ConfigError(
            f"runtime.device: got {rt.device!r}, but runtime.ray.gpus_per_worker is 0 (the actors get no GPU); "
            "allowed: auto or cpu, or set runtime.ray.gpus_per_worker (e.g. 0.5: two actors share a GPU)"
        )
    return None if torch.cuda.is_available() else "cpu"


def build_attack(cfg: ExperimentConfig, fed: Any) -> tuple[Attack | None, frozenset[int]]:
    """The simulated attack of ``adversaries`` and the clients that carry it out (none when the
    fraction is 0)."""
    adv = cfg.adversaries
    if adv.fraction == 0:
        return None, frozenset()
    attack = Attack(**adv.model_dump())
    kind = fed.task.kind
    if attack.kind == "label_flip" and kind != "classification":
        raise ConfigError(f"adversaries.kind: got 'label_flip', but {cfg.data.dataset} is a {kind} task; allowed: label_flip with classification tasks")
    return attack, attack.choose(fed.num_clients, cfg.seed)


def build_world(cfg: ExperimentConfig, fed: Any, device: str | None = None) -> ClientWorld:
    """The client world of ``cfg`` over the federated data ``fed`` (a misspelt model option fails
    here, before any training)."""
    attack, attackers = build_attack(cfg, fed)
    world = ClientWorld(
        fed,
        cfg.model.name,
        dict(cfg.model.options),
        cfg.seed,
        device or resolve_device(cfg.runtime.device),
        upload_levels=cfg.communication.levels,
        attack=attack,
        attackers=attackers,
        group_eval=cfg.eval.group_clients,
    )
    try:
        world.build_model(ModelSize().as_config())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.options: {err}") from None
    return world


@dataclasses.dataclass(frozen=True)
class WorldFromConfig:
    """Builds a run's client world from its config where it is called: a Ray actor on another node
    loads the data from ``data.root`` there instead of receiving them from the driver."""

    config: dict[str, Any]

    def __call__(self) -> ClientWorld:
        cfg = ExperimentConfig.model_validate(self.config)
        return build_world(cfg, load_federated(cfg), device="cpu")


def check_executor(cfg: ExperimentConfig, num_clients: int) -> None:
    """The executor settings that can be checked without starting its workers."""
    rt = cfg.runtime
    workers = rt.ray.workers or rt.workers
    if rt.executor != "sequential" and workers is not None and workers > num_clients:
        field = "runtime.ray.workers" if rt.ray.workers else "runtime.workers"
        raise ConfigError(f"{field}: got {workers}, but the run has {num_clients} clients; allowed: 1 to {num_clients}")


def build_executor(cfg: ExperimentConfig, world: ClientWorld, store: Any) -> Executor:
    """The configured executor over ``world`` (starting its workers)."""
    rt = cfg.runtime
    num_clients = world.dataset.num_clients
    check_executor(cfg, num_clients)
    if rt.executor == "parallel":
        from fedhet.simulation.parallel import ParallelExecutor

        return ParallelExecutor(world, store, workers=rt.workers or os.cpu_count() or 1)
    if rt.executor == "ray":
        from fedhet.simulation.ray_executor import RayExecutor

        workers = rt.ray.workers or rt.workers
        try:
            return RayExecutor(
                world,
                store,
                address=rt.ray.address,
                workers=workers,
                cpus_per_worker=rt.ray.cpus_per_worker,
                gpus_per_worker=rt.ray.gpus_per_worker,
                max_retries=rt.ray.max_retries,
                data=rt.ray.data,
                world_factory=WorldFromConfig(cfg.model_dump(mode="json")),
            )
        except ValueError as err:
            raise _error(err) from None
    return SequentialExecutor(world, store)


@dataclasses.dataclass(frozen=True)
class ClientReports:
    """What deployed clients report about themselves (instead of what the data's partition says)."""

    num_train: tuple[int, ...]
    num_test: tuple[int, ...]
    label_counts: tuple[tuple[int, ...], ...]
    tiers: tuple[str | None, ...] = ()


def build_run(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    dataset: Any = None,
    executor: Callable[[ClientWorld, ClientStore], Executor] | None = None,
    clients: ClientReports | None = None,
) -> Run:
    """The run of ``cfg``. ``dataset``: the federated data (default: loaded from ``cfg.data``);
    ``executor``: builds the executor from the world and the store (default: ``runtime.executor``);
    ``clients``: the clients' own reports of their sizes, label histograms and tiers (a deployed run)."""
    algorithm = build_algorithm(cfg)
    tiers, policy = build_fleet_parts(cfg)
    fed = dataset if dataset is not None else load_federated(cfg)
    sel = cfg.selection
    if algorithm.decentralized and sel.name != "uniform":
        raise ConfigError(
            f"selection.name: got {sel.name!r}, but {cfg.algorithm.name} is decentralized (every client trains every round); allowed: uniform"
        )
    if algorithm.decentralized and (
        (sel.clients_per_round or fed.num_clients) < fed.num_clients or (sel.fraction or 1.0) < 1.0
    ):
        field, value = (
            ("clients_per_round", sel.clients_per_round)
            if sel.clients_per_round is not None
            else ("fraction", sel.fraction)
        )
        raise ConfigError(
            f"selection.{field}: got {value!r}, but {cfg.algorithm.name} is decentralized (every client trains every "
            f"round; its neighbours are set by the algorithm's topology); allowed: unset, fraction 1.0, or "
            f"clients_per_round = {fed.num_clients}"
        )
    if cfg.runtime.threads is not None:
        torch.set_num_threads(cfg.runtime.threads)
    world = build_world(cfg, fed, device=_driver_device(cfg))
    blocks = getattr(world.build_model(ModelSize().as_config()), "depth_blocks", None)  # built (and cached) above
    depth = len(blocks()) if blocks is not None else None
    for i, tier in enumerate(tiers):
        if depth is not None and tier.size.depth is not None and tier.size.depth > depth:
            raise ConfigError(
                f"devices.tiers[{i}].depth: got {tier.size.depth} (tier {tier.name!r}), but model {cfg.model.name!r} has {depth} blocks; allowed: 1 to {depth}, or null (all)"
            )
    if cfg.selection.overcommit != 1.0 and algorithm.decentralized:
        raise ConfigError(
            f"selection.overcommit: got {cfg.selection.overcommit!r}, but {cfg.algorithm.name} is decentralized (every client trains every round); allowed: 1.0"
        )
    if clients is None:
        clients = ClientReports(
            num_train=split_sizes(fed.clients_train),
            num_test=split_sizes(fed.clients_test),
            label_counts=tuple(fed.label_counts(c) for c in range(fed.num_clients)),
        )
    devices = None
    if cfg.devices.profiles is not None:
        devices = build_devices(cfg, tiers, policy, world, clients.num_train, algorithm.local, round_target(cfg, fed.num_clients))
    try:
        fleet = Fleet(
            tiers=tuple(tiers),
            assignment=cfg.devices.assignment,
            policy=policy,
            seed=cfg.seed,
            label_counts=clients.label_counts,
            num_train=clients.num_train,
            num_test=clients.num_test,
            availability=Availability(cfg.devices.dropout, cfg.devices.unavailable),
            reported_tiers=clients.tiers,
            drop_weak=cfg.devices.drop_weak,
            **(
                {"profiles": devices.profiles, "capacity": devices.capacity, "memory_fit": devices.memory_fit, "fitted": devices.fitted}
                if devices is not None
                else {}
            ),
        )
    except ValueError as err:
        raise _error(err) from None
    if sel.clients_per_round is not None and cfg.devices.assignment == "fixed" and not clients.tiers:
        eligible = len(fleet.eligible(fleet.infos(1)))  # those the devices and the policy let train
        if sel.clients_per_round > eligible:
            allowed = f"1 to {eligible}" if eligible else "devices or a devices.policy that let some client train"
            raise ConfigError(
                f"selection.clients_per_round: got {sel.clients_per_round}, but only {eligible} of the {fed.num_clients} "
                f"clients can be selected (devices.policy {cfg.devices.policy!r}, their devices); allowed: {allowed}"
            )
    selector = build_selector(cfg, fed.num_clients)
    store = make_store(cfg.runtime.store, run_dir)
    built = executor(world, store) if executor is not None else build_executor(cfg, world, store)
    return Run(
        algorithm=algorithm,
        world=world,
        fleet=fleet,
        selector=selector,
        executor=built,
        rounds=cfg.rounds,
        seed=cfg.seed,
        run_dir=Path(run_dir),
        eval_every=cfg.eval.every,
        eval_clients=cfg.eval.clients,
        checkpoint_every=cfg.runtime.checkpoint_every,
        progress=cfg.logging.progress,
        client_rows=cfg.logging.client_rows,
        name=cfg.name,
        clock=devices.clock if devices is not None else None,
        devices_record=devices.record if devices is not None else None,
        aggregation=RobustRule(**cfg.aggregation.model_dump()),
        max_failed_rounds=cfg.runtime.max_failed_rounds,
        sinks=make_sinks(cfg),
    )
