"""``i2p eval --report``: every section, self-contained, hostile names escaped, atomic, and rendered by Chromium."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from i2p.evaluation import metrics
from i2p.evaluation.cli import evaluate
from i2p.evaluation.labels import discover
from i2p.evaluation.perturb import parse_sweeps
from i2p.evaluation.report import CURVE_POINTS, Group, at_threshold, rates, render_report, write_report
from i2p.evaluation.robustness import ImageScores, SweepResult, sweep
from i2p.synthetic import make_image_folder
from tests.support.fake_artifact import make_artifact
from tests.support.images import write_csv_manifest

SECTIONS = ["metrics", "curves", "histograms", "calibration", "robustness", "false-positives", "missed-fakes"]
HOSTILE_FILES = [
    "<img src=x onerror=alert(1)>.png",
    '"onmouseover="alert(2)".png',
    "<svg onload=alert(3)>.png",
]
HOSTILE_GENERATORS = ["<script>alert(4)</script>", '"><iframe src=javascript:alert(5)>', "a&b 'c'"]


class Page(HTMLParser):
    """Every tag and attribute of a page, and the text of its scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def ids(self, tag: str) -> list[str]:
        return [a["id"] for t, a in self.tags if t == tag and "id" in a]

    def attrs(self, name: str) -> list[str]:
        return [a[name] or "" for _, a in self.tags if name in a]


