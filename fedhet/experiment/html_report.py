"""``report.html``: the Markdown report as one self-contained page that opens offline.

Everything ``report.md`` holds (its text, every table, every plot), then each client's own-split
metric in the last client evaluation of each run (the per-client distribution, one collapsible
table a run), each run's resolved config and the commands that produced the runs and the report.
Plots are embedded as ``data:`` URIs, the style sheet is inline; the page loads nothing from
anywhere (no scripts, fonts or images from a network). Every piece of text is HTML-escaped.

The page is made from ``report.md`` itself (the subset of Markdown that
:func:`fedhet.experiment.report.write_report` writes: a ``#`` title, paragraphs, pipe tables and
``![alt](file.png)`` images), so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import re
import time
from pathlib import Path
from typing import Any

from fedhet import __version__

HTML = "report.html"
#: each run folder's record of the commands that wrote it, one line each
COMMANDS = "commands.txt"

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")

STYLE = """
:root { --ink: #1d2329; --muted: #5b6670; --line: #e1e5ea; --head: #f0f2f5; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f5f7; color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 36px 48px; background: #fff; min-height: 100vh;
       box-shadow: 0 0 0 1px var(--line); }
h1 { font-size: 1.75em; margin: 0 0 4px; }
h2 { font-size: 1.25em; margin: 2em 0 .5em; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p { margin: .6em 0; max-width: 80ch; }
.meta { color: var(--muted); font-size: .9em; margin: 0 0 1em; }
nav { font-size: .9em; margin: 0 0 1.5em; }
nav a { color: var(--accent); text-decoration: none; margin-right: 1.2em; }
nav a:hover { text-decoration: underline; }
.table { overflow-x: auto; margin: .8em 0 1.4em; }
table { border-collapse: collapse; font-size: .9em; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--head); font-weight: 600; }
.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eaf2fb; }
figure { margin: 1.2em 0 1.8em; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .88em; margin-top: 4px; }
details { border: 1px solid var(--line); border-radius: 4px; margin: .5em 0; background: #fcfcfd; }
summary { cursor: pointer; padding: 6px 12px; font-weight: 600; }
summary .note { font-weight: 400; color: var(--muted); }
details > .table, details > pre { margin: 0 12px 12px; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 4px; padding: 10px 12px; overflow-x: auto;
      font: 12.5px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; }
.missing { color: #a33; }
@media print { main { box-shadow: none; } details { break-inside: avoid; } }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head = _cells(lines[0])
    numeric = [c.endswith(":") for c in _cells(lines[1])] if len(lines) > 1 else [False] * len(head)
    cls = [' class="num"' if n else "" for n in numeric]
    out = ['<div class="table"><table>', "<thead><tr>"]
    out += [f"<th{cls[i] if i < len(cls) else ''}>{_e(h)}</th>" for i, h in enumerate(head)]
    out += ["</tr></thead>", "<tbody>"]
    for line in lines[2:]:
        row = _cells(line)
        out.append(
            "<tr>" + "".join(f"<td{cls[i] if i < len(cls) else ''}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        )
    out += ["</tbody></table></div>"]
    return "\n".join(out)


def _image(folder: Path, alt: str, src: str) -> str:
    path = folder / src
    if not path.is_file() or path.suffix.lower() != ".png":
        return f'<p class="missing">plot {_e(src)} ({_e(alt)}) is missing</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption></figure>'
    )


def markdown_to_html(text: str, folder: Path) -> tuple[str, str]:
    """The title and the HTML body of a report written by ``write_report`` (images read from
    ``folder``)."""
    title = ""
    parts = []
    blocks = re.split(r"\n\s*\n", text.strip())
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0].startswith("# ") and len(lines) == 1:
            title = lines[0][2:].strip()
        elif all(line.lstrip().startswith("|") for line in lines):
            parts.append(_table(lines))
        elif len(lines) == 1 and (m := _IMAGE.match(lines[0].strip())):
            parts.append(_image(folder, m["alt"], m["src"]))
        else:
            parts.append(f"<p>{_e(' '.join(line.strip() for line in lines))}</p>")
    return title, "\n".join(parts)


def read_commands(folder: Path) -> list[str]:
    path = Path(folder) / COMMANDS
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


def _count(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return "-" if value is None else value


def record_command(folder: Path, line: str | None) -> None:
    """Append the command line ``line`` to ``folder/commands.txt`` (what made the folder)."""
    if not line:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / COMMANDS, "a", encoding="utf-8") as f:
        f.write(" ".join(line.splitlines()) + "\n")


def _client_section(run_dirs: dict[str, Path]) -> str:
    """Each run's clients in its last client evaluation: id, tier, the headline metric and the
    examples it was measured on, worst first; one collapsible table a run."""
    from fedhet.experiment.logging import CLIENTS, METRICS, read_jsonl

    parts = []
    for name, d in run_dirs.items():
        metrics = read_jsonl(Path(d) / METRICS)
        metric = next((r["metric"] for r in reversed(metrics) if r.get("metric")), None)
        if metric is None:
            continue
        key = f"eval_{metric}"
        rows = [r for r in read_jsonl(Path(d) / CLIENTS) if r.get(key) is not None]
        if not rows:
            continue
        last = max(r["round"] for r in rows)
        rows = sorted((r for r in rows if r["round"] == last), key=lambda r: (r[key], r.get("client", 0)))
        scale, unit = (1.0, "") if metric in ("mse", "loss") else (100.0, " %")
        body = "\n".join(
            f"<tr><td>{_e(r.get('client'))}</td><td>{_e(r.get('tier', '-'))}</td>"
            f'<td class="num">{scale * float(r[key]):.2f}</td>'
            f'<td class="num">{_e(_count(r.get("eval_examples")))}</td></tr>'
            for r in rows
        )
        parts.append(
            f'<details><summary>{_e(name)} <span class="note">{len(rows)} clients, round {last}</span></summary>'
            f'<div class="table"><table><thead><tr><th>client</th><th>tier</th>'
            f'<th class="num">{_e(metric)}{unit}</th><th class="num">test examples</th></tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></div></details>"
        )
    if not parts:
        return ""
    return (
        "<h2 id=\"clients\">Clients</h2>\n<p>Each client's model on its own held-out split in the run's last client "
        "evaluation, worst first (the distribution the clients table and plot summarise).</p>\n" + "\n".join(parts)
    )


def _config_section(run_dirs: dict[str, Path]) -> str:
    parts = []
    for name, d in run_dirs.items():
        path = Path(d) / "config.yaml"
        if path.is_file():
            parts.append(
                f'<details><summary>{_e(name)} <span class="note">{_e(path)}</span></summary>'
                f"<pre>{_e(path.read_text())}</pre></details>"
            )
    if not parts:
        return ""
    return (
        '<h2 id="configs">Configs</h2>\n<p>Each run\'s resolved config (every default spelled out).</p>\n'
        + "\n".join(parts)
    )


def _command_section(out_dir: Path, run_dirs: dict[str, Path], commands: list[str]) -> str:
    seen: dict[str, None] = {}
    for line in [*commands, *read_commands(out_dir), *(c for d in run_dirs.values() for c in read_commands(Path(d)))]:
        seen.setdefault(line, None)
    if not seen:
        return ""
    return (
        '<h2 id="commands">Commands</h2>\n<p>The commands that produced these runs and this report.</p>\n'
        f"<pre>{_e(chr(10).join(seen))}</pre>"
    )


def write_html(out_dir: Path, markdown: str, run_dirs: dict[str, Path], commands: list[str] | None = None) -> Path:
    """Write ``out_dir/report.html`` from the report's Markdown ``markdown`` (its plots read from
    ``out_dir``), the runs' folders (``run_dirs``: name -> folder) and ``commands`` (the command
    lines that made the report; those recorded in ``out_dir`` and the run folders are added)."""
    out_dir = Path(out_dir)
    title, body = markdown_to_html(markdown, out_dir)
    sections = [
        s
        for s in (
            _client_section(run_dirs),
            _config_section(run_dirs),
            _command_section(out_dir, run_dirs, list(commands or [])),
        )
        if s
    ]
    nav = ['<a href="#results">Results</a>']
    for anchor, label in (("clients", "Clients"), ("configs", "Configs"), ("commands", "Commands")):
        if any(f'id="{anchor}"' in s for s in sections):
            nav.append(f'<a href="#{anchor}">{label}</a>')
    written = time.strftime("%Y-%m-%d %H:%M")
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title or 'fedhet report')}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            "<main>",
            f"<h1>{_e(title or 'fedhet report')}</h1>",
            f'<p class="meta">fedhet {_e(__version__)} · {len(run_dirs)} run{"s" if len(run_dirs) != 1 else ""} · written {_e(written)}</p>',
            f"<nav>{''.join(nav)}</nav>",
            '<section id="results">',
            body,
            "</section>",
            *sections,
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )
    path = out_dir / HTML
    path.write_text(page, encoding="utf-8")
    return path
