"""``i2p eval --report``: one self-contained HTML page of an evaluation, to look at rather than read.

Figures are inline SVG drawn here, not matplotlib: ``i2p eval --model`` runs on the lean install
(numpy, Pillow, onnxruntime, click). Thumbnails are small JPEG data URIs decoded by the runtime's own
guarded decoder, so a hostile image file costs no more here than in ``i2p-detect``. Every string that
came from outside (file names, generator names, decode errors) is HTML-escaped, and the page's
Content-Security-Policy forbids any network load and any script but its own, which only records that
every figure rendered (``data-rendered``; the browser test reads it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from i2p.base.files import write_bytes_atomic
from i2p.runtime.preprocess import ImageError, load_image

from .metrics import MEAN, TABLE_COLUMNS, Metrics, _counts_by_threshold, expected_calibration_error
from .robustness import ImageScores, SweepResult
from .svg_chart import ALL, FAKE, PALETTE, REAL, Chart, category_axis, det_axis, esc, linear_axis, message_svg
from .verdicts import UncertainShare, uncertain_shares

CURVE_POINTS = 800  # a ROC/DET polyline is decimated to about this many points (100k images stay small)
CALIBRATION_BINS = 15  # the bins of metrics.expected_calibration_error
HISTOGRAM_BINS = 20

# The page's only script: marks each figure rendered (non-zero size, images decoded) for the browser test.
CHECK_SCRIPT = """addEventListener("load", () => {
  const figures = document.querySelectorAll("figure");
  for (const f of figures) {
    const el = f.querySelector("svg, img"), box = el ? el.getBoundingClientRect() : {width: 0, height: 0};
    const decoded = !el || el.tagName !== "IMG" || (el.complete && el.naturalWidth > 0);
    f.dataset.rendered = box.width > 0 && box.height > 0 && decoded ? "yes" : "no";
  }
  document.body.dataset.figures = String(figures.length);
});"""
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(CHECK_SCRIPT.encode()).digest()).decode()}'"
)


# ------------------------------------------------------------------------------------------------ the figures


@dataclass(frozen=True)
class Group:
    """The images one curve is drawn from: a generator's, or all of them."""

    name: str
    labels: np.ndarray  # bool, True = fake
    probabilities: np.ndarray
    color: str

    @property
    def both_classes(self) -> bool:
        return bool(self.labels.any() and (~self.labels).any())


def groups(scores: ImageScores) -> list[Group]:
    """All images first, then each generator (sorted, as in the metrics table) that has any."""
    labels, gens = scores.labels.astype(bool), np.asarray(scores.generators, dtype=object)
    out = [Group("all images", labels, scores.probabilities, ALL)]
    names = sorted(set(scores.generators))
    if len(names) > 1:
        for i, g in enumerate(names):
            out.append(
                Group(g, labels[gens == g], scores.probabilities[gens == g], PALETTE[i % len(PALETTE)])
            )
    return out


