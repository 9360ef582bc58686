"""Results people can read at a glance: a table on the terminal, a plot, a Markdown report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedhet.experiment.logging import CLIENTS, METRICS, read_jsonl


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "bytes":
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if abs(value) < 1000:
                return f"{value:.1f} {unit}"
            value /= 1000
        return f"{value:.1f} PB"
    if kind == "flops":
        return f"{value / 1e9:.2f} G"
    if kind == "s":
        return f"{value:.1f}"
    return str(value)


COLUMNS = [
    ("variant", "variant", ""),
    ("final_accuracy", "accuracy %", "pct"),
    ("best_accuracy", "best %", "pct"),
    ("client_accuracy_mean", "client mean %", "pct"),
    ("client_accuracy_p10", "client p10 %", "pct"),
    ("bytes_total", "communicated", "bytes"),
    ("train_flops", "train FLOPs", "flops"),
    ("seconds", "time s", "s"),
]


#: metrics that are not fractions (shown as plain numbers, not percentages)
UNBOUNDED_METRICS = ("mse",)


def _fmt_metric(name: str, value: Any) -> str:
    if value is not None and name in UNBOUNDED_METRICS:
        return f"{value:.3f}"
    return _fmt(value, "pct")


def metric_label(rows: list[dict[str, Any]]) -> str:
    """The headline metric's name shared by the rows (``accuracy``, ``f1``, ``pearson``)."""
    names = {r.get("metric_name") or "accuracy" for r in rows}
    return names.pop() if len(names) == 1 else "score"


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    label = metric_label(rows)
    rename = {
        "accuracy %": f"{label} %",
        "client mean %": f"client mean {label} %",
        "client p10 %": f"client p10 {label} %",
    }
    if label == "accuracy":
        return COLUMNS
    return [(key, rename.get(header, header), kind) for key, header, kind in COLUMNS]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(r.get(key), kind) for key, _, kind in COLUMNS] for r in rows]


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every metric of the headline targets beyond plain accuracy (F1 per entity type, Spearman,
    ...), empty for plain classification."""
    names = sorted({k for r in rows for k in (r.get("final_metrics") or {})})
    return [] if names in ([], ["accuracy"]) else names


def _markdown(labels: list[str], columns: list[str], body: list[list[str]]) -> str:
    """A Markdown table: left-aligned label columns, then right-aligned value columns."""
    header = "| " + " | ".join(labels + columns) + " |"
    sep = "|" + "|".join(["---"] * len(labels) + ["---:"] * len(columns)) + "|"
    return "\n".join([header, sep] + ["| " + " | ".join(r) + " |" for r in body])


def markdown_model_table(rows: list[dict[str, Any]]) -> str:
    """One line per evaluated model of every variant (exits, tiers, widths, client tiers) with
    every metric, when some variant evaluates more than one model; else empty."""
    if not any(len(r.get("model_metrics") or {}) > 1 for r in rows):
        return ""
    cols = sorted({m for r in rows for mm in (r.get("model_metrics") or {}).values() for m in mm})
    body = [
        [r["variant"], model] + [_fmt_metric(c, mm.get(c)) for c in cols]
        for r in rows
        for model, mm in (r.get("model_metrics") or {}).items()
    ]
    return _markdown(["variant", "model"], cols, body)


def markdown_metric_table(rows: list[dict[str, Any]]) -> str:
    cols = metric_columns(rows)
    if not cols:
        return ""
    body = [[r["variant"]] + [_fmt_metric(c, (r.get("final_metrics") or {}).get(c)) for c in cols] for r in rows]
    return _markdown(["variant"], cols, body)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    table = Table(title=title)
    for _, header, kind in columns(rows):
        table.add_column(header, justify="left" if not kind else "right")
    for r in table_rows(rows):
        table.add_row(*r)
    console.print(table)
    cols = width_columns(rows)
    if cols:
        wt = Table(title=f"{title}: global-test accuracy % per model width")
        wt.add_column("variant")
        for w in cols:
            wt.add_column(f"width {w}", justify="right")
        for r in width_table_rows(rows):
            wt.add_row(*r)
        console.print(wt)
    mcols = metric_columns(rows)
    if mcols:
        mt = Table(title=f"{title}: every metric of the headline model, %")
        mt.add_column("variant")
        for c in mcols:
            mt.add_column(c, justify="right")
        for r in rows:
            mt.add_row(r["variant"], *[_fmt_metric(c, (r.get("final_metrics") or {}).get(c)) for c in mcols])
        console.print(mt)
    personalized = [r["variant"] for r in rows if str(r.get("metric", "")).startswith("clients/")]
    if personalized:
        console.print(
            f"{metric_label(rows)} % of {', '.join(personalized)}: mean over clients on their own test splits (no global model)"
        )


def width_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Widths evaluated by any variant, largest first (empty when every variant has one width)."""
    widths = {w for r in rows for w in (r.get("width_accuracy") or {})}
    if not any(len(r.get("width_accuracy") or {}) > 1 for r in rows):
        return []
    return sorted(widths, key=lambda w: -float(w))


