"""The one round loop in fedhet.

    select clients -> configure -> local_update (executor) -> aggregate -> evaluate / log / checkpoint

Algorithms fill in the stages; nothing else loops over rounds. A run's state between rounds is
``(round, algorithm state, selector state, client store)``, all of it in the checkpoint; every random
draw is keyed by (seed, round, client id), so a resumed run gives the same bits as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedhet import __version__
from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.robust import RobustRule
from fedhet.aggregation.robust import screen as robust_screen
from fedhet.communication.quantize import encoded_nbytes
from fedhet.core import rng
from fedhet.core.algorithm import Algorithm, ClientStatistics, ServerSetup, load_params, trainable_names
from fedhet.core.messages import ClientInfo, ClientTask
from fedhet.core.types import Config, Params, config_key, params_nbytes
from fedhet.devices.capacity import TRAIN_FLOPS_FACTOR, expected_examples
from fedhet.devices.clock import Clock, Demand, RoundPlan
from fedhet.devices.fleet import Fleet
from fedhet.experiment.checkpoint import load_checkpoint, save_checkpoint
from fedhet.experiment.clusters import adjusted_rand, cluster_purity, groups_as_mapping
from fedhet.experiment.config import ConfigError
from fedhet.experiment.logging import DEVICES, Progress, RunLog
from fedhet.models.cost import ModelCost, model_cost
from fedhet.selection.base import ClientSelector
from fedhet.simulation.executors import Executor, RoundOutcome, release_free_memory
from fedhet.simulation.world import ClientWorld
from fedhet.training.local import evaluate


@dataclass
class Run:
    """Everything a run needs that does not change across rounds."""

    algorithm: Algorithm[Any]
    world: ClientWorld
    fleet: Fleet
    selector: ClientSelector
    executor: Executor
    rounds: int
    seed: int
    run_dir: Path
    eval_every: int = 1
    eval_clients: bool = True
    checkpoint_every: int = 1
    progress: str = "auto"
    #: which rounds write per-client rows: every K-th (an int) or only those that evaluate the clients ("eval")
    client_rows: int | str = 1
    name: str = "run"
    #: called after each round with the metrics row (e.g. by tests to stop a run part-way)
    on_round: Callable[[int, dict[str, Any]], None] | None = None
    #: the simulated clock of a run with device profiles (``None``: rounds take no simulated time)
    clock: Clock | None = None
    #: what ``devices.json`` records: each client's profile and capacity, each size's needs
    devices_record: dict[str, Any] | None = None
    #: how the round's updates are combined (``None`` or an inactive rule: the algorithm's own mean)
    aggregation: RobustRule | None = None
    #: stop after this many rounds in a row with no usable client result (``None``: never)
    max_failed_rounds: int | None = None
    #: where else the rounds go (``logging.sinks``: TensorBoard, MLflow), besides the run folder
    sinks: Sequence[Any] = ()
    _costs: dict[Any, ModelCost] = field(default_factory=dict, repr=False)


def _client_rows_due(client_rows: int | str, rnd: int, clients_evaluated: bool) -> bool:
    """Whether round ``rnd`` writes its per-client rows (``logging.client_rows``). A round that
    evaluated the clients always does: its rows hold the per-client distribution."""
    return clients_evaluated or (isinstance(client_rows, int) and rnd % client_rows == 0)


class RunStopped(RuntimeError):
    """The run cannot go on (``runtime.max_failed_rounds`` rounds in a row had no usable result)."""


@dataclass
class RunResult:
    params: Params
    state: Any
    history: list[dict[str, Any]]
    run_dir: Path


def _cost(run: Run, config: Config) -> ModelCost:
    key = config_key(config)
    if key not in run._costs:
        run._costs[key] = model_cost(run.world.build_model(config), run.world.dataset.input_shape)
    return run._costs[key]


def demand(run: Run, task: ClientTask, info: ClientInfo, sizes: dict[tuple[int, int], tuple[int, int]] | None = None) -> Demand:
    """What a client's round asks of its device on the clock: the task's bytes down; the same
    parameters back up (their quantized size with ``communication.levels``); and 3x the forward
    FLOPs of the task's model per example, over the examples its local training covers (``epochs``
    passes over its data, at most ``max_steps`` batches). ``sizes``: see :func:`transfer_bytes`."""
    down, up = transfer_bytes(run, task, sizes)
    flops = TRAIN_FLOPS_FACTOR * _cost(run, task.config).flops_per_sample * expected_examples(info.num_train, run.algorithm.local)
    return Demand(float(down), float(flops), float(up))


def transfer_bytes(run: Run, task: ClientTask, sizes: dict[tuple[int, int], tuple[int, int]] | None = None) -> tuple[int, int]:
    """A task's bytes down and its result's bytes up (quantized with ``communication.levels``).
    ``sizes`` keeps them by the task's parameter dicts for one round: thousands of clients sent
    the very same dicts are sized once."""
    key = (id(task.params), id(task.extras) if task.extras else 0)  # each task may have its own empty extras
    if sizes is not None and key in sizes:
        return sizes[key]
    down = params_nbytes(task.params) + params_nbytes(task.extras)
    levels = run.world.upload_levels
    if levels is None:
        up = params_nbytes(task.params)
    else:
        up = sum(encoded_nbytes(v.numel(), levels) if v.is_floating_point() else v.numel() * v.element_size() for v in task.params.values())
    if sizes is not None:
        sizes[key] = (down, up)
    return down, up


def _wait_for_online(run: Run, rnd: int, now: float, eligible: list[ClientInfo]) -> tuple[float, list[ClientInfo]]:
    """The eligible clients online at ``now``; when none is, the clock first moves on to the next
    time one comes online. Returns the (possibly later) time and those clients."""
    assert run.clock is not None
    online = [c for c in eligible if run.clock.online(c.id, now)]
    if online or not eligible:
        return now, online
    later = run.clock.next_online([c.id for c in eligible], now)
    if later is None:
        raise ConfigError(
            f"devices.availability: no eligible client is ever online again after simulated time {now:.4g} s (round {rnd}); "
            "allowed: a trace that covers every round, or a period to repeat it"
        )
    return later, [c for c in eligible if run.clock.online(c.id, later)]


def _summary(values: Sequence[float], prefix: str) -> dict[str, float]:
    """Mean, median, 10th percentile and minimum across clients, and the fairness measures of
    q-FFL: the variance, the mean of the worst 10% (at least one client) and Jain's index
    ``(Σx)² / (n·Σx²)`` (1: all equal; 1/n: one client has everything)."""
    vals = sorted(v for v in values if v == v)
    if not vals:
        return {}
    n = len(vals)
    mean = sum(vals) / n
    p10 = vals[max(0, int(0.1 * (n - 1)))]
    worst = vals[: max(1, math.ceil(0.1 * n))]
    squares = sum(v * v for v in vals)
    return {
        f"{prefix}_mean": mean,
        f"{prefix}_median": statistics.median(vals),
        f"{prefix}_p10": p10,
        f"{prefix}_min": vals[0],
        f"{prefix}_var": sum((v - mean) ** 2 for v in vals) / n,
        f"{prefix}_worst10": sum(worst) / len(worst),
        f"{prefix}_jain": (sum(vals) ** 2) / (n * squares) if squares > 0 else 1.0,
    }


class FederatedQuery(ClientStatistics):
    """``ClientStatistics`` for one eval target: every client of the round answers
    ``Algorithm.probe`` about the target's model on its own training data, through the run's
    executor (so the same query runs in simulation and on deployed nodes); the answers are summed in
    client-id order. A client that cannot answer, or whose answer's shape or dtype differs from what
    most clients answered (a misbehaving client), is left out, with a warning."""

    def __init__(self, run: Run, rnd: int, infos: Sequence[ClientInfo], params: Params, config: Config) -> None:
        self.run, self.rnd, self.infos, self.params, self.config = run, rnd, infos, params, config
        self._answers: dict[str, torch.Tensor] = {}

    def total(self, what: str) -> torch.Tensor:
        if what not in self._answers:
            tasks = {c.id: ClientTask(round=self.rnd, params=self.params, config=self.config) for c in self.infos}
            answers = self.run.executor.probe(self.run.algorithm, tasks, {c.id: c for c in self.infos}, what)
            kinds = Counter((tuple(v.shape), v.dtype) for v in answers.values() if not isinstance(v, str))
            usual = max(kinds, key=kinds.__getitem__) if kinds else None  # the first most common
            total: torch.Tensor | None = None
            for cid in sorted(answers):
                value = answers[cid]
                if not isinstance(value, str) and (tuple(value.shape), value.dtype) != usual:
                    value = f"round {self.rnd}, client {cid}: {what}: an answer of shape {tuple(value.shape)} and {value.dtype}, most clients answered {usual}"
                if isinstance(value, str):
                    print(f"warning: client left out of a federated query: {value}", flush=True, file=sys.stderr)
                    continue
                total = value.clone() if total is None else total + value
            if total is None:
                raise RuntimeError(f"round {self.rnd}: no client answered the federated query {what!r}")
            self._answers[what] = total
        return self._answers[what]


def evaluate_round(
    run: Run, state: Any, rnd: int, infos: list[ClientInfo]
) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
    """Global targets on the global test set; each client on its own held-out split (for personalized
    algorithms, its own model: the personalized evaluation).

    Every metric of the data's task is logged per target (``eval/<target>/<metric>``); clients are
    summarised by the task's headline metric (``clients/<metric>_mean``, ``_median``, ``_p10``,
    ``_min``), whose name is the row's ``metric`` entry. Also returned: each client's metrics, which
    the loop writes to ``clients.jsonl`` as ``eval_<metric>`` (the distribution across clients)."""
    primary = run.world.dataset.task.primary
    row: dict[str, Any] = {"metric": primary}
    alg = run.algorithm
    for name, (params, config) in alg.eval_targets(state).items():
        model = run.world.build_model(config)
        load_params(model, params)
        model = alg.eval_model(model, FederatedQuery(run, rnd, infos, params, config))
        for k, v in evaluate(model, run.world.dataset.test, device=run.world.torch_device).items():
            if k not in ("examples", "score"):
                row[f"eval/{name}/{k}"] = v
        # the width each target runs at (an ensemble's is its number of bases times theirs)
        row[f"eval/{name}/width"] = float(config.get("width", 1.0)) * int(config.get("ensemble", 1))
    assignment = alg.client_clusters(state)
    groups = getattr(run.world.dataset, "client_groups", ())
    if assignment:
        row["clusters/count"] = float(len(set(assignment.values())))
        if len(set(groups)) > 1:
            truth = groups_as_mapping(groups)
            known = {c: k for c, k in assignment.items() if c in truth}
            row["clusters/purity"] = cluster_purity(known, truth)
            row["clusters/ari"] = adjusted_rand(known, truth)
    per_client: dict[int, dict[str, float]] = {}
    if run.eval_clients:
        tasks = alg.configure_eval(state, rnd, infos)
        by_id = {c.id: c for c in infos}
        results = run.executor.evaluate(alg, tasks, by_id)
        accs, per_tier = [], defaultdict(lambda: defaultdict(list))
        failed = 0
        for cid, m in results.items():
            if isinstance(m, str) or m.get("examples", 0) == 0:
                failed += isinstance(m, str)
                continue
            accs.append(m[primary])
            per_client[cid] = {f"eval_{k}": v for k, v in m.items() if k != "score"}
            for k, v in m.items():
                if k not in ("examples", "score", "loss") and v == v:
                    per_tier[by_id[cid].tier][k].append(v)
        row.update(_summary(accs, f"clients/{primary}"))
        # per tier, the mean of every metric of the task (e.g. F1 per entity type)
        for tier, metrics in sorted(per_tier.items()):
            for k, vals in metrics.items():
                row[f"clients/tier_{tier}/{k}_mean"] = sum(vals) / len(vals)
        if failed:
            row["clients/eval_failures"] = float(failed)
    return row, per_client


def init_state(run: Run) -> Any:
    infos = run.fleet.infos(1)
    config = run.fleet.global_size.as_config()
    params = run.world.fresh_params(config)
    setup = ServerSetup(
        params=params,
        trainable=trainable_names(run.world.build_model(config)),
        clients=infos,
        global_size=run.fleet.global_size,
        generator=rng.generator(run.seed, "server_init"),
        build_model=run.world.build_model,
        sizes=run.fleet.sizes,
        initial_params=run.world.fresh_params,
        rounds=run.rounds,
    )
    try:
        return run.algorithm.init(setup)
    except ConfigError:
        raise
    except ValueError as err:  # the algorithm refuses this fleet or model: a configuration error, said in one line
        raise ConfigError(str(err)) from err


def _robust(run: Run) -> RobustRule | None:
    rule = run.aggregation
    return rule if rule is not None and rule.active else None


def accumulator(run: Run, state: Any, rnd: int) -> Accumulator:
    """The algorithm's accumulator for the round, combining by ``run.aggregation`` where set."""
    acc = run.algorithm.accumulator(state, rnd)
    rule = _robust(run)
    if rule is not None and not acc.use_rule(rule):
        raise ConfigError(
            f"aggregation.rule: got {rule.rule!r} (clip {rule.clip}, norm_bound {rule.norm_bound}), but {run.algorithm.name} "
            "has no robust aggregation; allowed: the default mean without clip or norm_bound, or an algorithm of the FedAvg "
            "family or a sub-model method (fedavg, fedprox, feddyn, heterofl, fjord, splitmix, depthfl, inclusivefl, pfedmoe)"
        )
    return acc


