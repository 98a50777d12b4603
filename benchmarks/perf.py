"""Performance suite: the exported detector against the usual way of running a CLIP detector.

    .venv/bin/python benchmarks/perf.py             # CPU suite; rewrites docs/performance.md and .json
    .venv/bin/python benchmarks/perf.py --quick     # fewer repetitions and images, no full-depth reference
    .venv/bin/python benchmarks/perf.py --threads 1 # one core (when other jobs share the machine)
    .venv/bin/python benchmarks/perf.py --device cuda   # adds the FP16 GPU comparison

Sections (random weights throughout: speed and memory do not depend on the values):

- model speed: baseline = full open_clip ViT-L/14 image tower + linear head, PyTorch eager FP32 (what
  UnivFD-style inference code runs) vs the i2p-export artifact at L*=12 on ONNX Runtime CPU, fused
  (model.cpu.onnx) and plain (model.onnx), and at L*=24 for reference; batch 1 and 8;
- end to end: the i2p-detect code path over >= 500 JPEGs vs model-only throughput (benchmarks/perf_detect.py);
- export: wall time and peak RSS of ``i2p-export --fp16 --cpu`` for ViT-L/14 at L*=12;
- training cost: subspace tuning vs full fine-tuning of the same blocks vs a linear probe
  (benchmarks/perf_train.py);
- GPU (``--device cuda``): PyTorch eager FP16 vs the Detector's fastest GPU backend.

Ratios are measured side by side: repetitions interleave (baseline, candidate, baseline, ...) in one
process, so machine noise hits every contender alike; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
BACKBONE, LAYER = "ViT-L-14-quickgelu", 12  # OpenAI CLIP ViT-L/14 (QuickGELU), UnivFD's backbone
SMALL, SMALL_LAYER = "ViT-B-16-quickgelu", 8  # training cost (--small, --small-layer)
E2E, E2E_LAYER = "ViT-B-32-quickgelu", 8  # end to end: 2,000 images must stay minutes on 2 cores
PACKAGES = ("torch", "open_clip_torch", "onnxruntime", "onnx", "numpy", "pillow")
SID_MINI = REPO.parent / "shared" / "data" / "sid-mini"


# -- measuring ----------------------------------------------------------------------------------------------


def interleaved(
    runners: dict[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each runner, the runners taking turns within every repetition."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak RSS of its process tree (sampled every 50 ms), output."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = psutil.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass  # a process ended between listing and reading
            time.sleep(0.05)
        wall = time.perf_counter() - start
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "output": output}


def child_json(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": float(np.median(times) * 1e3),
        "min_ms": float(np.min(times) * 1e3),
        "max_ms": float(np.max(times) * 1e3),
        "reps": len(times),
    }


# -- setup --------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown",
    )
    versions = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {
        "cpu": cpu,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "git_commit": commit.stdout.strip() or None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_checkpoint(model_name: str, layer: int, path: Path) -> Path:
    """An i2p-train checkpoint with random weights (base embedded) and a random head; no training."""
    import torch

    from i2p.train.backbone import load_backbone
    from i2p.train.checkpoint import save_checkpoint
    from i2p.train.model import I2PModel

    tower, info = load_backbone(model_name, "none")
    model = I2PModel(tower, layer)
    with torch.no_grad():
        model.head.fc.weight.normal_(0, model.head.fc.weight.shape[1] ** -0.5)
    meta = {
        "config": {"rank": 0, "seed": 0},
        "backbone": asdict(info),
        "layer": layer,
        "num_layers": model.num_layers,
        "baseline": False,
        "importance": None,
        "preprocess": info.preprocess.to_dict(),
        "threshold": 0.5,
        "metrics": {},
        "complete": True,
    }
    save_checkpoint(path, model, meta, base=dict(model.tower.state_dict()))
    return path


def export_artifact(ckpt: Path, out: Path, flags: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``i2p-export`` in a subprocess: wall time, peak RSS and each step's time from its progress lines."""
    cmd = [str(Path(sys.executable).with_name("i2p-export")), "--ckpt", str(ckpt), "--out", str(out), *flags]
    result = run_measured(cmd, env)
    steps = re.findall(r"^(\S.*?) \.\.\.\n  done in ([\d.]+) s$", result["output"], re.M)
    return {
        "command": " ".join(["i2p-export", *cmd[1:]]),
        "wall_s": result["wall_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "steps": [{"step": s, "seconds": float(t)} for s, t in steps],
    }


def fused_ops(artifact: Path) -> str:
    """Which ONNX Runtime fused ops model.cpu.onnx holds, counted from the file."""
    import onnx

    from i2p.export.cpu_optimize import CPU_ONNX, REPORTED_OPS

    ops = Counter(n.op_type for n in onnx.load(str(artifact / CPU_ONNX), load_external_data=False).graph.node)
    return ", ".join(f"{op} {ops[op]}" for op in REPORTED_OPS if ops[op])


def jpeg_folder(work: Path, count: int) -> tuple[Path, str]:
    """sid-mini's JPEGs (256x256, q95) when ../shared has them, else as many generated ones."""
    if SID_MINI.is_dir() and len(list(SID_MINI.rglob("*.jpg"))) >= count:
        return SID_MINI, f"{SID_MINI.relative_to(REPO.parent)} (real and generated photos, 256x256 JPEG q95)"
    from PIL import Image

    from i2p.train.synthetic import synthetic_image

    folder = work / "jpegs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(synthetic_image(i % 2, (256, 256), rng)).save(folder / f"{i:04d}.jpg", quality=95)
    return folder, f"{count} generated 256x256 JPEGs (q95)"


# -- sections -----------------------------------------------------------------------------------------------


def model_speed(
    backbone: str, artifacts: dict[str, Path], batches: list[int], reps: dict[int, int], threads: int
) -> list[dict]:
    """Baseline (eager FP32 full tower + head) vs each artifact file on ONNX Runtime CPU, interleaved."""
    import torch

    from i2p.runtime.backends.onnxruntime import CPU_EP, OnnxRuntimeBackend
    from i2p.train.backbone import load_backbone

    torch.set_num_threads(threads)
    tower, info = load_backbone(backbone, "none")
    head = torch.nn.Linear(tower.output_dim, 1).eval()
    candidates = {
        f"{name} {file}": OnnxRuntimeBackend(path / file, [CPU_EP], threads=threads)
        for name, path in artifacts.items()
        for file in ("model.cpu.onnx", "model.onnx")
    }
    blocks = {"baseline": len(tower.transformer.resblocks)}
    blocks |= {name: int(name.split()[0].removeprefix("L*=")) for name in candidates}
    rows = []
    for batch in batches:
        size = info.preprocess.size
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)

        @torch.no_grad()
        def baseline(xt: torch.Tensor = xt) -> None:
            head(tower(xt))

        runners: dict[str, Callable[[], object]] = {"baseline": baseline}
        runners |= {name: (lambda b=b, x=x: b.infer(x)) for name, b in candidates.items()}
        outputs = {name: b.infer(x) for name, b in candidates.items()}
        times = interleaved(runners, reps[batch])
        base = np.median(times["baseline"])
        for name, t in times.items():
            fused = name.endswith("model.cpu.onnx")
            row = {"batch": batch, "threads": threads, "model": name, **summary(t)}
            row["images_per_s"] = batch / float(np.median(t))
            row["speedup"] = float(base / np.median(t))
            row["ms_per_block"] = row["median_ms"] / blocks[name]
            if fused:  # the fused file computes the same logits as model.onnx
                plain = outputs[name.replace("model.cpu.onnx", "model.onnx")]
                row["max_abs_logit_diff_vs_model_onnx"] = float(np.abs(outputs[name] - plain).max())
            rows.append(row)
        print(table(rows[-len(runners) :], ["batch", "model", "median_ms", "speedup"]), flush=True)
    return rows