def assert_self_contained(text: str) -> Page:
    page = Page(text)
    assert all(v.startswith(("data:", "#")) for v in page.attrs("src") + page.attrs("href")), (
        "a link leaves the page"
    )
    assert "http://" not in text and "https://" not in text
    assert [a for t, a in page.tags if t == "script"] == [{}], "one inline script, no src"
    assert not [t for t, _ in page.tags if t in ("link", "iframe", "object", "embed", "base", "form")]
    assert not [(t, k) for t, a in page.tags for k in a if k.startswith("on")], "an event handler attribute"
    (csp,) = [
        a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert csp.startswith("default-src 'none'; img-src data:;")
    return page


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny labelled folder, a tiny artifact, and ``i2p eval --perturb --report`` run on them."""
    root = tmp_path_factory.mktemp("report")
    make_image_folder(root / "data", n_per_class=6, size=(48, 40), generators=("gen_a", "gen_b", "gen_c"))
    art = make_artifact(root / "m.i2p", size=32, threshold=0.5)
    out = root / "report.html"
    args = ["--model", str(art), "--data", str(root / "data"), "--perturb", "jpeg:50", "--report", str(out)]
    res = CliRunner().invoke(evaluate, [*args, "--backend", "onnxruntime", "--workers", "0"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return root, art, out


def test_eval_report_holds_every_section_and_nothing_from_outside(evaluated):
    _, _, out = evaluated
    text = out.read_text()
    page = assert_self_contained(text)
    assert page.ids("section") == SECTIONS
    svgs = [a for t, a in page.tags if t == "svg"]
    assert (
        len(svgs) == 2 + 4 + 1 + 1
    )  # ROC, DET; histograms of all images and 3 generators; calibration; sweep
    assert {"ROC curve", "DET curve (probit scales)", "scores: gen_b", "auc under each condition"} <= {
        a["aria-label"] for a in svgs
    }
    # the threshold's operating point is marked on ROC and DET: one dot per curve (all images + 3 generators)
    assert text.count('stroke="#000" stroke-width="0.8"/>') >= 2 * 4
    thumbs = [s for s in page.attrs("src") if s.startswith("data:image/jpeg;base64,")]
    assert thumbs, "no mistake thumbnails: the artifact should get some images wrong"
    for uri in thumbs:
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert img.format == "JPEG" and max(img.size) <= 128
    for g in ("gen_a", "gen_b", "gen_c", "mean", "jpeg:50"):
        assert f"<th>{g}</th>" in text


def scored_by_size(fake_width: int):
    """A stand-in detector: "fake" exactly for images ``fake_width`` px wide (the fakes below are 40 px)."""
    return lambda images: np.array([0.95 if i.width == fake_width else 0.05 for i in images])


def labelled_set(tmp_path: Path, names=("a.png",) * 3, generators=("g",) * 3) -> Path:
    """Reals (50 px) and fakes (40 px) named ``names``, of ``generators``, listed in a CSV."""
    rows = []
    for k, (name, gen) in enumerate(zip(names, generators, strict=True)):
        for label, size in ((0, 50), (1, 40)):
            folder = tmp_path / f"{label}_{k}"
            folder.mkdir()
            Image.new("RGB", (size, size), (40 * k, 90, 200 - 60 * label)).save(folder / name)
            rows.append((folder / name, label, gen))
    return write_csv_manifest(tmp_path / "set.csv", rows)


def test_report_without_perturb_has_no_sweep_and_empty_galleries_say_so(tmp_path):
    perfect = sweep(discover(labelled_set(tmp_path)), parse_sweeps([]), scored_by_size(40), threshold=0.5)
    assert perfect.metrics["clean"]["g"].auc == 1.0
    text = render_report(perfect, "perfect")
    assert assert_self_contained(text).ids("section") == [s for s in SECTIONS if s != "robustness"]
    assert "none: every real image scored below the threshold" in text
    assert "none: every fake image scored at or above the threshold" in text
    assert "data:image/jpeg" not in text


def test_fakes_only_and_a_long_generator_name_still_make_a_page(tmp_path):
    long_name = "generator-" + "x" * 300
    csv = labelled_set(tmp_path, generators=(long_name, long_name, "g"))
    fakes = [s for s in discover(csv) if s.label == 1]
    result = sweep(fakes, parse_sweeps(["blur:1"]), scored_by_size(50), threshold=0.5)
    text = render_report(result, "t")
    assert assert_self_contained(text).ids("section") == SECTIONS
    assert text.count("needs both real and fake images") == 2  # ROC and DET say why they are empty
    assert f"<th>{long_name}</th>" in text  # the table has the full name; figure titles are clipped
    assert all(len(t) < 100 for t in re.findall(r'font-weight="600"[^>]*>([^<]*)</text>', text))


def test_hostile_file_and_generator_names_are_escaped(tmp_path):
    csv = labelled_set(tmp_path, HOSTILE_FILES, HOSTILE_GENERATORS)
    result = sweep(discover(csv), parse_sweeps(["jpeg:80"]), scored_by_size(50), threshold=0.5)
    result.skipped.append(('<script>alert("skipped")</script>', "<b>bad</b>"))
    text = render_report(result, "<title>x</title><script>alert(6)</script>")
    page = assert_self_contained(text)
    for raw in [*HOSTILE_FILES, *HOSTILE_GENERATORS, "<title>x</title>", "<b>bad</b>", "alert(6)</script>"]:
        assert raw not in text, raw
    assert (
        "&lt;img src=x onerror=alert(1)&gt;.png" in text and "&lt;script&gt;alert(4)&lt;/script&gt;" in text
    )
    assert {t for t, _ in page.tags if t in ("img", "iframe", "title", "script")} == {
        "img",
        "title",
        "script",
    }
    assert len([t for t, _ in page.tags if t == "img"]) == 6  # every image is a mistake: 3 + 3 thumbnails
    assert page.scripts == [page.scripts[0]] and "alert" not in page.scripts[0]


def test_an_image_gone_since_scoring_gets_a_placeholder_not_a_crash(tmp_path):
    result = sweep(discover(labelled_set(tmp_path)), parse_sweeps([]), scored_by_size(50), threshold=0.5)
    gone, corrupt = result.scores["clean"].paths[:2]
    os.unlink(gone)
    Path(corrupt).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    page = Page(render_report(result, "t"))
    assert len([t for t, _ in page.tags if t == "img"]) == 4
    assert page.ids("section") == [s for s in SECTIONS if s != "robustness"]
    assert sum(a.get("aria-label") == "no thumbnail" for _, a in page.tags) == 2


@pytest.mark.parametrize("plant", ["file", "dangling", "directory"])
def test_write_report_replaces_a_planted_link_and_never_follows_it(tmp_path, plant):
    target = {
        "file": tmp_path / "victim.txt",
        "dangling": tmp_path / "nowhere",
        "directory": tmp_path / "dir",
    }[plant]
    if plant == "file":
        target.write_text("precious")
    elif plant == "directory":
        target.mkdir()
    out = tmp_path / "report.html"
    out.symlink_to(target)
    write_report(tiny_result(), out, "t")
    assert not out.is_symlink() and out.read_text().startswith("<!DOCTYPE html>")
    assert (target.read_text() == "precious") if plant == "file" else not target.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def tiny_result(n: int = 8, seed: int = 0) -> SweepResult:
    """Scores without image files behind them (the galleries then show placeholders)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    scores = ImageScores(tuple(f"/nonexistent/{i}.png" for i in range(n)), y, ("g",) * n, p)
    clean = metrics.evaluate(y, p, scores.generators, 0.5)
    return SweepResult(0.5, {"clean": clean}, {"clean": None}, [], scores={"clean": scores})


def test_curves_start_and_end_at_the_corners_and_stay_small_for_many_images():
    result = tiny_result(n=100_000)
    s = result.scores["clean"]
    group = Group("all", s.labels.astype(bool), s.probabilities, "#000")
    fpr, tpr = rates(group)
    assert len(fpr) <= CURVE_POINTS + 1 and (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    m = result.metrics["clean"]["g"]
    assert at_threshold(group, 0.5) == pytest.approx((1 - m.acc_real, m.acc_fake))
    assert len(render_report(result, "big").encode()) < 400_000  # 12 + 12 placeholders, decimated curves


@pytest.mark.parametrize(
    "where, message",
    [("{tmp}/no/such/folder/r.html", "does not exist"), ("{tmp}", "is a directory")],
)
def test_a_bad_report_path_is_a_usage_error_before_any_evaluation(tmp_path, where, message):
    art = make_artifact(tmp_path / "m.i2p", size=32)
    make_image_folder(tmp_path / "d", n_per_class=1, generators=("g",))
    args = ["--model", str(art), "--data", str(tmp_path / "d"), "--report", where.format(tmp=tmp_path)]
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


# ------------------------------------------------------------------------------------------------ a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def load_in_chromium(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(the DOM after the load event, console lines) from headless Chromium."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [
        line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line
    ]


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is absent (Debian: apt-get install chromium; .ci/run does)"
)
def test_chromium_renders_every_figure_without_console_errors(evaluated, tmp_path):
    _, _, out = evaluated
    dom, console = load_in_chromium(out, tmp_path)
    assert console == []
    figures = [a for t, a in Page(dom).tags if t == "figure"]
    assert len(figures) > 8 and f'data-figures="{len(figures)}"' in dom  # the page's check ran, over all
    assert [f.get("data-rendered") for f in figures] == ["yes"] * len(figures)
    # the check can fail: an injected handler and a changed script are both refused, and said so
    bad = tmp_path / "tampered.html"
    bad.write_text(out.read_text().replace("<h1>", "<h1><img src=x onerror=alert(1)>").replace("yes", "ok"))
    dom, console = load_in_chromium(bad, tmp_path)
    assert len(console) >= 2 and "data-rendered" not in dom
