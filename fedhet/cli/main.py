"""``fedhet run | compare | list | describe | report | masks | flower | pretrain``."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedhet.experiment.config import ConfigError
from fedhet.simulation.loop import RunStopped


def _run_dir(base: str, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{name}-{stamp}"
    i = 1
    while path.exists():
        path = Path(base) / f"{name}-{stamp}-{i}"
        i += 1
    return path


def _override_keys(overrides: list[str]) -> set[str]:
    return {o.partition("=")[0].strip() for o in overrides if "=" in o}


def _run_name(cfg: Any, config_path: str | None, overrides: list[str]) -> str:
    """The run's name: the config's, with the algorithm's name swapped for the one an
    ``algorithm.name=`` override chose (appended when the config's name does not contain it)."""
    keys = _override_keys(overrides)
    if "algorithm.name" not in keys or "name" in keys:
        return cfg.name
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text()) if config_path else None
    before = ((raw or {}).get("algorithm") or {}).get("name", "fedavg") if isinstance(raw, dict) else "fedavg"
    after = cfg.algorithm.name
    if before == after:
        return cfg.name
    return cfg.name.replace(before, after) if before in cfg.name else f"{cfg.name}-{after}"


def _check_resume(cfg: Any, saved: Path) -> None:
    """A resumed run's config must be the saved one, except runtime, logging and more rounds."""
    from fedhet.experiment.config import load_config

    # both through validation, so fields added since the run was saved compare at their defaults
    old = load_config(saved).model_dump(mode="json")
    new = cfg.model_dump(mode="json")
    for section in ("runtime", "logging", "plugins"):
        old.pop(section, None)
        new.pop(section, None)
    # a resumed run may be extended: nothing in a round depends on the total number of rounds
    if new.get("rounds", 0) < old.get("rounds", 0):
        raise ConfigError(
            f"--resume: rounds={new.get('rounds')} is fewer than the run's {old.get('rounds')}; allowed: >= {old.get('rounds')} (to extend it)"
        )
    old.pop("rounds", None)
    new.pop("rounds", None)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"--resume: the config differs from the run's saved config in: {', '.join(diff)}")