def end_to_end(
    artifact: Path, images: Path, quick: bool, threads: int, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [sys.executable, "benchmarks/perf_detect.py", "--model", str(artifact)]
    cmd += ["--images", str(images), "--threads", str(threads)]
    cmd += ["--count", "256", "--rss-images", "500"] if quick else ["--count", "512", "--rss-images", "2000"]
    result = child_json(cmd, env)
    result["command"] = " ".join(["python", *cmd[1:]])
    return result


def training_cost(
    model: str, layer: int, quick: bool, threads: int, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Each mode in its own process (its own peak RSS); rounds rotate the modes so noise hits all."""
    steps, rounds = ("2", 1) if quick else ("3", 2)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for mode in ("subspace", "full", "probe"):
            cmd = [sys.executable, "benchmarks/perf_train.py", "--mode", mode]
            cmd += [
                "--model",
                model,
                "--layer",
                str(layer),
                "--steps",
                steps,
                "--threads",
                str(threads),
            ]
            runs.setdefault(mode, []).append(child_json(cmd, env))
            print(f"  training {mode}: {np.median(runs[mode][-1]['step_s']):.2f} s/step", flush=True)
    rows = []
    for mode, results in runs.items():
        first = results[0]
        rows.append(
            {
                "mode": mode,
                "model": first["model"],
                "layer": first["layer"],
                "rank": first["rank"],
                "batch": first["batch"],
                "threads": first["threads"],
                "trainable_parameters": first["trainable_parameters"],
                "total_parameters": first["total_parameters"],
                "step_median_s": float(np.median([t for r in results for t in r["step_s"]])),
                "steps": sum(len(r["step_s"]) for r in results),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                "training_memory_mb": max(r["training_memory_mb"] for r in results),
            }
        )
    return rows


def gpu_speed(backbone: str, artifact: Path, reps: int) -> dict[str, Any]:
    """PyTorch eager FP16 (full tower + head, input already on the GPU) vs the Detector's GPU backend."""
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "reason": "torch sees no CUDA device"}
    from i2p.runtime import Detector
    from i2p.train.backbone import load_backbone

    tower, info = load_backbone(backbone, "none")
    tower = tower.half().cuda().eval()
    head = torch.nn.Linear(tower.output_dim, 1).half().cuda().eval()
    det = Detector(artifact, backend="auto", batch_size=32)
    rows = []
    for batch in (1, 8, 32):
        size = info.preprocess.size
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x).half().cuda()

        @torch.no_grad()
        def baseline(xt: torch.Tensor = xt) -> None:
            head(tower(xt))
            torch.cuda.synchronize()

        times = interleaved({"baseline": baseline, "ours": lambda x=x: det.predict_batch(x)}, reps, warmup=3)
        base = np.median(times["baseline"])
        for name, t in times.items():
            rows.append({"batch": batch, "model": name, **summary(t), "speedup": float(base / np.median(t))})
    return {
        "measured": True,
        "card": torch.cuda.get_device_name(),
        "backend": det.backend.name,
        "precision": det.backend.precision,
        "rows": rows,
    }


