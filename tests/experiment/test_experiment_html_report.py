"""report.html (fedhet.experiment.html_report): it parses, holds every table and plot of report.md,
the per-client results, the resolved configs and the commands, loads nothing from a network, escapes
what it shows, and renders in a real headless browser (Chromium, where installed)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedhet.cli.main import main

pytestmark = pytest.mark.usefixtures("keep_threads")

COMPARISON = """\
name: html-check
base:
  rounds: 3
  data: {dataset: synthetic, num_clients: 4}
  model: {options: {hidden: [4]}}
  devices: {tiers: a1-b1}
  local: {max_steps: 1}
  runtime: {threads: 1}
  logging: {progress: "off"}
variants:
  "FedAvg <b>&": {}
  HeteroFL: {algorithm: {name: heterofl}}
"""


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A finished comparison (``fedhet compare``): its report.md, plots and report.html."""
    root = tmp_path_factory.mktemp("html")
    (root / "cmp.yaml").write_text(COMPARISON)
    folder = root / "out"
    assert main(["compare", str(root / "cmp.yaml"), "--out", str(folder)]) == 0
    return folder


class Page(HTMLParser):
    """Tables (rows of cell texts), images, <pre> texts, <summary> texts and every attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self.pres: list[str] = []
        self.summaries: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self._summary: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "pre":
            self._pre = []
        elif tag == "summary":
            self._summary = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None
        elif tag == "summary" and self._summary is not None:
            self.summaries.append("".join(self._summary).strip())
            self._summary = None

    def handle_data(self, data):
        for part in (self._cell, self._pre, self._summary):
            if part is not None:
                part.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not re.fullmatch(r"\|(-+:?\|)+", line.replace(" ", "")):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


def test_the_page_holds_every_table_and_plot_of_the_report(out):
    md = (out / "report.md").read_text()
    page = parse(out / "report.html")
    want = markdown_tables(md)
    assert len(want) >= 4  # results, per model, per width, time to accuracy, clients
    # every table of report.md, cell for cell and in order, then one per-client table a variant
    assert page.tables[: len(want)] == want
    assert len(page.tables) == len(want) + 2
    # every plot of report.md, embedded byte for byte with its caption
    refs = re.findall(r"^!\[([^\]]*)\]\(([^)]+)\)$", md, flags=re.M)
    assert len(refs) >= 4
    assert [(i["alt"], i["src"]) for i in page.images] == [
        (alt, "data:image/png;base64," + base64.b64encode((out / src).read_bytes()).decode()) for alt, src in refs
    ]
    # and every plot in the folder is among them
    assert {src for _, src in refs} == {p.name for p in out.glob("*.png")}


def test_the_page_shows_clients_configs_and_commands(out):
    page = parse(out / "report.html")
    # the per-client distribution: each client's own-split accuracy in the last evaluation, worst first
    assert page.summaries[:2] == ["FedAvg <b>& 4 clients, round 3", "HeteroFL 4 clients, round 3"]
    clients = page.tables[-1]
    assert clients[0] == ["client", "tier", "accuracy %", "test examples"] and len(clients) == 5
    values = [float(r[2]) for r in clients[1:]]
    assert values == sorted(values)
    # each variant's resolved config, collapsible
    configs = [(out / d / "config.yaml").read_text() for d in ("FedAvg_b", "HeteroFL")]
    assert all(c in page.pres for c in configs)
    assert any("algorithm:\n  name: heterofl" in p for p in page.pres)
    # the command that made the comparison
    assert any(re.search(r"^fedhet compare \S+cmp\.yaml --out \S+out$", p, flags=re.M) for p in page.pres)


def test_the_page_is_self_contained_and_escaped(out):
    text = (out / "report.html").read_text(encoding="utf-8")
    page = parse(out / "report.html")
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    # nothing is loaded from anywhere: no scripts, style sheets, frames or fonts; only data: and #anchors
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    for tag, name, value in page.attrs:
        if name in ("src", "href", "srcset", "action"):
            assert value.startswith(("data:image/png;base64,", "#")), (tag, name, value[:40])
    assert not re.search(r"https?://", text)
    assert "@import" not in text and "url(" not in text
    # the variant's name is shown as text, never as markup
    assert "FedAvg &lt;b&gt;&amp;" in text and "FedAvg <b>&" not in text


def test_fedhet_report_writes_the_page_with_its_command(out, tmp_path, capsys):
    runs = [str(out / "FedAvg_b"), str(out / "HeteroFL")]
    assert main(["report", *runs, "--out", str(tmp_path / "rep"), "--title", "two <runs>"]) == 0
    assert f"html: {tmp_path / 'rep' / 'report.html'}" in capsys.readouterr().out
    page = parse(tmp_path / "rep" / "report.html")
    assert "<title>two &lt;runs&gt;</title>" in (tmp_path / "rep" / "report.html").read_text()
    assert len(page.images) == len(list((tmp_path / "rep").glob("*.png")))
    assert any(
        f"fedhet report {runs[0]} {runs[1]} --out {tmp_path / 'rep'} --title 'two <runs>'" in p for p in page.pres
    )


# ------------------------------------------------------------------------------ a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browse(binary: str, tmp: Path, *flags: str, url: str, timeout: float = 60.0) -> str:
    """Run headless Chromium once; its whole process group is killed if it hangs."""
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        *flags,
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish in {timeout:.0f} s (killed)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return stdout


def test_the_page_renders_in_headless_chromium(out, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium): report.html is not opened in a browser"
        )
    import numpy as np
    from PIL import Image

    page = (out / "report.html").read_text(encoding="utf-8")
    # every image decoded: a copy of the page notes each image's size once loaded, read from the DOM
    probe = tmp_path / "probe.html"
    script = (
        "<script>addEventListener('load', () => { document.body.dataset.sizes = "
        "[...document.images].map(i => i.complete ? i.naturalWidth + 'x' + i.naturalHeight : 'none').join(' '); });"
        "</script></body>"
    )
    probe.write_text(page.replace("</body>", script), encoding="utf-8")
    dom = _browse(binary, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url=probe.as_uri())
    sizes = re.search(r'data-sizes="([^"]*)"', dom)
    assert sizes is not None, dom[:500]
    shown = sizes.group(1).split()
    assert len(shown) == page.count("<img ") >= 4
    for size in shown:
        w, _, h = size.partition("x")
        assert int(w) > 100 and int(h) > 100, shown
    assert "<h1>html-check</h1>" in dom
    # a screenshot of the page itself: drawn, and its plots' colours are on it
    shot = tmp_path / "report.png"
    _browse(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url=(out / "report.html").as_uri())
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (2000, 1200, 3)
    assert pixels.std() > 20  # not a blank page
    blue = np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 30  # matplotlib's first line colour
    assert blue.sum() > 200