def rates(group: Group) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from "nothing fake" to "all fake", decimated."""
    _, tp, fp = _counts_by_threshold(group.labels, group.probabilities)
    fpr = np.r_[0, fp] / (~group.labels).sum()
    tpr = np.r_[0, tp] / group.labels.sum()
    if len(fpr) > CURVE_POINTS:
        keep = np.unique(np.linspace(0, len(fpr) - 1, CURVE_POINTS).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def at_threshold(group: Group, threshold: float) -> tuple[float, float]:
    """(FPR, TPR) of the operating point: "fake" when the probability is >= the threshold."""
    fake = group.probabilities >= threshold
    return float(fake[~group.labels].mean()), float(fake[group.labels].mean())


def roc_det_figures(gs: Sequence[Group], threshold: float) -> tuple[str, str]:
    drawable = [g for g in gs if g.both_classes]
    if not drawable:
        why = "needs both real and fake images"
        return (
            f"<figure>{message_svg('ROC curve', why)}</figure>",
            f"<figure>{message_svg('DET curve', why)}</figure>",
        )
    roc = Chart("ROC curve", linear_axis("false-positive rate (reals called fake)"),
                linear_axis("true-positive rate (fakes caught)"))  # fmt: skip
    det = Chart("DET curve (probit scales)", det_axis("false-positive rate"), det_axis("miss rate (fakes missed)"))  # fmt: skip
    roc.line([0, 1], [0, 1], "#bbb", dash="4 4")
    for g in drawable:
        fpr, tpr = rates(g)
        width = 2.4 if g.color == ALL else 1.4
        roc.line(fpr, tpr, g.color, g.name, width)
        det.line(fpr, 1 - tpr, g.color, g.name, width)
    for g in drawable:  # the markers above every curve
        f, t = at_threshold(g, threshold)
        label = f"at threshold {threshold:.3f}" if g is drawable[0] else ""
        roc.dots([f], [t], g.color, label)
        det.dots([f], [1 - t], g.color, label)
    return roc.figure(), det.figure()


def histogram_figure(group: Group, threshold: float) -> str:
    title = f"scores: {group.name}"
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    parts = [(~group.labels, "real", REAL), (group.labels, "fake", FAKE)]
    shares = [np.histogram(group.probabilities[m], edges)[0] / max(1, m.sum()) for m, _, _ in parts]
    top = max(0.05, float(max(s.max() for s in shares)) * 1.1)
    chart = Chart(title, linear_axis("probability of fake"), linear_axis("share of the class", 0, top))
    for share, (mask, name, color) in zip(shares, parts, strict=True):
        if mask.any():
            chart.bars(edges, share, color, f"{name} (n={int(mask.sum())})")
    chart.vline(threshold, f"threshold {threshold:.3f}")
    return chart.figure()


def calibration_figure(group: Group) -> str:
    """Reliability diagram over the bins of ``expected_calibration_error`` (dot area ~ images in the bin)."""
    p, y = group.probabilities, group.labels
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    which = np.searchsorted(edges[1:-1], p)
    n = np.bincount(which, minlength=CALIBRATION_BINS)
    used = n > 0
    conf = np.bincount(which, p, CALIBRATION_BINS)[used] / n[used]
    frac = np.bincount(which, y, CALIBRATION_BINS)[used] / n[used]
    ece = expected_calibration_error(y, p, CALIBRATION_BINS)
    chart = Chart(f"calibration, all images (ECE {ece:.3f})", linear_axis("mean probability of fake in bin"),
                  linear_axis("fraction of fakes in bin"))  # fmt: skip
    chart.line([0, 1], [0, 1], "#999", "perfectly calibrated", dash="4 4")
    chart.line(conf, frac, ALL, width=1.2)
    chart.dots(conf, frac, "#f0a030", "bin (area ~ images)", radii=3 + 9 * np.sqrt(n[used] / n.max()))
    return chart.figure()


def sweep_figure(result: SweepResult, metric: str) -> str:
    conditions = list(result.metrics)
    generators = list(result.metrics[conditions[0]])
    values = np.array([[getattr(result.metrics[c][g], metric) for c in conditions] for g in generators])
    finite = values[np.isfinite(values)]
    lo = max(0.0, float(finite.min()) - 0.05) if finite.size else 0.0
    hi = min(1.0, float(finite.max()) + 0.05) if finite.size else 1.0
    lo, hi = (lo, hi) if hi > lo else (max(0.0, lo - 0.05), min(1.0, hi + 0.05))
    chart = Chart(f"{metric} under each condition", category_axis("condition", conditions),
                  linear_axis(metric, lo, hi))  # fmt: skip
    for i, (g, row) in enumerate(zip(generators, values, strict=True)):
        color = ALL if g == MEAN else PALETTE[i % len(PALETTE)]
        chart.line(range(len(conditions)), row, color, g, 2.4 if g == MEAN else 1.4)
        chart.dots(list(range(len(conditions))), row, color, radii=[3.0] * len(conditions))
    return chart.figure()


# ------------------------------------------------------------------------------------------------ galleries


@dataclass(frozen=True)
class Mistake:
    path: str
    generator: str
    probability: float


def mistakes(
    scores: ImageScores, threshold: float, limit: int
) -> tuple[list[Mistake], int, list[Mistake], int]:
    """The most confident false positives (reals scored highest) and missed fakes (fakes scored lowest),
    at most ``limit`` of each, with how many there are in all."""
    p, fake = scores.probabilities, scores.labels.astype(bool)
    called = p >= threshold
    fp = np.flatnonzero(~fake & called)
    fn = np.flatnonzero(fake & ~called)
    fp = fp[np.argsort(-p[fp], kind="stable")]
    fn = fn[np.argsort(p[fn], kind="stable")]

    def rows(idx: np.ndarray) -> list[Mistake]:
        return [Mistake(scores.paths[i], scores.generators[i], float(p[i])) for i in idx[:limit]]

    return rows(fp), len(fp), rows(fn), len(fn)


def thumbnail(path: str, size: int) -> str:
    """A JPEG data URI of the image at most ``size`` px a side, decoded as ``i2p-detect`` decodes."""
    img = load_image(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_html(rows: Sequence[Mistake], total: int, size: int, empty: str) -> str:
    if not rows:
        return f'<p class="note">{esc(empty)}</p>'
    cards = []
    for m in rows:
        try:
            img = f'<img src="{thumbnail(m.path, size)}" alt="{esc(Path(m.path).name)}">'
        except (ImageError, OSError) as e:  # the file changed or vanished since it was scored
            img = message_svg("no thumbnail", str(e)[:80])
        cards.append(
            f'<figure class="thumb" title="{esc(m.path)}">{img}<figcaption><b>{m.probability:.3f}</b> '
            f'{esc(m.generator)}<br><span class="name">{esc(Path(m.path).name)}</span></figcaption></figure>'
        )
    shown = f"the {len(rows)} most confident of {total}" if total > len(rows) else f"all {total}"
    return f'<p class="note">{shown}; hover for the full path</p><div class="gallery">{"".join(cards)}</div>'


# ------------------------------------------------------------------------------------------------ the page


def metrics_html(metrics: dict[str, Metrics]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in ("generator", *TABLE_COLUMNS))
    body = []
    for g, m in metrics.items():
        cells = []
        for c in TABLE_COLUMNS:
            v = getattr(m, c)
            cells.append(
                f"<td>{v}</td>" if c == "n" else f"<td>{'n/a' if math.isnan(v) else f'{v:.4f}'}</td>"
            )
        row_class = ' class="mean"' if g == MEAN else ""
        body.append(f"<tr{row_class}><th>{esc(g)}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def sweep_html(result: SweepResult, metric: str) -> str:
    conditions = list(result.metrics)
    generators = list(result.metrics[conditions[0]])
    clean = getattr(result.metrics[conditions[0]][MEAN], metric)
    head = "".join(f"<th>{esc(g)}</th>" for g in ("condition", *generators, f"Δ{metric} (mean) vs clean"))
    body = []
    for c in conditions:
        vals = [getattr(result.metrics[c][g], metric) for g in generators]
        delta = getattr(result.metrics[c][MEAN], metric) - clean
        cells = "".join(f"<td>{'n/a' if math.isnan(v) else f'{v:.4f}'}</td>" for v in vals)
        body.append(
            f"<tr><th>{esc(c)}</th>{cells}<td>{'n/a' if math.isnan(delta) else f'{delta:+.4f}'}</td></tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def uncertain_html(shares: Sequence[UncertainShare]) -> str:
    """One row per condition: the share of images flagged uncertain, per generator, among wrong and right."""
    generators = list(shares[0].per_generator)
    head = "".join(f"<th>{esc(c)}</th>" for c in ("condition", "all", *generators, "of wrong", "of right"))

    def cell(v: float) -> str:
        return f"<td>{'n/a' if math.isnan(v) else f'{v:.1%}'}</td>"

    body = [
        f"<tr><th>{esc(s.condition)}</th>{cell(s.flagged)}"
        + "".join(cell(s.per_generator.get(g, math.nan)) for g in generators)
        + f"{cell(s.wrong)}{cell(s.right)}</tr>"
        for s in shares
    ]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 0 16px 40px; color: #222; }
h1 { font-size: 1.4em; margin-top: 20px; } h2 { font-size: 1.15em; margin-top: 28px; border-bottom: 1px solid #ddd; }
nav a { margin-right: 12px; } .note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } thead th { background: #f3f3f3; }
thead th:first-child { text-align: left; }
tbody th { text-align: left; font-weight: normal; } tr.mean { font-weight: 600; background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 0; }
.figures svg { max-width: 100%; height: auto; border: 1px solid #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figcaption { font-size: 0.85em; max-width: 440px; } .key { margin-right: 12px; white-space: nowrap; }
.key i { display: inline-block; width: 16px; height: 3px; margin-right: 4px; vertical-align: middle; }
.key i.dot { width: 9px; height: 9px; border-radius: 50%; border: 1px solid #000; }
.key i.box { height: 10px; opacity: 0.5; }
.thumb { width: 130px; font-size: 0.8em; }
.thumb img, .thumb svg { width: 128px; height: 128px; object-fit: contain; background: #eee; border: 1px solid #ccc; }
.name { word-break: break-all; color: #555; }
"""


