"""Shortcut audit: metadata read from headers, biased sets flagged by name, aligned sets left alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from i2p.cli import main
from i2p.evaluation.audit import audit, jpeg_quality, read_meta
from i2p.evaluation.labels import discover

N = 20  # per class: enough for the audit's noise check to allow a warning


def _write(path, size=(32, 32), fmt="JPEG", seed=0, **save):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt, **save)


def _make_set(root, real, fake, n=N):
    """``real``/``fake``: seed -> (file name, size, format, save options)."""
    for cls, spec in (("0_real", real), ("1_fake", fake)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            name, size, fmt, save = spec(i)
            _write(root / cls / name, size, fmt, seed=i + 1000 * (cls == "1_fake"), **save)
    return discover(root)


def jpg(q=90, size=(32, 32), **kw):
    return lambda i: (f"{i}.jpg", size, "JPEG", {"quality": q, **kw})


def png(size=(32, 32)):
    return lambda i: (f"{i}.png", size, "PNG", {})


@pytest.mark.parametrize("quality", [1, 10, 30, 49, 50, 51, 75, 90, 95, 100])
def test_jpeg_quality_is_read_back_from_the_quantization_tables(tmp_path, quality):
    _write(tmp_path / "a.jpg", quality=quality)
    assert read_meta(tmp_path / "a.jpg").jpeg_quality == quality


def test_jpeg_quality_of_a_foreign_table_is_the_nearest_ijg_quality():
    assert jpeg_quality([2] * 64) in range(90, 101)
    with pytest.raises(ValueError, match="64 entries"):
        jpeg_quality([1] * 63)


def test_header_fields(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    _write(
        tmp_path / "a.jpg", (40, 20), quality=80, subsampling="4:4:4", progressive=True, exif=exif.tobytes()
    )
    m = read_meta(tmp_path / "a.jpg")
    assert (m.format, m.jpeg_quality, m.subsampling, m.progressive) == ("JPEG", 80, "4:4:4", True)
    assert (m.width, m.height, m.aspect, m.mode, m.bit_depth, m.exif, m.camera) == (
        40,
        20,
        2.0,
        "RGB",
        8,
        True,
        True,
    )
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "b.png")
    _write(tmp_path / "c.jpg", subsampling="4:2:2")
    b, c = read_meta(tmp_path / "b.png"), read_meta(tmp_path / "c.jpg")
    assert (b.format, b.jpeg_quality, b.subsampling, b.bit_depth, b.exif, b.camera) == (
        "PNG",
        None,
        "none",
        16,
        False,
        False,
    )
    assert (c.subsampling, c.progressive) == ("4:2:2", False)


def test_only_headers_are_read(tmp_path):
    """A file whose pixel data is cut off is still audited: nothing past the header is decoded."""
    buf = io.BytesIO()
    _write(buf, (64, 64), quality=70)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(OSError):
        Image.open(tmp_path / "cut.jpg").load()
    assert read_meta(tmp_path / "cut.jpg").jpeg_quality == 70


def test_a_format_biased_set_is_flagged_naming_the_format(tmp_path):
    result = audit(_make_set(tmp_path, jpg(95), png()))
    assert result.classifier_auc > 0.95
    assert result.feature_auc["format"] == 1.0 and result.feature_auc["width"] == 0.5
    assert len(result.warnings) == 1
    assert (
        "reals are 100% JPEG, fakes 100% PNG: a detector can learn the format; consider --align"
        in result.warnings[0]
    )


def test_a_mostly_biased_set_gives_the_shares(tmp_path):
    result = audit(_make_set(tmp_path, lambda i: (jpg(95) if i else png())(i), png()))
    assert "reals are 95% JPEG, fakes 100% PNG" in result.warnings[0]


def test_a_quality_biased_set_is_flagged_naming_the_quality(tmp_path):
    result = audit(_make_set(tmp_path, jpg(95), jpg(75)))
    assert result.feature_auc["jpeg_quality"] == 1.0 and result.feature_auc["format"] == 0.5
    assert "reals are 100% JPEG quality 95, fakes 100% JPEG quality 75" in result.warnings[0]
    assert "JPEG quality; consider --align" in result.warnings[0]


def test_a_size_biased_set_is_flagged(tmp_path):
    sizes = [(24 + 4 * (i % 7), 24 + 4 * (i % 5)) for i in range(N)]
    result = audit(_make_set(tmp_path, lambda i: jpg(90, sizes[i])(i), jpg(90, (64, 64))))
    assert result.classifier_auc > 0.95
    assert result.warnings and "fakes 100% 64 px" in result.warnings[0]
    assert "reals are 24 px" in result.warnings[0]  # the reals' spread-out sizes: a range, not a share


def test_a_subsampling_biased_set_is_flagged(tmp_path):
    result = audit(_make_set(tmp_path, jpg(90, subsampling="4:2:0"), jpg(90, subsampling="4:4:4")))
    assert "reals are 100% 4:2:0 chroma, fakes 100% 4:4:4 chroma" in result.warnings[0]


@pytest.mark.parametrize(
    "real,fake",
    [
        (jpg(90), jpg(90)),  # aligned
        (
            lambda i: (jpg(90) if i % 2 else png())(i),
            lambda i: (jpg(90) if i % 2 else png())(i),
        ),  # mixed alike
        (lambda i: jpg(60 + i)(i), lambda i: jpg(60 + i)(i)),  # spread alike
    ],
)
def test_an_aligned_set_stays_silent(tmp_path, real, fake):
    result = audit(_make_set(tmp_path, real, fake))
    assert result.warnings == []
    assert result.classifier_auc < 0.7


def test_a_tiny_set_is_not_flagged_on_chance(tmp_path):
    """3 images a class separate perfectly by chance too often to warn about (the noise check)."""
    result = audit(_make_set(tmp_path, jpg(95), png(), n=3))
    assert result.warnings == []


def test_per_generator_shortcuts_are_named(tmp_path):
    _make_set(tmp_path / "d" / "biased", jpg(95), png())
    _make_set(tmp_path / "d" / "fair", jpg(90), jpg(90))
    result = audit(discover(tmp_path / "d"))
    assert set(result.generator_auc) == {"biased", "fair"}
    assert result.generator_auc["biased"] > 0.95 and result.generator_auc["fair"] < 0.7
    assert any(w.startswith("shortcut in biased") for w in result.warnings)
    assert not any("fair" in w for w in result.warnings)


@pytest.mark.parametrize(
    "content",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, b"\xff\xd8\xff" + b"\xff" * 50],
)
def test_unreadable_files_are_skipped_with_a_reason(tmp_path, content):
    samples = _make_set(tmp_path, jpg(95), png())
    (tmp_path / "0_real" / "bad.png").write_bytes(content)
    result = audit(discover(tmp_path))
    assert len(result.samples) == 2 * N
    assert [p for p, _ in result.skipped] == [str(tmp_path / "0_real" / "bad.png")]
    assert "bad.png" in result.skipped[0][1]
    assert len(samples) == 2 * N


def test_a_limit_audits_a_seeded_subset(tmp_path):
    samples = _make_set(tmp_path, jpg(95), png())
    a, b = audit(samples, limit=10, seed=1), audit(samples, limit=10, seed=1)
    assert len(a.samples) == 10 and a.listed == 2 * N
    assert [s.path for s in a.samples] == [s.path for s in b.samples]


def test_cli_table_json_and_plot(tmp_path):
    _make_set(tmp_path / "d", jpg(95), png())
    runner = CliRunner()
    out = runner.invoke(main, ["audit", str(tmp_path / "d"), "--plot", str(tmp_path / "a.png")])
    try:
        import matplotlib  # noqa: F401  (the lean install has none: --plot says which extra to add)
    except ImportError:
        assert (
            out.exit_code == 1 and "--plot needs matplotlib: pip install 'i2p-detector[train]'" in out.output
        )
        out = runner.invoke(main, ["audit", str(tmp_path / "d")])
    else:
        assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert out.exit_code == 0, out.output
    assert "warning: shortcut" in out.output and "JPEG 100%" in out.output
    out = runner.invoke(main, ["audit", str(tmp_path / "d"), "--json"])
    body = json.loads(out.output)
    assert body["classifier_auc"] == 1.0 and body["audited"] == 2 * N
    assert body["distributions"]["d"]["fake"]["format"]["counts"] == {"PNG": N}
    bad = runner.invoke(main, ["audit", str(tmp_path / "d"), "--plot", str(tmp_path / "no" / "a.png")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.parametrize("n", [1, 0])
def test_a_set_too_small_to_check_says_so_rather_than_auc_nan(tmp_path, n):
    """One image a class (or none of one class) gives no cross-validated AUC: the CLI says what it needs."""
    _make_set(tmp_path / "d", jpg(95), png(), n=1)
    if n == 0:
        for f in (tmp_path / "d" / "1_fake").iterdir():
            f.write_bytes(b"not an image")
    out = CliRunner().invoke(main, ["audit", str(tmp_path / "d")])
    assert out.exit_code == 0, out.output
    assert "no shortcut check: it needs readable images of both classes" in out.stdout
    assert "nan" not in out.stdout