def cmd_run(args: argparse.Namespace) -> int:
    from fedhet.experiment.build import build_run
    from fedhet.experiment.checkpoint import load_checkpoint, missing_previous
    from fedhet.experiment.compare import summarize
    from fedhet.experiment.config import dump_config, load_config
    from fedhet.experiment.html_report import record_command
    from fedhet.experiment.logging import write_run_header
    from fedhet.experiment.report import print_table
    from fedhet.experiment.rundir import check_free, claim, refuse_earlier_run
    from fedhet.simulation.loop import run_rounds

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"runtime.device={args.device}")
    if args.progress:
        overrides.append(f"logging.progress={args.progress}")
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"--resume: {str(run_dir)!r} has no config.yaml; allowed: a run directory fedhet wrote")
        if args.run_dir:
            raise ConfigError(
                "--resume and --run-dir: got both; allowed: --resume RUN_DIR alone (the run continues in its folder)"
            )
        if args.overwrite:
            raise ConfigError(
                "--resume and --overwrite: got both; allowed: --resume RUN_DIR to continue a run, or --overwrite to start one afresh"
            )
        # without a config file the run continues from its own saved config (overrides still apply)
        cfg = _with_plugins(load_config(args.config or saved, overrides), args.plugin)
        _check_resume(cfg, saved)
        done = load_checkpoint(run_dir, previous=args.from_previous)
        if args.from_previous and done is None:
            raise ConfigError(missing_previous(run_dir))
        if done is not None and done["round"] >= cfg.rounds:
            print(
                f"run {run_dir} is finished: {done['round']} of {cfg.rounds} rounds; pass rounds=N (N > {done['round']}) to extend it"
            )
            return 0
    else:
        if args.from_previous:
            raise ConfigError("--from-previous: given without --resume; allowed: fedhet run --resume RUN_DIR --from-previous")
        cfg = _with_plugins(load_config(args.config, overrides), args.plugin)
        cfg = cfg.model_copy(update={"name": _run_name(cfg, args.config, overrides)})
        run_dir = Path(args.run_dir) if args.run_dir else _run_dir(cfg.logging.dir, cfg.name)
    if args.check:
        return _check_run(cfg, run_dir)
    # a folder another run writes, or an earlier run's, is refused before the data are loaded
    check_free(run_dir)
    if not args.resume and not args.overwrite:
        refuse_earlier_run(run_dir, "--run-dir", resume_hint=True)
    run = build_run(cfg, run_dir)  # loads the data: errors surface before anything is written
    try:
        with claim(run_dir, fresh=not args.resume, overwrite=args.overwrite, from_previous=args.from_previous):
            write_run_header(run_dir, dump_config(cfg), run.world.dataset)
            record_command(run_dir, getattr(args, "command_line", None))
            print(f"run directory: {run_dir}", file=sys.stderr)
            for sink in run.sinks:  # where the live view is: TensorBoard's folder, MLflow's store
                if hasattr(sink, "view"):
                    print(sink.view(run_dir, resume=bool(args.resume)), file=sys.stderr)
            print(run.world.dataset.summary(), file=sys.stderr)
            started = time.perf_counter()
            result = run_rounds(run, resume=bool(args.resume))
    finally:
        run.executor.close()
    last = result.history[-1] if result.history else {}
    metric = last.get("metric") or "accuracy"
    shown = {
        k: v
        for k, v in last.items()
        if (k.startswith("eval/") or k.startswith(f"clients/{metric}")) and isinstance(v, float)
    }
    print("final: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if result.history:
        print_table(cfg.name, [summarize(cfg.algorithm.name, result.history, time.perf_counter() - started)])
    print(f"run folder: {run_dir}")
    return 0


def _check_run(cfg: Any, run_dir: Path) -> int:
    """``fedhet run --check``: the run built as ``fedhet run`` builds it (config, algorithm, data,
    model, devices, selector) and the algorithm's initial state, in a temporary folder, without
    starting workers or training."""
    import tempfile

    from fedhet.experiment.build import build_run, check_executor
    from fedhet.simulation.executors import SequentialExecutor
    from fedhet.simulation.loop import accumulator, init_state

    def executor(world: Any, store: Any) -> Any:
        check_executor(cfg, world.dataset.num_clients)
        return SequentialExecutor(world, store)

    with tempfile.TemporaryDirectory(prefix="fedhet-check-") as tmp:
        run = build_run(cfg, Path(tmp) / "run", executor=executor)
        try:
            accumulator(run, init_state(run), 1)  # the algorithm refuses a fleet, model or rule here
        finally:
            run.executor.close()
    print(
        f"config ok: {cfg.algorithm.name} on {cfg.data.dataset}, {run.world.dataset.num_clients} clients, "
        f"{cfg.rounds} rounds; the run would write {run_dir}"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedhet.experiment.compare import check_out, load_comparison, run_comparison
    from fedhet.experiment.html_report import record_command
    from fedhet.experiment.report import print_table
    from fedhet.experiment.sinks import Group

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"runtime.device={args.device}")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    cmp = load_comparison(args.config, overrides, only=only)
    cmp.variants.update({name: _with_plugins(cfg, args.plugin) for name, cfg in cmp.variants.items()})
    out = Path(args.out) if args.out else _run_dir("runs", cmp.name)
    check_out(cmp, out, args.overwrite)
    print(f"comparison {cmp.name!r}: {len(cmp.variants)} variants -> {out}", file=sys.stderr)
    for line in Group(cmp.name, out, cmp.variants).view_lines():  # the live view: TensorBoard, MLflow
        print(line, file=sys.stderr)
    record_command(out, getattr(args, "command_line", None))
    rows = run_comparison(cmp, out, progress=args.progress, overwrite=args.overwrite)
    print_table(cmp.name, rows)
    print(f"report: {out / 'report.md'}  html: {out / 'report.html'}  plot: {out / 'accuracy.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedhet.experiment.report import print_table, report_from_dirs

    out = Path(args.out)
    targets = None
    if args.targets:
        try:
            targets = sorted(float(t) for t in args.targets.split(","))
        except ValueError:
            raise ConfigError(f"--targets: got {args.targets!r}, allowed: comma-separated scores such as 0.5,0.6") from None
        if any(not 0 < t <= 1 for t in targets):
            raise ConfigError(f"--targets: got {args.targets!r}, allowed: scores with 0 < score <= 1")
    for d in args.run_dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"run folder {d!r} does not exist; allowed: folders fedhet run wrote (each with a metrics.jsonl)")
    try:
        command = getattr(args, "command_line", None)
        rows = report_from_dirs([Path(d) for d in args.run_dirs], out, args.title, targets, [command] if command else None)
    except ValueError as err:  # a folder without a readable round
        raise ConfigError(f"{err}; allowed: folders fedhet run wrote (each with a metrics.jsonl)") from None
    print_table(args.title, rows)
    print(f"report: {out / 'report.md'}  html: {out / 'report.html'}")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    import json

    from fedhet.experiment.report import markdown_seed_table, seed_summary

    try:
        summary = seed_summary([Path(d) for d in args.dirs], last=args.last)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    keys = [k.strip() for k in args.keys.split(",")] if args.keys else None
    table = markdown_seed_table(summary, keys)
    print(f"mean of the last {args.last} evaluations; several folders: mean over them (each folder's value)")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"summary: {args.json}")
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from fedhet.experiment.masks import mask_analysis

    out = Path(args.out) if args.out else Path(args.run_dir)
    try:
        summary = mask_analysis(Path(args.run_dir), out)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"fedhet masks: {err}", file=sys.stderr)
        return 2
    n = len(summary["clients"])
    print(f"{n} clients; mean pairwise mask Hamming distance {summary['mean_hamming']:.4f}")
    print(
        f"Hamming vs label-distribution cosine across pairs: Pearson {summary['pearson']:.3f}, Spearman {summary['spearman']:.3f}"
    )
    print(f"heatmaps: {out / 'masks.png'}  matrices: {out / 'masks.json'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from fedhet.experiment.catalog import catalog

    for kind, entries in catalog().items():
        print(f"{kind}:")
        width = max(len(n) for n in entries)
        for name, entry in entries.items():
            print(f"  {name:<{width}}  {entry.summary}")
    print("fedhet describe NAME: what NAME does and every option it takes (type, default, meaning)")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from fedhet.experiment.catalog import catalog, find, format_entry

    entries = find(args.name)
    if not entries:
        names = sorted({n for kind in catalog().values() for n in kind})
        print(f"fedhet describe: unknown name {args.name!r}; allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    print("\n\n".join(format_entry(e) for e in entries))
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from fedhet.experiment.config import load_config

    if args.flower_command == "certs":
        from fedhet.runtime.flower.deploy import make_certificates

        files = make_certificates(args.out, hosts=args.host or ["127.0.0.1", "localhost"], nodes=args.nodes)
        for role, path in files.items():
            print(f"{role:<12} {path}")
        return 0
    cfg = load_config(args.config, list(args.overrides))
    if args.flower_command == "trial":
        from fedhet.runtime.flower.local import trial

        if args.resume and args.out:
            raise ConfigError("--resume and --out: got both; allowed: --resume DIR alone (the stopped trial's folder)")
        out = (
            Path(args.resume or args.out)
            if (args.resume or args.out)
            else _run_dir(cfg.logging.dir, cfg.name + "-flower")
        )
        tiers = [t.strip() or None for t in args.tiers.split(",")] if args.tiers else []
        run_dir = trial(cfg, out, tiers=tiers, resume=bool(args.resume))
        print(f"deployed run: {run_dir}  (federation logs: {out / 'federation'})")
        return 0
    if args.flower_command == "export-data":
        from fedhet.experiment.build import load_federated
        from fedhet.runtime.flower.node import export_client_data

        paths = export_client_data(load_federated(cfg), args.out)
        print(
            f"{len(paths)} client data files in {args.out} (client_<id>.pt); a SuperNode serves one: --node-config \"client-id=<id> data='{Path(args.out).resolve()}/client_<id>.pt'\""
        )
        return 0
    from fedhet.experiment.build import build_algorithm, build_fleet_parts
    from fedhet.runtime.flower.deploy import write_app

    build_algorithm(cfg)  # a bad algorithm or device setting fails here, not on the SuperLink
    build_fleet_parts(cfg)
    run_dir = Path(args.run_dir) if args.run_dir else _run_dir(cfg.logging.dir, cfg.name)
    out = write_app(cfg, args.out, run_dir)
    print(f"Flower app: {out}  (server results: {run_dir.resolve()})")
    print(f"run it: flwr run {out} <superlink connection> --stream")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedhet.data._cifar10 import cache_root
    from fedhet.training.mlm import MLMSettings, pretrain_mlm

    given = {}
    for f in dataclasses.fields(MLMSettings):
        value = getattr(args, f.name)
        if value is not None:
            given[f.name] = tuple(v.strip() for v in value.split(",")) if f.name == "datasets" else value
    try:
        settings = MLMSettings(**given)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    out = Path(args.out) if args.out else cache_root() / "pretrained" / "glue-ade-mlm"
    try:
        pretrain_mlm(settings, out, root=args.data, threads=args.threads, overwrite=args.overwrite, on_log=print)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    return 0


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"got {text!r}; allowed: true or false")


def _pretrain_parser(sub: Any) -> None:
    from fedhet.training.mlm import MLMSettings

    pt = sub.add_parser(
        "pretrain",
        help="pretrain a small BERT-style encoder (masked-language model) on the text datasets' training text",
        description="Masked-language-model pretraining on the unlabelled training text of SST-2, MRPC, STS-B and "
        "ADE (no test split is read). The folder written serves as data.options.tokenizer and "
        "model.options.pretrained. An unchanged finished folder is reused; a stopped one resumes from its checkpoint.",
    )
    pt.add_argument(
        "--out",
        help="folder for the model and tokenizer (default: $FEDHET_CACHE/pretrained/glue-ade-mlm, "
        "$FEDHET_CACHE defaulting to ~/.cache/fedhet)",
    )
    pt.add_argument("--data", help="data root (default: $FEDHET_DATA, else ~/.cache/fedhet/data)")
    pt.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    pt.add_argument("--overwrite", action="store_true", help="replace a finished pretraining with other settings")
    for f in dataclasses.fields(MLMSettings):
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        default = ",".join(f.default) if f.name == "datasets" else f.default
        pt.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=None,
            help=f"{f.metadata['help']} (default: {default})",
        )
    pt.set_defaults(func=cmd_pretrain)


