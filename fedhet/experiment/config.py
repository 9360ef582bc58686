"""The experiment config: one YAML file, validated on load, with dotted overrides.

Every error names the field, the bad value and what is allowed, in one line, before any training
starts. Algorithm fields are the algorithm dataclass's own fields, so ``fedhet describe NAME``
and validation agree by construction.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedhet.core.registry import ALGORITHMS, DATASETS, MODELS, PARTITIONERS, SELECTORS, SERVER_OPTIMIZERS


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming field, value and what is allowed."""


class _Section(BaseModel):
    # no NaN or infinity in any number: either would only surface mid-run, as NaN weights or a hang
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # a NUL byte in a name or path fails only when the run folder or a file is opened
        if isinstance(v, str) and "\x00" in v:
            raise ValueError(f"got {v!r}, allowed: text without NUL characters")
        return v


class DataConfig(_Section):
    """The data: which dataset, and how it is split over clients."""

    dataset: str = Field("digits", description="the registered dataset to load (see fedhet list)")
    root: str | None = Field(None, description="the data folder (default: $FEDHET_DATA, else ~/.cache/fedhet/data)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the dataset's own options (fedhet describe DATASET)"
    )
    num_clients: int = Field(20, ge=1, description="clients the training set is split over")
    partitioner: str = Field(
        "iid", description="how the training set is split over clients: iid, dirichlet, shards, natural"
    )
    alpha: float | None = Field(
        None, gt=0, description="dirichlet: concentration of the label shares (smaller: more skew)"
    )
    min_size: int | None = Field(
        None, ge=0, description="dirichlet: redraw until every client has at least this many examples"
    )
    classes_per_client: int | None = Field(None, ge=1, description="shards: classes each client holds")
    client_test_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of each client's data held out as its own test split"
    )
    train_subset: int | None = Field(
        None, ge=1, description="use a seeded, stratified subset of this many training examples"
    )
    test_subset: int | None = Field(
        None, ge=1, description="evaluate on a seeded, stratified subset of this many test examples"
    )
    rotate_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of clients whose images are rotated by rotate_degrees (rotated-data clusters; images only)",
    )
    rotate_degrees: Literal[90, 180, 270] = Field(180, description="the rotation of those clients' images, in degrees")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return _known(v, DATASETS)

    @field_validator("partitioner")
    @classmethod
    def _partitioner(cls, v: str) -> str:
        return _known(v, PARTITIONERS)

    def partitioner_options(self) -> dict[str, Any]:
        opts = {"alpha": self.alpha, "min_size": self.min_size, "classes_per_client": self.classes_per_client}
        allowed = {
            "dirichlet": {"alpha", "min_size"},
            "shards": {"classes_per_client"},
            "iid": set(),
            "natural": set(),
        }.get(self.partitioner)
        out = {k: v for k, v in opts.items() if v is not None}
        if allowed is not None:
            for k in out:
                if k not in allowed:
                    raise ConfigError(
                        f"data.{k}: got {out[k]!r}, but partitioner {self.partitioner!r} takes no {k}; it takes: {', '.join(sorted(allowed)) or 'no options'}"
                    )
        if self.partitioner == "dirichlet" and "alpha" not in out:
            raise ConfigError("data.alpha: missing, allowed: a number > 0 (required by partitioner 'dirichlet')")
        if self.partitioner == "shards" and "classes_per_client" not in out:
            raise ConfigError(
                "data.classes_per_client: missing, allowed: an integer >= 1 (required by partitioner 'shards')"
            )
        return out