def width_table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    cols = width_columns(rows)
    return [[r["variant"]] + [_fmt((r.get("width_accuracy") or {}).get(w), "pct") for w in cols] for r in rows]


def markdown_width_table(rows: list[dict[str, Any]]) -> str:
    cols = width_columns(rows)
    if not cols:
        return ""
    return _markdown(["variant"], [f"width {w}" for w in cols], width_table_rows(rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    header = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" if not k else "---:" for _, _, k in cols) + "|"
    return "\n".join([header, sep] + ["| " + " | ".join(r) + " |" for r in table_rows(rows)])


def _axes():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


#: marker and line-style cycles combined with the colour cycle, so that many variants stay apart
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")


def style(i: int) -> dict[str, Any]:
    """Line style of the ``i``-th variant: a colour of the 10-colour cycle, a marker of an 11-marker
    cycle and, past 10 variants, another line style; no two of the first 40 variants look alike."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    return {"color": colors[i % 10], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[(i // 10) % 4]}


def _save(fig, ax, path: Path, title: str, xlabel: str, ylabel: str = "accuracy", ytext: str | None = None) -> Path:  # noqa: ANN001
    """Label, legend (when something was drawn; beside the axes when it is long), save and close a
    figure (y axis: ``ytext``, or the test ``ylabel`` in %)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ytext or f"test {ylabel} (%)")
    ax.set_title(title, fontsize=12 if len(title) <= 60 else 9)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 6:
        fig.set_size_inches(10, 4.6)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif handles:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(run_dirs: dict[str, Path], path: Path, title: str, clients: bool = False) -> Path | None:
    """The headline metric against round, one line per variant; with ``clients``, the mean over
    clients of each client's model on its own test split instead (None when no run has it)."""
    from fedhet.experiment.compare import headline_metric

    fig, ax = _axes()
    metrics = set()
    personalized = False
    for i, (name, d) in enumerate(run_dirs.items()):
        rows = read_jsonl(Path(d) / METRICS)
        metrics |= {r["metric"] for r in rows if r.get("metric")}
        label = name
        if clients:
            pts = [(r["round"], r.get(f"clients/{r.get('metric')}_mean")) for r in rows]
            pts = [(x, y) for x, y in pts if y is not None]
        else:
            scored = [(r["round"], *headline_metric(r)) for r in rows if headline_metric(r)[1] is not None]
            pts = [(x, y) for x, _, y in scored]
            # a personalized variant's headline is its clients' mean on their own splits: say so
            if scored and scored[-1][1].startswith("clients/"):
                label, personalized = f"{name} (client mean*)", True
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], markersize=4, markevery=max(1, len(pts) // 12),
                    label=label, **style(i))  # fmt: skip
    if personalized:
        ax.annotate("* personalized: mean over clients of each client's model on its own test split",
                    xy=(0, -0.2), xycoords="axes fraction", fontsize=7, va="top")  # fmt: skip
    if clients and not ax.get_lines():
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    metric = metrics.pop() if len(metrics) == 1 else "score"
    if clients:
        return _save(
            fig,
            ax,
            path,
            f"{title}: mean over clients, own test splits",
            "round",
            metric,
            f"client mean test {metric} (%)",
        )
    return _save(fig, ax, path, title, "round", metric)