# -- report -------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table (also readable as plain text)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def md(text: str) -> str:
    """Escape the asterisk of "L*" outside tables."""
    return text.replace("*", "\\*")


def render(r: dict[str, Any]) -> str:
    """docs/performance.md from the results (the JSON holds every raw timing)."""
    m, speed = r["machine"], r["model_speed"]
    head = {(row["batch"], row["model"]): row for row in speed}
    main = f"L*={r['layer']}"
    fused1, plain1 = head[(1, f"{main} model.cpu.onnx")], head[(1, f"{main} model.onnx")]
    fused8, plain8 = head[(8, f"{main} model.cpu.onnx")], head[(8, f"{main} model.onnx")]
    e2e, exp, train = r["end_to_end"], r["export"], r["training"]
    load = r["load_average"]
    lines = [
        "# Performance",
        "",
        f"Measured {m['date']} with `{r['command']}` (git {m['git_commit']}); every figure below comes from",
        "that run, and `docs/performance.json` holds the raw timings. Rerun the command to regenerate both.",
        *(["", r["note"]] if r.get("note") else []),
        "",
        "## Summary",
        "",
        f"- **Model speed** ({r['backbone']}, batch 1, {r['threads']} thread(s)): the exported detector at "
        f"L\\*={r['layer']} on "
        f"ONNX Runtime CPU runs at **{fused1['speedup']:.2f}x** the speed of the baseline (full open_clip "
        f"tower + linear head, PyTorch eager FP32) with the fused `model.cpu.onnx` (goal >= 2.5x: "
        f"{'met' if fused1['speedup'] >= 2.5 else 'not met'}), {plain1['speedup']:.2f}x with the plain "
        f"`model.onnx`; at batch 8, {fused8['speedup']:.2f}x and {plain8['speedup']:.2f}x.",
        f"- **End to end** ({md(e2e['model'])}): `i2p-detect`'s code path reaches **{e2e['ratio']:.2f}** of "
        f"model-only throughput ({e2e['end_to_end_images_per_s']:.1f} vs {e2e['model_only_images_per_s']:.1f} "
        f"images/s; goal >= 0.8); RSS grew **{e2e['rss_growth_after_200_mb']:.1f} MB** from image 200 to "
        f"image {e2e['rss_images']:,} (goal < 50 MB).",
        f"- **Export** (`i2p-export --fp16 --cpu`, {r['backbone']} at L\\*={r['layer']}): {exp['wall_s']:.0f} s wall, "
        f"peak RSS {exp['peak_rss_mb'] / 1024:.1f} GB (process tree)."
        if exp
        else "- **Export**: not measured in this run.",
        "- **Training cost** ("
        + ", ".join(
            f"{t['mode']}: {t['step_median_s']:.2f} s/step, {t['trainable_parameters']:,} trainable parameters, "
            f"+{t['training_memory_mb']:.0f} MB"
            for t in train
        )
        + ").",
        "- **GPU**: "
        + (
            f"measured on {r['gpu']['card']}, see below."
            if r["gpu"].get("measured")
            else f"not measured ({r['gpu']['reason']})."
        ),
        "",
        "## Machine",
        "",
        table(
            [
                {
                    "": "CPU",
                    "value": f"{m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores",
                },
                {"": "memory", "value": f"{m['memory_gb']} GB"},
                {"": "OS", "value": m["os"]},
                {"": "versions", "value": ", ".join(f"{k} {v}" for k, v in m["versions"].items())},
                {
                    "": "threads",
                    "value": f"{r['threads']} (PyTorch, ONNX Runtime intra-op, export subprocess)",
                },
                {"": "load average", "value": f"{load['start']} at the start, {load['end']} at the end"},
            ],
            ["", "value"],
        ),
        "",
        "A load average above the core count means other processes shared the cores during the run: absolute",
        "times are then inflated, while the ratios (contenders interleaved repetition by repetition) still",
        "compare like with like.",
        "",
        "## Model speed",
        "",
        "The CPU fast path is `model.cpu.onnx`, written by `i2p-export --cpu` (export/cpu_optimize.py) and",
        "kept only when it passes the same parity check against PyTorch as `model.onnx`; the Detector prefers",
        "it on the CPU. It is the FP32 model rewritten into ONNX Runtime's fused CPU kernels: each block's",
        "attention (exported by `nn.MultiheadAttention` as ~80 small nodes that neither ONNX Runtime nor",
        "`onnxruntime.transformers` recognizes) becomes one `Attention` op; the last block runs its query,",
        "output projection and MLP for the CLS token only (`MultiHeadAttention` with a one-token query: the",
        "head reads nothing else, so this is exact); then `onnxruntime.transformers` fuses residual adds with",
        "LayerNorm (`SkipLayerNormalization`) and QuickGELU.",
        "",
        f"Baseline: `{r['backbone']}` image tower (all {r['num_layers']} blocks, ln_post, projection) + a linear"
        " head, PyTorch",
        "eager FP32 under `torch.no_grad()`. Ours: the `i2p-export` artifact of the same backbone truncated at",
        "L\\*, through the runtime's `OnnxRuntimeBackend` (ONNX Runtime CPU EP, `ORT_ENABLE_ALL`). Random",
        "weights. `speedup` = baseline median / median.",
        "",
        table(speed, ["batch", "model", "median_ms", "min_ms", "images_per_s", "ms_per_block", "speedup"]),
        "",
        "`ms_per_block` = median / transformer blocks run (the fused model's last block does less: CLS only).",
        f"Truncation alone would give {r['num_layers'] / r['layer']:.1f}x at equal per-block cost; the rest comes",
        "from ONNX Runtime's kernels and the fused graph. FP32 matrix multiplications make up nearly all of the",
        "remaining work, so further gains at batch 1 need fewer multiply-adds or lower precision (which the",
        "FP32 fast path does not use).",
        "",
        f"Fused ops in L\\*={r['layer']}'s `model.cpu.onnx`: {r['fusions']}.",
        "Its logits differ from `model.onnx`'s by at most "
        + f"{max(row.get('max_abs_logit_diff_vs_model_onnx', 0) for row in speed):.1e} here.",
        "",
        "## End to end",
        "",
        f"`{e2e['command']}`",
        "",
        f"Images: {r['images']}. Artifact: {md(e2e['model'])} (`{e2e['model_file']}`), smaller than the speed",
        "section's model: it keeps the 2,000-image run short, and makes decoding a larger share of the work, so",
        "the ratio is harder to reach than with ViT-L/14. Model-only = `Detector.predict_batch` on tensors decoded beforehand;",
        "end to end = `runtime.sources.predict_stream` (what `i2p-detect` runs: threaded decoding",
        f"overlapped with inference), batch {e2e['batch_size']}, {e2e['workers']} decode workers; the two",
        f"alternate in chunks of {e2e['chunk']} images on one Detector.",
        "",
        table(
            [
                {"measure": "model-only images/s", "value": e2e["model_only_images_per_s"]},
                {"measure": "end-to-end images/s", "value": e2e["end_to_end_images_per_s"]},
                {"measure": "ratio (goal >= 0.8)", "value": e2e["ratio"]},
                {
                    "measure": f"RSS growth, image 200 -> {e2e['rss_images']:,} (MB, goal < 50)",
                    "value": e2e["rss_growth_after_200_mb"],
                },
                {"measure": "RSS at the end (MB)", "value": e2e["rss_mb"][-1][1]},
                {"measure": "unreadable images", "value": e2e["errors"]},
            ],
            ["measure", "value"],
        ),
        "",
        "## Export",
        "",
    ]
    if exp:
        lines += [
            f"`{exp['command']}` (checkpoint with random weights, base embedded).",
            "",
            table(
                [{"step": s["step"], "seconds": s["seconds"]} for s in exp["steps"]]
                + [{"step": "**total wall time**", "seconds": exp["wall_s"]}],
                ["step", "seconds"],
            ),
            "",
            f"Peak RSS of the process tree (export + its ONNX Runtime parity runner), sampled every 50 ms: "
            f"**{exp['peak_rss_mb']:,.0f} MB**.",
        ]
    else:
        lines.append("Not measured in this run (`--reuse`).")
    lines += [
        "",
        "## Training cost",
        "",
        f"One training step (forward, BCE, backward, AdamW) of `{train[0]['model']}` at L\\*={train[0]['layer']}, batch "
        f"{train[0]['batch']}, random images, CPU; each configuration in its own process. `training memory` ="
        " peak RSS during the steps minus RSS before the first step (activations kept for backward, gradients,"
        " optimizer state).",
        "",
        table(
            train,
            [
                "mode",
                "trainable_parameters",
                "total_parameters",
                "step_median_s",
                "steps",
                "training_memory_mb",
                "peak_rss_mb",
            ],
        ),
        "",
        "subspace = I2P's rank-16 low-sensitivity deltas on every linear map of blocks 1..L\\* + head; full ="
        " every parameter of the same blocks + head; probe = head only.",
        "",
        "## GPU",
        "",
    ]
    gpu = r["gpu"]
    if gpu.get("measured"):
        lines += [
            f"{gpu['card']}: PyTorch eager FP16 (full tower + head, input already on the GPU) vs the Detector "
            f"({gpu['backend']}, {gpu['precision']}, float32 input from host memory).",
            "",
            table(gpu["rows"], ["batch", "model", "median_ms", "speedup"]),
        ]
    else:
        lines.append(
            f"Not measured: {gpu['reason']}. `python benchmarks/perf.py --device cuda` runs the comparison "
            "(PyTorch eager FP16 vs the Detector's fastest GPU backend) where a GPU is present."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="fewer repetitions and images, no full-depth reference"
    )
    ap.add_argument("--backbone", default=BACKBONE, help="open_clip model of the speed and export sections")
    ap.add_argument("--layer", type=int, default=LAYER, help="L* of the exported detector")
    ap.add_argument("--small", default=SMALL, help="open_clip model of the training-cost section")
    ap.add_argument("--small-layer", type=int, default=SMALL_LAYER)
    ap.add_argument("--e2e", default=E2E, help="open_clip model of the end-to-end section")
    ap.add_argument("--e2e-layer", type=int, default=E2E_LAYER)
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where performance.md/.json go")
    ap.add_argument("--work", type=Path, help="keep checkpoints and artifacts here (default: a temp dir)")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse artifacts already in --work (no export timing)"
    )
    ap.add_argument("--note", help="a sentence for the report, e.g. what else ran on the machine")
    ap.add_argument(
        "--render", action="store_true", help="only rewrite performance.md from --out's performance.json"
    )
    args = ap.parse_args()
    if args.render:
        results = json.loads((args.out / "performance.json").read_text())
        if args.note:
            results["note"] = args.note
            (args.out / "performance.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "performance.md").write_text(render(results))
        return
    if args.reuse and not args.work:
        ap.error("--reuse needs --work")
    command = "python benchmarks/perf.py" + "".join(f" {a}" for a in sys.argv[1:])
    work = args.work or Path(tempfile.mkdtemp(prefix="i2p-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    import open_clip

    import i2p.train.backbone  # noqa: F401  (registers the package's own configs, e.g. i2p-tiny-vit)

    num_layers = open_clip.get_model_config(args.backbone)["vision_cfg"]["layers"]
    results: dict[str, Any] = {"command": command, "quick": args.quick, "threads": args.threads}
    results["note"] = args.note
    results |= {"backbone": args.backbone, "layer": args.layer, "num_layers": num_layers}
    results["machine"] = machine()
    load_start = [round(x, 1) for x in os.getloadavg()]
    print(f"work dir {work}; load average {load_start}", flush=True)

    def artifact(model: str, layer: int, flags: list[str], measure: bool = False) -> tuple[Path, dict | None]:
        out = work / f"{model}_L{layer}.i2p"
        if args.reuse and (out / "manifest.json").is_file():
            return out, None
        ckpt = work / f"{model}_L{layer}.safetensors"
        if not ckpt.is_file():
            print(f"checkpoint {ckpt.name} ...", flush=True)
            write_checkpoint(model, layer, ckpt)
        print(f"i2p-export {ckpt.name} {' '.join(flags)} ...", flush=True)
        result = export_artifact(ckpt, out, [*flags, "--force"], env)
        return out, result if measure else None

    main_artifact, results["export"] = artifact(args.backbone, args.layer, ["--fp16", "--cpu"], measure=True)
    if results["export"]:
        results["export"]["command"] = results["export"]["command"].replace(" --force", "")
    artifacts = {f"L*={args.layer}": main_artifact}
    if not args.quick and num_layers != args.layer:
        artifacts[f"L*={num_layers}"], _ = artifact(args.backbone, num_layers, ["--cpu", "--samples", "4"])
    small, _ = artifact(args.e2e, args.e2e_layer, ["--cpu", "--samples", "4"])

    print("model speed ...", flush=True)
    reps = {1: 3, 8: 2} if args.quick else {1: 10, 8: 4}
    results["fusions"] = fused_ops(main_artifact)
    results["model_speed"] = model_speed(args.backbone, artifacts, [1, 8], reps, args.threads)
    images, results["images"] = jpeg_folder(work, 512)
    print("end to end ...", flush=True)
    results["end_to_end"] = end_to_end(small, images, args.quick, args.threads, env)
    results["end_to_end"]["model"] = f"{args.e2e} at L*={args.e2e_layer}"
    print(f"  ratio {results['end_to_end']['ratio']:.2f}", flush=True)
    print("training cost ...", flush=True)
    results["training"] = training_cost(args.small, args.small_layer, args.quick, args.threads, env)
    results["gpu"] = (
        gpu_speed(args.backbone, main_artifact, 5 if args.quick else 20)
        if args.device == "cuda"
        else {"measured": False, "reason": "this run used --device cpu (no GPU in this session)"}
    )
    results["load_average"] = {"start": load_start, "end": [round(x, 1) for x in os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "performance.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "performance.md").write_text(render(results))
    print(f"wrote {args.out / 'performance.md'} and performance.json", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