class ModelConfig(_Section):
    """The model every client trains (at its tier's size)."""

    name: str = Field("mlp", description="the registered model (see fedhet list)")
    options: dict[str, Any] = Field(default_factory=dict, description="the model's own options (fedhet describe MODEL)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _known(v, MODELS)


class ProfilesConfig(_Section):
    """Where each client's device profile (FLOP/s, memory, bandwidth, latency, online hours) comes from."""

    source: Literal["tiers", "flash", "file"] = Field(
        "tiers",
        description="tiers: each tier's device (a preset name or a profile mapping); flash: drawn from FLASH's measured phones and bandwidths in the data root; file: a CSV/JSON file, one row per client or per device type",
    )
    path: str | None = Field(None, description="source file: the CSV or JSON file of profiles")
    flops_per_score: float = Field(
        1e8, gt=0, description="source flash: FLOP/s per point of AI-Benchmark's float32 score (the calibration)"
    )
    memory_fraction: float = Field(
        0.25, gt=0, le=1, description="source flash: the share of a phone's RAM training may use"
    )
    latency: float = Field(0.1, ge=0, description="source flash: fixed seconds a round costs each phone")

    @model_validator(mode="after")
    def _path(self) -> ProfilesConfig:
        if self.source == "file" and not self.path:
            raise ValueError("devices.profiles.path: missing, allowed: a .csv or .json file (required by source 'file')")
        if self.source != "file" and self.path:
            raise ValueError(f"devices.profiles.path: got {self.path!r}, but source {self.source!r} reads no file; allowed: source file")
        return self


class AvailabilityConfig(_Section):
    """When clients are online, in simulated time (needs device profiles)."""

    daily_hours: float | None = Field(
        None,
        gt=0,
        le=24,
        description="every client online this many hours a day from its profile's online_start (unset there: an hour drawn per client); unset: the profiles' online_hours",
    )
    trace: str | None = Field(
        None, description="a CSV/JSON file of rows client, start, end (seconds): each client's online intervals"
    )
    period: float | None = Field(
        None, gt=0, description="the trace repeats every this many seconds (unset: it runs once)"
    )

    @model_validator(mode="after")
    def _one(self) -> AvailabilityConfig:
        if self.trace and self.daily_hours is not None:
            raise ValueError("devices.availability: give daily_hours or trace, not both")
        if self.period is not None and not self.trace:
            raise ValueError(f"devices.availability.period: got {self.period!r}, but no trace is given; allowed: with trace")
        return self


class DevicesConfig(_Section):
    """The devices: tiers of model sizes, how clients get a tier, the baseline policies, dropouts and
    availability; with profiles, each device's speed, memory and bandwidth on a simulated clock."""

    tiers: str | list[dict[str, Any]] = Field(
        "a1", description='HeteroFL notation ("a2-b8") or a list of {name, width, depth, density, proportion, device}'
    )
    assignment: Literal["fixed", "dynamic"] = Field(
        "fixed", description="fixed: a client keeps its tier; dynamic: tiers are redrawn every round (HeteroFL)"
    )
    policy: Literal["auto", "tiered", "all_large", "all_small", "drop_weak"] = Field(
        "auto", description="auto (the algorithm's own), tiered, all_large, all_small or drop_weak"
    )
    drop_weak: Literal["after_selection", "before_selection"] = Field(
        "after_selection",
        description="with policy drop_weak: after_selection draws the round's clients from the whole population and leaves the weak ones out (the papers' DropWeak: strong clients take part as often as under any other policy); before_selection draws only among the strong clients",
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="probability that a selected client drops out of a round before reporting"
    )
    unavailable: float = Field(
        0.0, ge=0, lt=1, description="probability that a client is offline (cannot be selected) in a round"
    )
    profiles: ProfilesConfig | None = Field(
        None,
        description="each client's device profile (source tiers, flash or file); unset: tiers are labels and there is no simulated clock",
    )
    deadline: float | None = Field(
        None,
        gt=0,
        description="simulated seconds a round waits: later clients are stragglers (trained, not aggregated); with policy auto, a size must fit it (needs profiles)",
    )
    availability: AvailabilityConfig | None = Field(
        None, description="when clients are online in simulated time: daily_hours or a trace (needs profiles)"
    )

    @model_validator(mode="after")
    def _clock(self) -> DevicesConfig:
        for name in ("deadline", "availability"):
            if getattr(self, name) is not None and self.profiles is None:
                raise ValueError(f"devices.{name}: given, but there is no simulated clock without device profiles; allowed: with devices.profiles")
        if self.profiles is not None and self.assignment == "dynamic":
            raise ValueError(
                "devices.assignment: got 'dynamic', but with devices.profiles a client's device decides its tier; allowed: fixed"
            )
        return self


class LocalConfig(_Section):
    """How each client trains in a round."""

    epochs: int = Field(1, ge=1, description="local epochs over the client's training split")
    batch_size: int = Field(32, ge=1, description="mini-batch size")
    lr: float = Field(0.05, gt=0, description="client learning rate in round 1")
    lr_decay: float = Field(1.0, gt=0, le=1, description="client learning rate multiplied by this every round")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    max_steps: int | None = Field(
        None, ge=1, description="stop local training after this many steps (unset: full epochs)"
    )
    grad_clip: float | None = Field(
        None, gt=0, description="clip the gradient's global L2 norm to this (unset: no clipping)"
    )
    lr_milestones: list[int] = Field(
        default_factory=list, description="rounds at which the client learning rate is multiplied by lr_gamma"
    )
    lr_gamma: float = Field(0.1, gt=0, le=1, description="factor applied at each of lr_milestones")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="client optimizer: sgd, adam or adamw")