def progress_points(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each evaluation of a run with where it stands: ``round``, cumulative simulated seconds
    (``sim_time``; absent without a clock), cumulative bytes communicated (down and up, probes
    included) and the headline ``score``."""
    from fedhet.experiment.compare import headline_metric

    out = []
    sent = 0.0
    for r in rows:
        sent += (r.get("bytes_down") or 0) + (r.get("bytes_up") or 0)
        _, score = headline_metric(r)
        if score is None:
            continue
        point = {"round": float(r["round"]), "bytes": sent, "score": float(score)}
        if r.get("sim_time") is not None:
            point["sim_time"] = float(r["sim_time"])
        out.append(point)
    return out


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 86_400:
        return 86_400.0, "days"
    if seconds >= 2 * 3_600:
        return 3_600.0, "hours"
    if seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _byte_unit(nbytes: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= 2 * scale:
            return scale, unit
    return 1.0, "bytes"


def plot_progress(run_dirs: dict[str, Path], path: Path, title: str, x: str) -> Path | None:
    """The headline metric against cumulative simulated time (``x="sim_time"``) or bytes
    communicated (``x="bytes"``), one line per variant (None when no run has such points)."""
    points = {name: [p for p in progress_points(read_jsonl(Path(d) / METRICS)) if x in p] for name, d in run_dirs.items()}
    top = max((p[x] for pts in points.values() for p in pts), default=0.0)
    if top <= 0:
        return None
    scale, unit = _time_unit(top) if x == "sim_time" else _byte_unit(top)
    fig, ax = _axes()
    for i, (name, pts) in enumerate(points.items()):
        if pts:
            ax.plot([p[x] / scale for p in pts], [100 * p["score"] for p in pts], markersize=4,
                    markevery=max(1, len(pts) // 12), label=name, **style(i))  # fmt: skip
    xlabel = f"simulated time ({unit})" if x == "sim_time" else f"bytes communicated ({unit}, down + up)"
    return _save(fig, ax, path, f"{title}: against {'simulated time' if x == 'sim_time' else 'bytes'}", xlabel, metric_label_of(run_dirs))


def metric_label_of(run_dirs: dict[str, Path]) -> str:
    metrics = {r["metric"] for d in run_dirs.values() for r in read_jsonl(Path(d) / METRICS) if r.get("metric")}
    return metrics.pop() if len(metrics) == 1 else "score"


def default_targets(run_dirs: dict[str, Path]) -> list[float]:
    """Three target scores for the time-to-accuracy table: 50%, 75% and 100% of the median over
    variants of their best score, rounded down to a whole percent."""
    bests = sorted(max((p["score"] for p in progress_points(read_jsonl(Path(d) / METRICS))), default=0.0) for d in run_dirs.values())
    if not bests or bests[len(bests) // 2] <= 0:
        return []
    median = bests[len(bests) // 2]
    return sorted({math.floor(100 * f * median) / 100 for f in (0.5, 0.75, 1.0)})


def time_to_accuracy(run_dirs: dict[str, Path], targets: list[float]) -> list[dict[str, Any]]:
    """For each variant and target: the first evaluation at or above the target, as the simulated
    time, the bytes and the rounds it took (``None``: never reached)."""
    out = []
    for name, d in run_dirs.items():
        pts = progress_points(read_jsonl(Path(d) / METRICS))
        reached = {}
        for t in targets:
            hit = next((p for p in pts if p["score"] >= t - 1e-12), None)
            reached[t] = None if hit is None else {k: hit.get(k) for k in ("sim_time", "bytes", "round")}
        out.append({"variant": name, "reached": reached})
    return out


def _short(x: float) -> str:
    """Three significant digits, without an exponent (1,010 rather than 1.01e+03)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown_time_to_accuracy(table: list[dict[str, Any]], targets: list[float], label: str) -> str:
    """One row per variant; per target, simulated time, bytes and rounds to reach it (- : not reached)."""
    times = [v["sim_time"] for row in table for v in row["reached"].values() if v and v.get("sim_time") is not None]
    sent = [v["bytes"] for row in table for v in row["reached"].values() if v]
    tscale, tunit = _time_unit(max(times)) if times else (1.0, "")
    bscale, bunit = _byte_unit(max(sent)) if sent else (1.0, "bytes")
    parts = ["time", "bytes", "rounds"] if times else ["bytes", "rounds"]
    header = "| variant | " + " | ".join(f"{100 * t:g}% {label}: {p}" for t in targets for p in parts) + " |"
    sep = "|---|" + "---:|" * (len(targets) * len(parts))
    lines = [header, sep]
    for row in table:
        cells = []
        for t in targets:
            v = row["reached"][t]
            if v is None:
                cells += ["-"] * len(parts)
                continue
            if times:
                cells.append("-" if v.get("sim_time") is None else f"{_short(v['sim_time'] / tscale)} {tunit}")
            cells += [f"{_short(v['bytes'] / bscale)} {bunit}", f"{v['round']:.0f}"]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_widths(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Final global-test accuracy against model width, one line per variant (None when no variant
    was evaluated at more than one width)."""
    if not width_columns(rows):
        return None
    fig, ax = _axes()
    multi = [r for r in rows if len(r.get("width_accuracy") or {}) > 1]
    single = [r for r in rows if len(r.get("width_accuracy") or {}) == 1]
    widths = sorted({float(w) for r in rows for w in (r.get("width_accuracy") or {})})
    # variants evaluated at several widths: lines, each nudged sideways a little (in log2 units) so
    # that markers at the same width do not cover each other
    for i, r in enumerate(multi):
        nudge = 2 ** (0.06 * (i - (len(multi) - 1) / 2))
        pts = sorted((float(w), a) for w, a in r["width_accuracy"].items())
        ax.plot([p[0] * nudge for p in pts], [100 * p[1] for p in pts], label=r["variant"], **style(i))
    # variants with one model: a faint level line across the plot, and a marker near its width, the
    # markers of variants at the same width spread side by side (the legend gives each value)
    at: dict[float, int] = {}
    for r in single:
        at[float(next(iter(r["width_accuracy"])))] = at.get(float(next(iter(r["width_accuracy"]))), 0) + 1
    seen: dict[float, int] = {}
    for j, r in enumerate(single, start=len(multi)):
        ((w, a),) = r["width_accuracy"].items()
        w = float(w)
        k, n = seen.get(w, 0), at[w]
        seen[w] = k + 1
        st = style(j)
        ax.axhline(100 * a, color=st["color"], linestyle=":", linewidth=0.8, alpha=0.6)
        ax.plot([w * 2 ** (0.12 * (k - (n - 1) / 2))], [100 * a], linestyle="none", marker=st["marker"],
                color=st["color"], markersize=7, label=f"{r['variant']}: {100 * a:.1f} (width {w:g} only)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [f"{w:g}" for w in widths])
    ax.minorticks_off()
    label = metric_label(rows)
    return _save(fig, ax, path, f"{title}: {label} per width", "model width (fraction of the full model)", label)


def client_values(run_dir: Path) -> tuple[str, list[float]] | None:
    """The headline metric of every client on its own test split in the run's last client evaluation
    (``eval_<metric>`` in ``clients.jsonl``), or None when clients were not evaluated."""
    metrics = read_jsonl(Path(run_dir) / METRICS)
    metric = next((r["metric"] for r in reversed(metrics) if r.get("metric")), None)
    if metric is None:
        return None
    key = f"eval_{metric}"
    rows = [r for r in read_jsonl(Path(run_dir) / CLIENTS) if r.get(key) is not None]
    if not rows:
        return None
    last = max(r["round"] for r in rows)
    return metric, [float(r[key]) for r in rows if r["round"] == last]


def markdown_client_table(values: dict[str, tuple[str, list[float]]]) -> str:
    """Mean, median, 10th percentile, minimum and maximum across clients, per variant."""
    body = []
    for name, (metric, vals) in values.items():
        v = np.sort(np.asarray(vals, np.float64))
        p10 = v[max(0, int(0.1 * (len(v) - 1)))]
        scale = 1.0 if metric in ("mse", "loss") else 100.0
        body.append([name, str(len(v))] + [f"{scale * x:.2f}" for x in (v.mean(), np.median(v), p10, v[0], v[-1])])
    return _markdown(["variant"], ["clients", "mean", "median", "p10", "min", "max"], body)


def plot_client_distribution(values: dict[str, tuple[str, list[float]]], path: Path, title: str) -> Path:
    """The empirical distribution (CDF) of the clients' metric, one line per variant."""
    fig, ax = _axes()
    metrics = {m for m, _ in values.values()}
    for name, (_, vals) in values.items():
        v = np.sort(100 * np.asarray(vals, np.float64))
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=name)
    metric = metrics.pop() if len(metrics) == 1 else "score"
    _save(
        fig,
        ax,
        path,
        f"{title}: clients on their own test splits",
        f"client test {metric} (%)",
        metric,
        "share of clients at or below",
    )
    return path


def data_lines(run_dirs: dict[str, Path]) -> list[str]:
    """A line naming the data the runs used (from their ``dataset.json``): dataset, classes, input
    shape and clients, then a blank line; nothing when no run recorded it."""
    import json

    from fedhet.experiment.logging import DATASET

    for d in run_dirs.values():
        path = Path(d) / DATASET
        if path.is_file():
            info = json.loads(path.read_text())
            names = info.get("class_names") or []
            classes = f"{info['num_classes']} classes" + (f" ({', '.join(names)})" if names and len(names) <= 30 else "")
            shape = "x".join(str(v) for v in info.get("input_shape", []))
            return [f"Data: {info['name']}, {classes}, input {shape}, {info.get('num_clients')} clients.", ""]
    return []


def write_report(
    out_dir: Path,
    title: str,
    rows: list[dict[str, Any]],
    run_dirs: dict[str, Path],
    targets: list[float] | None = None,
    commands: list[str] | None = None,
) -> Path:
    """``report.md``, its plots and ``report.html`` (the same, self-contained, with each run's
    per-client results, resolved config and commands) in ``out_dir``; ``targets``: the scores of the
    time-to-accuracy table (default: :func:`default_targets`); ``commands``: the command lines that
    made the report (shown in the HTML report beside those the run folders recorded)."""
    plot = plot_curves(run_dirs, out_dir / "accuracy.png", title)
    wplot = plot_widths(rows, out_dir / "accuracy_per_width.png", title)
    text = [
        f"# {title}",
        "",
        *data_lines(run_dirs),
        "Accuracy: the global model on the global test set; for personalized variants (no global",
        "model), the mean over clients of each client's model on its own held-out split.",
        "",
        markdown_table(rows),
        "",
    ]
    metrics = markdown_metric_table(rows)
    if metrics:
        text += [
            "Every metric of each variant's headline model in the last evaluation (%; MSE in squared target units).",
            "",
            metrics,
            "",
        ]
    models = markdown_model_table(rows)
    if models:
        text += [
            "Every model each variant evaluated in the last evaluation (global targets on the global test set;",
            "client tiers: mean over the tier's clients on their own held-out splits), %.",
            "",
            models,
            "",
        ]
    widths = markdown_width_table(rows)
    if widths:
        text += [
            "Global-test accuracy (%) of the global model cut to each width (- : not evaluated at that width).",
            "",
            widths,
            "",
        ]
        if wplot is not None:
            text += [f"![accuracy per width]({wplot.name})", ""]
    text += [
        f"![accuracy against round]({plot.name})",
        "",
    ]
    targets = default_targets(run_dirs) if targets is None else targets
    if targets:
        label = metric_label_of(run_dirs)
        table = time_to_accuracy(run_dirs, targets)
        clocked = any(v and v.get("sim_time") is not None for row in table for v in row["reached"].values())
        text += [
            f"Time to {label}: the first evaluation at or above each target"
            + (": simulated time, bytes communicated (down and up) and rounds." if clocked else ": bytes communicated (down and up) and rounds."),
            "",
            markdown_time_to_accuracy(table, targets, label),
            "",
        ]
    for x, name, what in (("sim_time", "accuracy_time.png", "simulated time"), ("bytes", "accuracy_bytes.png", "bytes")):
        made = plot_progress(run_dirs, out_dir / name, title, x)
        if made is not None:
            text += [f"![accuracy against {what}]({made.name})", ""]
    clients = {name: v for name, d in run_dirs.items() if (v := client_values(Path(d))) is not None}
    if clients:
        cplot = plot_client_distribution(clients, out_dir / "clients.png", title)
        curve = plot_curves(run_dirs, out_dir / "clients_accuracy.png", title, clients=True)
        text += [
            "Each client's model on its own held-out split in the last evaluation (personalized models",
            "where the variant has them, else the global model), across clients, %.",
            "",
            markdown_client_table(clients),
            "",
            f"![clients' accuracy distribution]({cplot.name})",
            "",
        ]
        if curve is not None:
            text += [f"![mean client accuracy against round]({curve.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(text))
    from fedhet.experiment.html_report import write_html

    write_html(out_dir, "\n".join(text), run_dirs, commands)
    return path


def report_from_dirs(
    run_dirs: list[Path],
    out_dir: Path,
    title: str = "fedhet report",
    targets: list[float] | None = None,
    commands: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Summarise finished run directories (each with metrics.jsonl) into a table, plots, a Markdown
    report and its HTML page (``commands``: the command lines that made it, for the page)."""
    from fedhet.experiment.compare import summarize

    rows = []
    dirs = {}
    for d in run_dirs:
        hist = read_jsonl(Path(d) / METRICS)
        if not hist:
            raise ValueError(f"{d}: no {METRICS} with any round in it")
        rows.append(summarize(Path(d).name, hist, sum(r.get("seconds") or 0 for r in hist)))
        dirs[Path(d).name] = Path(d)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir, title, rows, dirs, targets, commands)
    return rows


# ------------------------------------------------------------------------------- across seeds


def last_evaluations(history: list[dict[str, Any]], last: int) -> dict[str, float]:
    """The mean over the last ``last`` evaluation rows of ``history`` of every evaluated number:
    each global target's metrics (``eval/<target>/<metric>``, losses and widths left out) and the
    clients' statistics (``clients/...``). A key missing from some of those rows is averaged over
    the rows that have it."""
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ValueError(f"last: got {last!r}, allowed: an integer >= 1")
    evals = [r for r in history if any(k.startswith(("eval/", "clients/")) for k in r)][-last:]
    sums: dict[str, list[float]] = {}
    for row in evals:
        for k, v in row.items():
            if not k.startswith(("eval/", "clients/")) or k.endswith(("/loss", "/width")):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def seed_summary(comparison_dirs: list[Path], last: int = 3) -> dict[str, Any]:
    """Variants run with several seeds, one comparison folder a seed (each holding a run folder a
    variant): for every variant present in all of them, each evaluated number as the mean of its
    last ``last`` evaluations (:func:`last_evaluations`), per folder and averaged over the folders,
    with the rounds, bytes and training FLOPs of each run. ValueError names a folder without runs."""
    per_dir: list[dict[str, dict[str, Any]]] = []
    for d in comparison_dirs:
        runs = {}
        for run in sorted(p for p in Path(d).iterdir() if (p / METRICS).is_file()) if Path(d).is_dir() else []:
            hist = read_jsonl(run / METRICS)
            if hist:
                runs[run.name] = {
                    "values": last_evaluations(hist, last),
                    "rounds": hist[-1]["round"],
                    "bytes_total": sum((r.get("bytes_up") or 0) + (r.get("bytes_down") or 0) for r in hist),
                    "train_flops": sum(r.get("train_flops") or 0 for r in hist),
                }
        if not runs:
            raise ValueError(f"{d}: no run folder with a {METRICS} in it")
        per_dir.append(runs)
    common = [v for v in per_dir[0] if all(v in runs for runs in per_dir[1:])]
    variants: dict[str, Any] = {}
    for name in common:
        runs = [runs[name] for runs in per_dir]
        keys = [k for k in runs[0]["values"] if all(k in r["values"] for r in runs)]
        variants[name] = {
            "values": {
                k: {"seeds": [r["values"][k] for r in runs], "mean": float(np.mean([r["values"][k] for r in runs]))}
                for k in keys
            },
            "rounds": [r["rounds"] for r in runs],
            "bytes_total": [r["bytes_total"] for r in runs],
            "train_flops": [r["train_flops"] for r in runs],
        }
    return {"last": last, "dirs": [str(d) for d in comparison_dirs], "variants": variants}


def _target_label(key: str) -> str:
    """``eval/width_0.5/accuracy`` -> ``width_0.5 accuracy``; ``clients/tier_a/accuracy_mean`` ->
    ``clients tier_a accuracy_mean``."""
    return key.replace("eval/", "").replace("/", " ")


def markdown_seed_table(summary: dict[str, Any], keys: list[str] | None = None) -> str:
    """One row a variant, one column a number (``keys``, default: every global target's metrics and
    the clients' mean and 10th percentile), each cell the mean over seeds with the seeds' values in
    brackets, in %; then rounds and communicated bytes."""
    variants = summary["variants"]
    if keys is None:
        seen: dict[str, None] = {}
        for v in variants.values():
            for k in v["values"]:
                if k.startswith("eval/") or (k.endswith(("_mean", "_p10")) and k.count("/") == 1):
                    seen.setdefault(k, None)
        keys = [k for k in seen if k.startswith("eval/")] + [k for k in seen if not k.startswith("eval/")]
    labels = ["variant", *[f"{_target_label(k)} %" for k in keys], "rounds", "communicated"]
    body = []
    for name, v in variants.items():
        cells = [name]
        for k in keys:
            entry = v["values"].get(k)
            if entry is None:
                cells.append("-")
            else:
                seeds = " / ".join(f"{100 * s:.2f}" for s in entry["seeds"])
                cells.append(
                    f"{100 * entry['mean']:.2f} ({seeds})" if len(entry["seeds"]) > 1 else f"{100 * entry['mean']:.2f}"
                )
        cells.append(" / ".join(str(r) for r in v["rounds"]))
        cells.append(" / ".join(_fmt(b, "bytes") for b in v["bytes_total"]))
        body.append(cells)
    return _markdown(labels[:1], labels[1:], body) if body else ""
