"""benchmarks/perf_families.py's glue: which models it measures and that a rerun resumes where it stopped.

The measurement itself (minutes per model) is not run here; ``run`` gets a fake one."""

from __future__ import annotations

import json

import pytest

from benchmarks import perf_families as pf
from i2p.train import backbones


def test_default_and_quick_lists_name_one_model_per_family_that_the_package_accepts():
    default, quick = (
        pf.parse_args(["--out", "x"]).model_list,
        pf.parse_args(["--out", "x", "--quick"]).model_list,
    )
    assert default == [e.model for e in pf.ENTRIES] and quick == [e.quick for e in pf.ENTRIES]
    assert default != quick
    for name in {*default, *quick}:
        assert backbones.for_model(name) is not None  # i2p-train --model takes it
    families = {backbones.for_model(n).name for n in default}
    assert families == {"open_clip", "timm", "open_clip_timm"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ViT-B-16", ["ViT-B-16"]),
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ("b,a,b", ["b", "a"]),  # order kept, repeats dropped
    ],
)
def test_models_option_is_a_comma_list_and_overrides_quick(given, expected):
    assert pf.parse_args(["--out", "x", "--models", given, "--quick"]).model_list == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --out is required
        ["--out", "x", "--models", " , "],
        ["--out", "x", "--threads", "0"],
        ["--out", "x", "--repeats", "0"],
        ["--out", "x", "--train-batch", "-1"],
    ],
)
def test_bad_command_lines_exit(argv):
    with pytest.raises(SystemExit):
        pf.parse_args(argv)


def test_a_rerun_skips_models_already_measured_and_appends_the_rest(tmp_path):
    out = tmp_path / "families.jsonl"
    calls = []

    def fake(model):
        calls.append(model)
        return {"params": len(model)}

    assert pf.run(["ViT-B-16", "vit_small_patch14_dinov2"], out, fake, echo=lambda _: None) == [
        "ViT-B-16",
        "vit_small_patch14_dinov2",
    ]
    assert pf.run(
        ["ViT-B-16", "PE-Core-B-16", "vit_small_patch14_dinov2"], out, fake, echo=lambda _: None
    ) == ["PE-Core-B-16"]
    assert calls == ["ViT-B-16", "vit_small_patch14_dinov2", "PE-Core-B-16"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in rows] == calls
    assert rows[0]["family"] == "CLIP (open_clip ViT)" and rows[0]["params"] == len("ViT-B-16")
    assert rows[2]["family"] == "PE-Core"


def test_a_failing_model_gets_an_error_line_and_the_others_still_run(tmp_path):
    out = tmp_path / "families.jsonl"

    def fake(model):
        if model == "bad":
            raise RuntimeError("out of memory")
        return {"params": 1}

    assert pf.run(["bad", "good"], out, fake, echo=lambda _: None) == ["bad", "good"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["error"] == "RuntimeError: out of memory" and "params" not in rows[0]
    assert rows[1]["params"] == 1
    assert pf.run(["bad", "good"], out, fake, echo=lambda _: None) == []  # recorded: delete the line to retry


@pytest.mark.parametrize(
    "content",
    [
        '{"model": "a", "params": 1}\n{"model": "b", "par',  # a run killed mid-write
        '{"model": "a", "params": 1}\nnot json\n',
        '{"model": "a", "params": 1}\n[1, 2]\n{"model": 3}\n\n',
    ],
)
def test_torn_or_foreign_lines_do_not_count_as_measured(tmp_path, content):
    out = tmp_path / "families.jsonl"
    out.write_text(content)
    assert pf.done_models(out) == {"a"}
    assert pf.done_models(tmp_path / "missing.jsonl") == set()


def test_a_line_appended_after_a_torn_one_is_read_back(tmp_path):
    out = tmp_path / "families.jsonl"
    out.write_text('{"model": "a", "params": 1}\n{"model": "b", "par')
    assert pf.run(["a", "b"], out, lambda m: {"params": 2}, echo=lambda _: None) == ["b"]
    assert pf.done_models(out) == {"a", "b"}


def test_table_has_one_row_per_model_with_n_half_and_n_cells_and_names_failures(tmp_path, capsys):
    out = tmp_path / "families.jsonl"
    per = {"export_s": 31.4, "onnx_mb": 163.2, "images_per_s_b1": 4.5678, "images_per_s_b8": 1234.5}
    full = {**per, "export_s": 60.0, "onnx_mb": 327.0, "images_per_s_b1": 2.0, "images_per_s_b8": 2.5}
    good = {"params": 86_192_640, "layers": 12, "input_size": 224, "L6": per, "L12": full}
    good["train"] = {"peak_rss_mb": 2353, "step_s": 2.4}
    pf.run(["ViT-B-16", "PE-Core-B-16"], out, lambda m: good if m == "ViT-B-16" else 1 / 0, echo=print)
    capsys.readouterr()
    pf.main(["--out", str(out), "--table"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| family | model |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == [
        "CLIP (open_clip ViT)",
        "`ViT-B-16`",
        "86.2",
        "224 px",
        "6 / 12",
        "31.4 / 60",
        "163 / 327",
        "4.57 / 2",
        "1,230 / 2.5",
        "2,353",
        "2.4",
    ]
    assert "`PE-Core-B-16` | failed: ZeroDivisionError" in lines[3]