class ServerConfig(_Section):
    """The server optimizer applied to the aggregated update (its hyperparameters as further keys)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        "fedavg",
        description="server optimizer applied to the averaged update: fedavg, fedavgm, fedadam, fedyogi, fedadagrad (its own hyperparameters as further keys)",
    )
    clip: float | None = Field(
        None, gt=0, description="clip the server's pseudo-gradient to this L2 norm (unset: no clipping)"
    )
    noise_std: float = Field(
        0.0, ge=0, description="Gaussian noise of this standard deviation added to the pseudo-gradient"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _known(v, SERVER_OPTIMIZERS)


class AlgorithmConfig(_Section):
    """The federated algorithm (its fields as further keys)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        "fedavg", description="the registered algorithm (its fields as further keys; fedhet describe NAME)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _known(v, ALGORITHMS)


class SelectionConfig(_Section):
    """Which clients take part in each round."""

    name: str = Field(
        "uniform",
        description="the registered client selector: uniform, Power-of-Choice (pow-d, cpow-d, rpow-d), divfl, or a plugin's",
    )
    clients_per_round: int | None = Field(
        None, ge=1, description="clients selected each round (unset with fraction unset: all)"
    )
    fraction: float | None = Field(None, gt=0, le=1, description="share of the eligible clients selected each round")
    candidates: int | None = Field(
        None, ge=1, description="Power-of-Choice: d, the candidates sampled by data size (default 2 m)"
    )
    batch: int | None = Field(None, ge=1, description="cpow-d: the examples a candidate scores its loss on")
    refresh_every: int | None = Field(
        None, ge=0, description="DivFL: re-probe every client's gradient every this many rounds (0: first round only)"
    )
    overcommit: float = Field(
        1.0,
        ge=1,
        description="select this many times the clients a round needs and aggregate the first to finish (FedScale's 1.3; needs devices.profiles)",
    )

    options: dict[str, Any] = Field(
        default_factory=dict, description="a plugin selector's own options (fedhet describe SELECTOR)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _known(v, SELECTORS)

    @model_validator(mode="after")
    def _one_of(self) -> SelectionConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError(
                f"got clients_per_round={self.clients_per_round} and fraction={self.fraction}, allowed: one of them"
            )
        return self


class AggregationConfig(_Section):
    """How the server combines a round's updates: the plain mean, or a robust rule
    (``fedhet.aggregation.robust``; with sub-models, per element over the clients holding it)."""

    rule: str = Field(
        "mean",
        description="mean, median (coordinate-wise), trimmed_mean, krum, multi_krum or geometric_median (RFA)",
    )
    trim: float = Field(0.1, description="trimmed_mean: fraction of each element's values cut from each end (0 <= trim < 0.5)")
    byzantine: int | None = Field(
        None, description="krum, multi_krum: f, the attackers the rule is sized for (unset: floor((n - 3) / 2) of the round's n updates)"
    )
    select: int | None = Field(None, description="multi_krum: m, the lowest-scored updates averaged (unset: n - f)")
    clip: float | None = Field(None, description="scale each client's update to at most this L2 norm before the rule (unset: no clipping)")
    norm_bound: float | None = Field(
        None,
        description="reject (as a failure) an update whose L2 norm exceeds this times the round's median update norm (unset: no check)",
    )
    iterations: int = Field(10, description="geometric_median: at most this many Weiszfeld steps")
    smoothing: float = Field(1e-6, description="geometric_median: the smallest distance a client's weight divides by")

    @model_validator(mode="after")
    def _rule(self) -> AggregationConfig:
        from fedhet.aggregation.robust import RobustRule

        RobustRule(**self.model_dump())
        defaults = AggregationConfig.model_construct()
        uses = {"trim": ("trimmed_mean",), "byzantine": ("krum", "multi_krum"), "select": ("multi_krum",),
                "iterations": ("geometric_median",), "smoothing": ("geometric_median",)}  # fmt: skip
        for key, rules in uses.items():
            if getattr(self, key) != getattr(defaults, key) and self.rule not in rules:
                raise ValueError(f"aggregation.{key}: got {getattr(self, key)!r}, but rule {self.rule!r} does not use it; allowed: with rule {' or '.join(rules)}")
        return self


class AdversariesConfig(_Section):
    """Simulated attackers (``fedhet.simulation.attacks``): a seeded share of the clients."""

    fraction: float = Field(0.0, description="share of the clients that attack (drawn once per run from the seed)")
    kind: str = Field("sign_flip", description="sign_flip, scale, gaussian, constant (model poisoning) or label_flip (data poisoning)")
    factor: float | None = Field(None, description="sign_flip (default 1): send θ - factor·Δ; scale (default 10): send θ + factor·Δ")
    std: float | None = Field(None, description="gaussian: send θ + N(0, std²) per element (default 1)")
    value: float | None = Field(None, description="constant: send this value in every element (default 1e30)")

    @model_validator(mode="after")
    def _attack(self) -> AdversariesConfig:
        from fedhet.simulation.attacks import Attack

        Attack(**self.model_dump())
        return self


class CommunicationConfig(_Section):
    """How uploads travel (FedPAQ's quantization)."""

    levels: int | None = Field(
        None,
        ge=1,
        le=2**31 - 1,
        description="FedPAQ: quantize every upload with s levels (unbiased, QSGD-style); unset: send it as it is",
    )


class RayConfig(_Section):
    """The Ray executor's options (runtime.executor: ray): where the actors run and what each gets."""

    address: str | None = Field(
        None, description="unset: start a local Ray (127.0.0.1 only); auto or HOST:PORT: join a running cluster"
    )
    workers: int | None = Field(
        None, ge=1, description="actors (default: runtime.workers, else one per CPU of the machine or cluster)"
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved for each actor")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="fractional: 0.5 puts two actors on one GPU (their clients train on it)"
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="a share whose actor died is run again this many times in a call, then its clients fail that round",
    )
    data: Literal["auto", "driver", "node"] = Field(
        "auto",
        description="driver: ship the driver's data through the object store; node: each actor loads it from data.root on its own node; auto: node when joining a cluster, driver otherwise",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in v:
            raise ValueError(
                f"got {v!r}, allowed: unset (a local Ray), auto, or HOST:PORT of a running Ray cluster's head node"
            )
        return v


class FlowerConfig(_Section):
    """A deployed run's options (fedhet flower app, trial): how long the server waits for nodes."""

    timeout: float = Field(
        600.0,
        gt=0,
        description="seconds a request waits for its node's answer; a node that does not answer in time is left out of that round",
    )
    wait: float = Field(
        300.0, gt=0, description="seconds the server waits at the start for a node of every client (data.num_clients)"
    )


class RuntimeConfig(_Section):
    """Where and how the clients run: the executor, devices, threads, checkpoints and client state."""

    executor: Literal["sequential", "parallel", "ray"] = Field(
        "sequential", description="sequential, parallel (worker processes) or ray"
    )
    workers: int | None = Field(
        None, ge=1, description="worker processes (parallel) or actors (ray); default: one per CPU"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, le=4096, description="torch threads of the driver and of each worker")
    checkpoint_every: int = Field(1, ge=1, description="write a checkpoint every this many rounds")
    max_failed_rounds: int | None = Field(
        None, ge=1, description="stop the run after this many rounds in a row in which no client's result could be used (unset: never)"
    )
    store: Literal["memory", "disk"] = Field(
        "memory",
        description="where personal client state lives: in memory, or on disk under the run folder (thousands of clients)",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray executor's options (runtime.ray section)")
    flower: FlowerConfig = Field(
        default_factory=FlowerConfig, description="used by a deployed run only (the simulation executors ignore it)"
    )

    @model_validator(mode="after")
    def _ray_options(self) -> RuntimeConfig:
        if self.executor != "ray":
            # a dumped config spells out the defaults: only a value that differs from one is refused
            default = RayConfig()
            changed = [k for k in RayConfig.model_fields if getattr(self.ray, k) != getattr(default, k)]
            if changed:
                key = changed[0]
                raise ValueError(
                    f"got ray.{key}={getattr(self.ray, key)!r} with executor {self.executor!r}; allowed: runtime.ray only with runtime.executor=ray"
                )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"got {v!r}, allowed: auto, cpu, cuda, cuda:N")
        return v


class EvalConfig(_Section):
    """When and what is evaluated."""

    every: int = Field(1, ge=1, description="evaluate every this many rounds (and in the last one)")
    clients: bool = Field(True, description="also evaluate each client on its own held-out split")
    group_clients: bool = Field(
        True,
        description="evaluate clients sent the same model together: their small test splits through shared "
        "forwards of up to 256 examples (models whose examples do not interact, classification); the metrics are "
        "those of one client at a time to float rounding, the same on every executor; false: one client at a time",
    )


class LoggingConfig(_Section):
    """Where run folders go, how progress shows, and where else the metrics go (TensorBoard, MLflow)."""

    dir: str = Field("runs", description="folder under which run folders are created")
    progress: Literal["auto", "bar", "lines", "off"] = Field(
        "auto", description="auto (a bar on a terminal, lines otherwise), bar, lines or off"
    )

    client_rows: int | Literal["eval"] = Field(
        1,
        description="which rounds write per-client rows to clients.jsonl: 1 every round, K every K-th round, "
        "eval only rounds that evaluate the clients; rounds that evaluate the clients always write theirs "
        "(the per-client distribution), and metrics.jsonl always has every round's summaries",
    )

    sinks: list[str] = Field(
        default_factory=list,
        description="where else each round's metrics go: tensorboard (event files; fedhet run prints the "
        'tensorboard --logdir command), mlflow (a tracking store); each needs its extra: pip install "fedhet[tensorboard]", '
        '"fedhet[mlflow]"',
    )
    mlflow_uri: str | None = Field(
        None,
        description="the MLflow tracking URI (unset: sqlite:///DIR/mlruns/mlflow.db, DIR being logging.dir, with "
        "the artifacts in DIR/mlruns/artifacts)",
    )

    @field_validator("sinks", mode="before")
    @classmethod
    def _sink_list(cls, v: Any) -> Any:
        # logging.sinks=tensorboard or =tensorboard,mlflow on the command line
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return [] if v is None else v

    @field_validator("sinks")
    @classmethod
    def _sinks(cls, v: list[str]) -> list[str]:
        from fedhet.experiment.sinks import SINKS, missing_package

        for name in v:
            if name not in SINKS:
                raise ValueError(f"got {name!r}, allowed: a list of {', '.join(SINKS.names())}")
        if len(set(v)) < len(v):
            raise ValueError(f"got {v!r}, allowed: each sink once")
        for name in v:
            missing = missing_package(name)
            if missing:
                raise ValueError(missing)
        return v

    @field_validator("progress", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false
        return "off" if v is False else v

    @field_validator("client_rows")
    @classmethod
    def _every(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"got {v}, allowed: an integer >= 1 or eval")
        return v


class ExperimentConfig(_Section):
    plugins: list[str] = Field(
        default_factory=list,
        description="modules imported before the config is checked, which register your own datasets, models, algorithms or partitioners (my_package.my_module; see docs/plugins.md)",
    )
    name: str = Field("experiment", description="the run's name (its folder is NAME-TIME under logging.dir)")
    seed: int = Field(0, description="seed of every random draw (data split, initialisation, selection, training)")
    rounds: int = Field(10, ge=1, description="communication rounds")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    communication: CommunicationConfig = Field(default_factory=CommunicationConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    adversaries: AdversariesConfig = Field(default_factory=AdversariesConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


def _known(value: str, registry: Any) -> str:
    if value not in registry:
        raise ValueError(f"got {value!r}, allowed: {', '.join(registry.names())}")
    return value


def _format(err: ValidationError, data: dict[str, Any]) -> str:
    e = err.errors()[0]
    union = _union_field(e["loc"])
    if union is not None:  # every member of a union failed: pydantic's location names a member's type
        loc, described = union
        value: Any = data
        for part in e["loc"][: len(loc.split("."))]:
            value = value.get(part) if isinstance(value, dict) else None
        return f"{loc}: got {value!r}, allowed: {described}"
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        section = _walk(ExperimentConfig, e["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section is not None else "see fedhet describe"
        return f"{loc}: unknown key; allowed: {allowed}"
    value = e.get("input")
    msg = msg.removeprefix("Value error, ")
    if re.match(r"^[a-z_]+(\.[a-z_]+)+[:( ]", msg):  # a check across fields that names its own field
        return msg
    if msg.startswith("got "):
        return f"{loc}: {msg}"
    return f"{loc}: got {value!r}, allowed: {msg[0].lower() + msg[1:]}"


def _union_field(loc: tuple[Any, ...]) -> tuple[str, str] | None:
    """The dotted name and description of the field in ``loc`` whose type is a union of several
    types (not ``X | None``), when ``loc`` goes on past it into one of its members."""
    model: Any = ExperimentConfig
    for i, part in enumerate(loc):
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        members = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        if len(members) > 1 and i + 1 < len(loc):
            return ".".join(str(p) for p in loc[: i + 1]), field.description or " or ".join(map(str, members))
        model = members[0] if len(members) == 1 else field.annotation
    return None


def _walk(model: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        members = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        model = members[0] if len(members) == 1 else field.annotation  # a section that may be unset
    return model if hasattr(model, "model_fields") else None


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars (1, 0.5, true, null, [1, 2]) or a plain string."""
    if text.strip().lower() in ("on", "off", "yes", "no", "y", "n"):
        return text.strip()  # YAML 1.1 would turn these words into booleans
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; a number is meant
        try:
            return float(value) if any(c in value for c in ".eE") or value.lower() in ("inf", "nan") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key in {key.strip()!r}; expected dotted.key=value")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = parse_value(text)
    return data


def validate(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a config mapping, including the algorithm and server fields and their combinations."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"plugins: got {plugins!r}, allowed: a list of module names such as [my_package.my_module]")
    from fedhet.core.plugins import PluginError, load_plugins

    try:
        load_plugins(plugins, origin="plugins")
    except PluginError as err:
        raise ConfigError(str(err)) from None
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, data)) from None
    cfg.data.partitioner_options()
    clients, per_round = cfg.data.num_clients, cfg.selection.clients_per_round
    if per_round is not None and per_round > clients:
        raise ConfigError(
            f"selection.clients_per_round: got {per_round}, but data.num_clients is {clients}; allowed: 1 to {clients} (or unset: every eligible client)"
        )
    # the algorithm, server optimizer, tiers and policy are built once here so that every error
    # surfaces before training
    from fedhet.experiment.build import build_algorithm, build_fleet_parts

    build_algorithm(cfg)
    build_fleet_parts(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p)
        if loaded is None:  # an empty file, or only comments: a typo'd path must not run every default
            raise ConfigError(
                f"config file {str(p)!r} is empty; allowed: a mapping of sections ({', '.join(ExperimentConfig.model_fields)}), or no file for every default"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r}: got a {type(loaded).__name__} ({_short(loaded)}), allowed: a mapping of sections ({', '.join(ExperimentConfig.model_fields)})"
            )
        data = loaded
    return validate(apply_overrides(data, overrides or []))


def read_yaml(path: Path) -> Any:
    """The YAML document in the file ``path``; ConfigError in one line when it cannot be read."""
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} is not a file; allowed: a YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); allowed: a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {problem}{where}") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def algorithm_fields(name: str) -> list[dataclasses.Field[Any]]:
    cls = ALGORITHMS.get(name)
    return [f for f in dataclasses.fields(cls) if f.name not in ("local", "server")]