def _add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first, so that the datasets, models and algorithms it registers can be used "
        "(repeatable; recorded in the run's config as plugins)",
    )


def _with_plugins(cfg: Any, modules: list[str]) -> Any:
    """``cfg`` with the CLI's ``--plugin`` modules added to its ``plugins`` (so the run records them)."""
    extra = [m for m in modules if m not in cfg.plugins]
    return cfg.model_copy(update={"plugins": [*cfg.plugins, *extra]}) if extra else cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhet", description="Federated learning over heterogeneous devices.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment from a YAML config")
    r.add_argument("config", nargs="?", help="YAML config (omit for all defaults)")
    r.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. algorithm.mu=0.1")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    r.add_argument(
        "--from-previous",
        action="store_true",
        help="with --resume: continue from the checkpoint before the last (checkpoint.prev.pt), e.g. when checkpoint.pt "
        "cannot be read; it replaces checkpoint.pt, and metrics rows after its round are dropped and redone",
    )
    r.add_argument("--run-dir", help="where to write metrics and checkpoints (default: logging.dir/NAME-TIME)")
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a --run-dir that holds an earlier run (its checkpoints and metrics are removed); "
        "without it such a folder is refused",
    )
    r.add_argument("--device", help="cpu, cuda, cuda:N or auto (same as runtime.device=...)")
    r.add_argument(
        "--progress",
        choices=["auto", "bar", "lines", "off"],
        default=None,
        help="progress display: a bar, one line a round, nothing, or auto (a bar on a terminal); same as logging.progress=...",
    )
    r.add_argument(
        "--check",
        action="store_true",
        help="validate the config and build the run (data, model, devices) without training or writing the run folder",
    )
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="run a comparison (a base config and named variants)")
    c.add_argument("config", help="comparison YAML: name, base (a run config) and variants (name -> overrides of base)")
    c.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to the base")
    c.add_argument("--out", help="output folder (default: runs/NAME-TIME)")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="run again the variants whose folders in --out hold an earlier run (without it they are refused)",
    )
    c.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    c.add_argument(
        "--progress",
        choices=["auto", "bar", "lines", "off"],
        default=None,
        help="progress display: a bar, one line a round, nothing, or auto (a bar on a terminal)",
    )
    c.add_argument(
        "--only",
        help="comma-separated variant names to run; results of other variants already in --out are kept in the report",
    )
    c.set_defaults(func=cmd_compare)
    sub.add_parser("list", help="algorithms, models, datasets, partitioners, server optimizers").set_defaults(
        func=cmd_list
    )
    d = sub.add_parser("describe", help="fields, defaults and docs of a registered name")
    d.add_argument("name", help="any name fedhet list shows (an algorithm, model, dataset, config section, ...)")
    d.set_defaults(func=cmd_describe)
    rep = sub.add_parser("report", help="table, plot and Markdown report of finished runs")
    rep.add_argument("run_dirs", nargs="+", help="run folders (each with a metrics.jsonl)")
    rep.add_argument("--out", required=True, help="folder for report.md and the plots")
    rep.add_argument("--title", default="fedhet report", help="the report's title (default: fedhet report)")
    rep.add_argument(
        "--targets",
        help="comma-separated scores (e.g. 0.5,0.6) for the time-to-accuracy table (default: 50%%, 75%% and 100%% of the median best score)",
    )
    rep.set_defaults(func=cmd_report)
    sm = sub.add_parser(
        "summarize",
        help="every evaluated number as the mean of the last K evaluations, across comparison folders run with different seeds",
    )
    sm.add_argument("dirs", nargs="+", help="comparison folders (one a seed), each holding one run folder a variant")
    sm.add_argument("--last", type=int, default=3, help="evaluations averaged at the end of each run (default 3)")
    sm.add_argument(
        "--keys", help="comma-separated metric keys to show (default: every global model and the clients' mean and p10)"
    )
    sm.add_argument("--json", help="also write the whole summary (per folder and mean) to this JSON file")
    sm.set_defaults(func=cmd_summarize)
    m = sub.add_parser(
        "masks", help="learned sparse masks (DisPFL) against the clients' label distributions: two heatmaps"
    )
    m.add_argument("run_dir", help="a DisPFL run folder")
    m.add_argument("--out", help="output folder (default: the run folder)")
    m.set_defaults(func=cmd_masks)
    fl = sub.add_parser(
        "flower", help="deploy an experiment on real devices through Flower (app folder, client data, certificates)"
    )
    fsub = fl.add_subparsers(dest="flower_command", required=True)
    fa = fsub.add_parser("app", help="write a Flower app folder for `flwr run` from an experiment config")
    fa.add_argument("config", nargs="?", help="YAML config (omit for all defaults)")
    fa.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    fa.add_argument("--out", required=True, help="the app folder to write")
    fa.add_argument("--run-dir", help="where the server writes its results (default: logging.dir/NAME-TIME)")
    fe = fsub.add_parser(
        "export-data", help="write one client data file per client of an experiment's partition (for trials)"
    )
    fe.add_argument("config", nargs="?", help="YAML config (omit for all defaults)")
    fe.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    fe.add_argument("--out", required=True, help="folder for client_<id>.pt")
    fc = fsub.add_parser("certs", help="a private CA, a SuperLink TLS certificate and SuperNode keys (for trials)")
    fc.add_argument("--out", required=True, help="folder for the certificates and keys")
    fc.add_argument(
        "--host",
        action="append",
        help="the SuperLink's IP address or DNS name (repeat; default: 127.0.0.1 and localhost)",
    )
    fc.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make (node<i>.key, node<i>.pub)")
    ft = fsub.add_parser(
        "trial",
        help="run an experiment on a local Flower federation: a SuperLink and one SuperNode per client (TLS, node authentication), then stop it",
    )
    ft.add_argument("config", nargs="?", help="YAML config (omit for all defaults)")
    ft.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    ft.add_argument(
        "--out",
        help="folder for the data files, certificates, app, logs and the server's run (default: logging.dir/NAME-flower-TIME)",
    )
    ft.add_argument(
        "--tiers", help="comma-separated tier each node reports, by client id (default: the experiment's assignment)"
    )
    ft.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a stopped trial from its folder (its server checkpoint and the nodes' states)",
    )
    for q in (fa, fe, fc, ft):
        q.set_defaults(func=cmd_flower)
    _pretrain_parser(sub)
    for name, parser in sub.choices.items():
        leaves = fsub.choices.values() if name == "flower" else [parser]
        for leaf in leaves:
            if name != "pretrain":
                _add_plugin_flag(leaf)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also follow flags (`fedhet run C --device cpu rounds=2`): argparse leaves them over
    if hasattr(args, "overrides"):
        extra = [a for a in rest if "=" in a and not a.startswith("-")]
        args.overrides = [*args.overrides, *extra]
        rest = [a for a in rest if a not in extra]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # what run folders and reports record as the command that made them
    args.command_line = "fedhet " + shlex.join(sys.argv[1:] if argv is None else argv)
    # a config file given to `run` may be followed by overrides; an override alone is not a file
    if getattr(args, "config", None) and "=" in str(args.config) and args.command in ("run", "flower"):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    from fedhet.core.plugins import PluginError, load_plugins

    previous = _terminate_as_interrupt()
    try:
        load_plugins(getattr(args, "plugin", []) or [], origin="--plugin")
        return int(args.func(args) or 0)
    except PluginError as err:
        print(f"fedhet: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"fedhet: config error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"fedhet: run stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedhet: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt() -> Any:
    """SIGTERM (``kill PID``) ends a command as Ctrl-C does: through the ``finally`` blocks that stop
    worker processes and a Ray fedhet started (by default Python would exit without running them).
    Returns the previous handler (None when not in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