def screen_round(run: Run, rnd: int, outcome: RoundOutcome) -> None:
    """Apply the robust rule's screen (``aggregation.norm_bound``) to the round's results: each
    rejected client becomes a failure with the reason, and its update leaves the accumulator."""
    rule = _robust(run)
    if rule is None:
        return
    rejected = robust_screen(outcome.acc.kept_updates(), rule)
    if not rejected:
        return
    outcome.acc.reject(rejected)
    for cid, reason in rejected.items():
        outcome.metrics.pop(cid, None)
        outcome.failures[cid] = f"round {rnd}, client {cid}: result rejected: {reason}"
    outcome.failures = {c: outcome.failures[c] for c in sorted(outcome.failures)}


def run_rounds(run: Run, resume: bool = False) -> RunResult:
    alg = run.algorithm
    start = 1
    now = 0.0  # simulated seconds since the run began
    checkpoint = load_checkpoint(run.run_dir) if resume else None
    if checkpoint is not None:
        start = checkpoint["round"] + 1
        state = checkpoint["algorithm_state"]
        sel_state = checkpoint["selector_state"]
        run.executor.store.restore(checkpoint["store"])
        now = float(checkpoint.get("sim_time", 0.0))
        failed_in_a_row = int(checkpoint.get("failed_in_a_row", 0))
    else:
        failed_in_a_row = 0  # rounds in a row without a usable result (runtime.max_failed_rounds)
        state = init_state(run)
        sel_state = run.selector.init(run.fleet.infos(1))
        run.executor.store.reset()
        if run.devices_record is not None:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / DEVICES).write_text(json.dumps(run.devices_record, indent=1) + "\n")
    if run.clock is not None:
        first = run.fleet.infos(start)
        out = sum(run.fleet.excluded(c) for c in first)
        tiers = Counter(c.tier for c in first if not run.fleet.excluded(c))
        print(
            f"devices: {out} of {len(first)} clients cannot train the size {run.fleet.policy} gives them and are excluded; "
            f"by tier: {', '.join(f'{t} {n}' for t, n in sorted(tiers.items()))} (see {DEVICES})",
            flush=True,
            file=sys.stderr,
        )
    accumulator(run, state, start)  # an algorithm without robust aggregation refuses a rule before training
    log = RunLog(run.run_dir, resume_round=start - 1 if resume else None, sinks=run.sinks)
    progress = Progress(run.rounds, start, run.name, run.progress)
    status = "failed"  # what the sinks are told at the end
    try:
        for rnd in range(start, run.rounds + 1):
            t0 = time.perf_counter()
            infos = run.fleet.infos(rnd)
            by_id = {c.id: c for c in infos}
            eligible = run.fleet.eligible(infos, rnd)
            waited = 0.0
            if run.clock is not None:
                later, eligible = _wait_for_online(run, rnd, now, eligible)
                waited, now = later - now, later
            probed = {"down": 0, "up": 0}

            def probe(cids: Sequence[int], what: str, batch: int | None = None) -> dict[int, Any]:
                # candidates get the model they would train, answer with a loss or a gradient
                ptasks = alg.configure(state, rnd, [by_id[c] for c in cids])
                answers = run.executor.probe(alg, ptasks, by_id, what, batch)
                out = {}
                for cid, value in answers.items():
                    probed["down"] += params_nbytes(ptasks[cid].params) + params_nbytes(ptasks[cid].extras)
                    if isinstance(value, str):
                        print(f"warning: client not a candidate: {value}", flush=True, file=sys.stderr)
                        continue
                    probed["up"] += value.numel() * value.element_size()
                    out[cid] = value
                return out

            selected, sel_state = run.selector.select(sel_state, rnd, eligible, run.seed, probe)
            if alg.decentralized and len(selected) < len(eligible):
                raise ValueError(
                    f"selection: {alg.name} is decentralized (every available client trains every round), "
                    f"but the selector picked {len(selected)} of {len(eligible)}; allowed: select every client "
                    "(leave selection.clients_per_round and selection.fraction unset)"
                )
            # drop_weak (after selection): selected weak clients are left out; nothing is sent to them
            weak = {cid for cid in selected if run.fleet.weak(by_id[cid])}
            reporting = [cid for cid in selected if cid not in weak and not run.fleet.dropped(cid, rnd)]
            tasks = alg.configure(state, rnd, [by_id[c] for c in selected if c not in weak])
            live = {cid: tasks[cid] for cid in reporting if cid in tasks}
            sizes: dict[tuple[int, int], tuple[int, int]] = {}  # this round's tasks' bytes, by their dicts
            plan: RoundPlan | None = None
            late_outcome = None
            if run.clock is not None:
                plan = run.clock.plan(rnd, now, {cid: demand(run, t, by_id[cid], sizes) for cid, t in live.items()})
                late = {cid: live[cid] for cid in plan.stragglers}
                live = {cid: live[cid] for cid in plan.on_time}
                if late:  # stragglers train (their devices' state moves on); their updates are never aggregated
                    late_outcome = run.executor.train(alg, late, by_id, accumulator(run, state, rnd))
            outcome = run.executor.train(alg, live, by_id, accumulator(run, state, rnd))
            screen_round(run, rnd, outcome)
            state, agg_metrics = alg.aggregate(state, rnd, outcome.acc)
            outcome.acc = outcome.acc.empty()  # the round's sums (a float64 model or more) are spent
            release_free_memory()  # ... and so are the partial sums it was combined from
            sel_state = run.selector.update(sel_state, rnd, outcome.metrics)

            row: dict[str, Any] = {"round": rnd, "selected": len(selected), "dropped": len(selected) - len(weak) - len(reporting)}
            if plan is not None:
                row["dropped"] += len(plan.went_offline)
            if run.fleet.policy == "drop_weak":
                row["left_out_weak"] = len(weak)
            client_rows = []
            total_examples = 0
            loss_sum = 0.0
            flops = 0.0
            for cid in selected:
                task = tasks.get(cid)
                cost = _cost(run, task.config) if task is not None else None
                crow: dict[str, Any] = {"round": rnd, "client": cid, "tier": by_id[cid].tier}
                if task is not None:
                    crow["bytes_down"] = transfer_bytes(run, task, sizes)[0]
                if cost is not None:
                    crow.update(params=cost.params, flops_per_sample=cost.flops_per_sample)
                if plan is not None and cid in plan.costs:
                    c = plan.costs[cid]
                    crow.update(sim_compute_s=c.compute, sim_comm_s=c.communication, sim_seconds=c.total)
                if late_outcome is not None and cid in late_outcome.metrics:
                    m = late_outcome.metrics[cid]
                    crow.update(m)
                    crow["straggler"] = True  # it finished after the round closed (sim_seconds > the round's sim_round_s)
                    # it trained (the FLOPs are spent); its upload is never received
                    flops += TRAIN_FLOPS_FACTOR * m.get("examples_seen", 0.0) * (cost.flops_per_sample if cost else 0)
                elif late_outcome is not None and cid in late_outcome.failures:
                    crow["error"] = late_outcome.failures[cid]
                elif plan is not None and cid in plan.went_offline:
                    crow["error"] = "went offline before finishing (devices.availability)"
                elif cid in outcome.metrics:
                    m = outcome.metrics[cid]
                    crow.update(m)
                    crow["bytes_up"] = outcome.bytes_up[cid]
                    seen = m.get("examples_seen", 0.0)
                    # training costs about 3x the forward FLOPs (forward + two backward products)
                    flops += TRAIN_FLOPS_FACTOR * seen * (cost.flops_per_sample if cost else 0)
                    total_examples += seen
                    loss_sum += m.get("train_loss", 0.0) * seen
                elif cid in outcome.failures:
                    crow["error"] = outcome.failures[cid]
                elif cid in weak:
                    crow["left_out"] = "devices.policy drop_weak: not the largest tier"
                else:
                    crow["error"] = "dropped out"
                client_rows.append(crow)
            row["trained"] = len(outcome.metrics)
            row["failures"] = len(outcome.failures)
            if run.world.attackers:
                row["adversaries"] = sum(1 for cid in outcome.metrics if cid in run.world.attackers)
                for crow in client_rows:
                    if crow["client"] in run.world.attackers:
                        crow["adversary"] = True
            row["train_loss"] = loss_sum / total_examples if total_examples else None
            row["bytes_down"] = sum(r.get("bytes_down", 0) for r in client_rows) + probed["down"]
            row["bytes_up"] = sum(outcome.bytes_up.values()) + probed["up"]
            if probed["down"]:
                # what the selector's probes cost (included in bytes_down / bytes_up)
                row["probe_bytes_down"], row["probe_bytes_up"] = probed["down"], probed["up"]
            if plan is not None:
                now += plan.duration
                row.update(sim_time=now, sim_round_s=plan.duration, stragglers=len(plan.stragglers), went_offline=len(plan.went_offline))
                if waited:
                    row["sim_wait_s"] = waited
            row["train_flops"] = flops
            row.update(agg_metrics)
            evaluating = rnd % run.eval_every == 0 or rnd == run.rounds
            tasks = live = {}  # nor does evaluation need the parameters sent this round
            if evaluating:
                eval_row, per_client = evaluate_round(run, state, rnd, infos)
                row.update(eval_row)
                for crow in client_rows:
                    crow.update(per_client.pop(crow["client"], {}))
                # clients evaluated but not selected this round get a row of their own
                client_rows.extend({"round": rnd, "client": cid, "tier": by_id[cid].tier, **m} for cid, m in sorted(per_client.items()))
            row["seconds"] = time.perf_counter() - t0
            for err in outcome.failures.values():
                print(f"warning: client left out of the round: {err}", flush=True, file=sys.stderr)
            failed_round = bool(outcome.failures) and not outcome.metrics
            failed_in_a_row = failed_in_a_row + 1 if failed_round else 0
            if failed_round:
                print(
                    f"warning: round {rnd}: all {len(outcome.failures)} clients that reported failed; "
                    f"the global model is unchanged ({failed_in_a_row} such round(s) in a row)",
                    flush=True,
                    file=sys.stderr,
                )
            due = _client_rows_due(run.client_rows, rnd, evaluating and run.eval_clients)
            log.log_round(row, client_rows if due else [], evaluated=evaluating and run.eval_clients)
            if rnd % run.checkpoint_every == 0 or rnd == run.rounds:
                save_checkpoint(
                    run.run_dir,
                    {
                        "round": rnd,
                        "algorithm_state": state,
                        "selector_state": sel_state,
                        "store": run.executor.store.snapshot(),
                        "sim_time": now,
                        "failed_in_a_row": failed_in_a_row,
                        "fedhet_version": __version__,
                    },
                )
                log.checkpoint(rnd)
            progress.update(rnd, row)
            if run.on_round is not None:
                run.on_round(rnd, row)
            if run.max_failed_rounds is not None and failed_in_a_row >= run.max_failed_rounds:
                last = next(iter(outcome.failures.values()))
                raise RunStopped(
                    f"runtime.max_failed_rounds: {failed_in_a_row} rounds in a row (to round {rnd}) had no usable client "
                    f"result; the run stops (--resume continues it from its last checkpoint). One of the last errors: {last}"
                )
        status = "finished"
    except KeyboardInterrupt:
        status = "stopped"
        raise
    finally:
        progress.close()
        log.close(status)
    return RunResult(params=alg.global_params(state), state=state, history=log.rows, run_dir=run.run_dir)