def render_report(
    result: SweepResult, title: str, metric: str = "auc", gallery: int = 12, thumb_px: int = 128
) -> str:
    """The page as a string; figures from the first (clean) condition's per-image scores."""
    clean = next(iter(result.metrics))
    if clean not in result.scores:
        raise ValueError("the report needs per-image scores: evaluate with evaluation.robustness.sweep")
    scores, t = result.scores[clean], result.threshold
    gs = groups(scores)
    n_fake = int(scores.labels.sum())
    scorer = f"; {result.scorer['backend']}, {result.scorer['precision']}" if result.scorer else ""
    roc, det = roc_det_figures(gs, t)
    fp, n_fp, fn, n_fn = mistakes(scores, t, gallery)
    sections = [
        ("metrics", "Metrics per generator", "At the threshold for accuracies; the mean row is the unweighted "
         "mean over generators.", metrics_html(result.metrics[clean])),
        ("curves", "ROC and DET curves", "Every threshold at once; the dots are the threshold this evaluation "
         "used. The DET curve stretches the low error rates that matter in production.",
         f'<div class="figures">{roc}{det}</div>'),
        ("histograms", "Score histograms, real vs fake", "How far apart the classes sit and where the "
         "threshold cuts them (each class's bars sum to 1).",
         '<div class="figures">' + "".join(histogram_figure(g, t) for g in gs) + "</div>"),
        ("calibration", "Calibration", "Dots on the diagonal: the probability means what it says.",
         f'<div class="figures">{calibration_figure(gs[0])}</div>'),
    ]  # fmt: skip
    if len(result.metrics) > 1:
        sections.append(("robustness", "Robustness sweep", f"{metric} of the same images under each degradation.",
                         f'<div class="figures">{sweep_figure(result, metric)}</div>'
                         + sweep_html(result, metric)))  # fmt: skip
    shares = uncertain_shares(result)
    if shares:
        sections.append(("uncertain", "Verdicts flagged uncertain", "Share of images whose OOD score is above the "
                         "artifact's threshold (unlike the training images): overall, per generator, and among "
                         "the wrong and the right verdicts. A useful flag catches more of the wrong ones.",
                         uncertain_html(shares)))  # fmt: skip
    sections += [
        ("false-positives", "Real images called fake", "Highest score first.",
         gallery_html(fp, n_fp, thumb_px, "none: every real image scored below the threshold")),
        ("missed-fakes", "Fake images missed", "Lowest score first.",
         gallery_html(fn, n_fn, thumb_px, "none: every fake image scored at or above the threshold")),
    ]  # fmt: skip
    if result.skipped:
        items = "".join(f"<li>{esc(p)}: {esc(r)}</li>" for p, r in result.skipped)
        sections.append(("skipped", "Files not scored", f"{len(result.skipped)} files.", f"<ul>{items}</ul>"))
    nav = "".join(f'<a href="#{key}">{esc(name)}</a>' for key, name, _, _ in sections)
    body = "".join(
        f'<section id="{key}"><h2>{esc(name)}</h2><p class="note">{esc(note)}</p>{content}</section>'
        for key, name, note, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>"
        f"<h1>{esc(title)}</h1><p>{len(scores.paths)} images ({len(scores.paths) - n_fake} real, {n_fake} fake), "
        f"{len(set(scores.generators))} generator(s); threshold {t:.4f}{esc(scorer)}.</p><nav>{nav}</nav>{body}"
        f"<script>{CHECK_SCRIPT}</script></body></html>\n"
    )


def write_report(
    result: SweepResult, path: str | Path, title: str, metric: str = "auc", gallery: int = 12
) -> Path:
    """Write the page atomically: a link planted at ``path`` is replaced, never followed."""
    path = Path(path)
    page = render_report(result, title, metric, gallery).encode()
    try:
        write_bytes_atomic(path, page)
    except OSError as e:
        raise ValueError(f"{path}: cannot write the report ({e.strerror or e})") from e
    return path
