"""Performance suite (CPU): the exported detector against the usual way of running a CLIP detector.

    .venv/bin/python -m benchmarks.perf                      # every CPU section; rewrites docs/performance.*
    .venv/bin/python -m benchmarks.perf --quick              # fewer repetitions and files
    .venv/bin/python -m benchmarks.perf --sections speed,training --out /tmp/perf   # a subset elsewhere
    .venv/bin/python -m benchmarks.perf --int8-ckpt runs/sid-mini/c_i2p/checkpoint.safetensors  # + real INT8

Sections (random weights unless said otherwise: speed and memory do not depend on the values):

- speed: baseline = full open_clip ViT-L/14 image tower + linear head, PyTorch eager FP32 (what
  UnivFD-style inference code runs) vs every CPU model of the default ``i2p-export`` artifact at L*=12
  (model.int8.onnx when its gate passes, the fused FP32 model.cpu.onnx, the portable model.onnx);
  batch 1 and 8. The export's wall time and peak RSS are recorded too;
- int8 (``--int8-ckpt``): a real trained detector, FP32 vs INT8 accuracy per generator on sid-mini/test
  and i2p-detect images/s (benchmarks/perf_int8.py);
- training: one step of subspace tuning vs full fine-tuning of the same blocks vs a linear probe
  (benchmarks/perf_train.py), and with sid-mini present, ``i2p-train --baseline`` epochs with every
  epoch's own augmented view vs one cached view (benchmarks/perf_baseline.py, real CLIP ViT-B/16);
- scan: i2p-detect over 100,000 small files: throughput and RSS over the run (benchmarks/scan.py);
- e2e: the i2p-detect code path over >= 500 JPEGs vs model-only throughput (benchmarks/perf_detect.py).

Ratios are measured side by side: repetitions interleave (baseline, candidate, baseline, ...) in one
process, so machine noise hits every contender alike; figures are medians. docs/performance.md is
written by benchmarks/perf_report.py; other sections of that file (GPU, serving) are kept.
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
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.perf_report import table, write_report
from benchmarks.support.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
BACKBONE, LAYER = "ViT-L-14-quickgelu", 12  # OpenAI CLIP ViT-L/14 (QuickGELU), UnivFD's backbone
SMALL, SMALL_LAYER = "ViT-B-16-quickgelu", 8  # training cost (--small, --small-layer)
E2E, E2E_LAYER = "ViT-B-32-quickgelu", 8  # end to end: 2,000 images must stay minutes on 2 cores
SECTIONS = ("speed", "training", "scan", "e2e", "int8")  # run in this order
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
    return {
        "cpu": cpu,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_checkpoint(model_name: str, layer: int, path: Path) -> Path:
    """An i2p-train checkpoint with random weights (base embedded) and a random head; no training."""
    import torch

    from i2p.train.backbone import load_backbone, preprocess_spec
    from i2p.train.checkpoint import save_checkpoint
    from i2p.train.metadata import CheckpointMeta
    from i2p.train.model import I2PModel

    tower, info = load_backbone(model_name, "none")
    model = I2PModel(tower, layer)
    with torch.no_grad():
        model.head.fc.weight.normal_(0, model.head.fc.weight.shape[1] ** -0.5)
    meta = CheckpointMeta(
        backbone=info,
        layer=layer,
        num_layers=model.num_layers,
        preprocess=preprocess_spec(model_name),
        threshold=0.5,
        config={"rank": 0, "seed": 0},
        complete=True,
    )
    save_checkpoint(path, model, meta, base=dict(model.tower.state_dict()))
    return path


def export_artifact(ckpt: Path, out: Path, flags: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``i2p-export`` in a subprocess: wall time, peak RSS and each step's time from its progress lines."""
    cmd = [str(Path(sys.executable).with_name("i2p-export")), "--ckpt", str(ckpt), "--out", str(out), *flags]
    result = run_measured(cmd, env)
    steps = re.findall(r"^(\S.*?) \.\.\.\n  done in ([\d.]+) s$", result["output"], re.M)
    notes = [line for line in result["output"].splitlines() if line.startswith("model.")]
    return {
        "command": " ".join(["i2p-export", *cmd[1:]]).replace(" --force", ""),
        "wall_s": result["wall_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "steps": [{"step": s, "seconds": float(t)} for s, t in steps],
        "notes": notes,
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

    from i2p.synthetic import synthetic_image

    folder = work / "jpegs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(synthetic_image(i % 2, (256, 256), rng)).save(folder / f"{i:04d}.jpg", quality=95)
    return folder, f"{count} generated 256x256 JPEGs (q95)"


# -- sections -----------------------------------------------------------------------------------------------


def model_speed(
    backbone: str, artifact: Path, layer: int, batches: list[int], reps: dict[int, int], threads: int
) -> list[dict]:
    """Baseline (eager FP32 full tower + head) vs each CPU model of the artifact on ONNX Runtime, interleaved.

    The ``default`` flag marks the file the Detector picks on a CPU (``Manifest.choose("cpu")``'s first).
    """
    import torch

    from i2p.runtime.backends.onnxruntime import CPU_EP, OnnxRuntimeBackend
    from i2p.runtime.manifest import read_manifest
    from i2p.train.backbone import load_backbone

    torch.set_num_threads(threads)
    tower, _ = load_backbone(backbone, "none")
    head = torch.nn.Linear(tower.output_dim, 1).eval()
    files = [m.path for m in read_manifest(artifact).choose("cpu")]
    candidates = {f: OnnxRuntimeBackend(artifact / f, [CPU_EP], threads=threads) for f in files}
    size = tower.image_size if isinstance(tower.image_size, int) else tower.image_size[0]
    rows = []
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)

        @torch.no_grad()
        def baseline(xt: torch.Tensor = xt) -> None:
            head(tower(xt))

        runners: dict[str, Callable[[], object]] = {"baseline": baseline}
        runners |= {f: (lambda b=b, x=x: b.infer(x)) for f, b in candidates.items()}
        outputs = {f: b.infer(x) for f, b in candidates.items()}
        times = interleaved(runners, reps[batch])
        base = np.median(times["baseline"])
        for name, t in times.items():
            row = {"batch": batch, "threads": threads, "model": name, **summary(t)}
            row["blocks"] = len(tower.transformer.resblocks) if name == "baseline" else layer
            row["default"] = name == files[0]
            row["images_per_s"] = batch / float(np.median(t))
            row["speedup"] = float(base / np.median(t))
            if name != "baseline" and name != "model.onnx":
                row["max_abs_logit_diff_vs_model_onnx"] = float(
                    np.abs(outputs[name] - outputs["model.onnx"]).max()
                )
            rows.append(row)
        print(table(rows[-len(runners) :], ["batch", "model", "median_ms", "speedup"]), flush=True)
    return rows


def end_to_end(
    artifact: Path, images: Path, quick: bool, threads: int, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.perf_detect", "--model", str(artifact)]
    cmd += ["--images", str(images), "--threads", str(threads)]
    cmd += ["--count", "256", "--rss-images", "500"] if quick else ["--count", "512", "--rss-images", "2000"]
    result = child_json(cmd, env)
    result["command"] = " ".join(["python", *cmd[1:]])
    return result


def training_cost(
    model: str, layer: int, quick: bool, threads: int, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Each mode in its own process (its own peak RSS); rounds rotate the modes so noise hits all."""
    steps, rounds = ("2", 1) if quick else ("3", 1)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for mode in ("subspace", "full", "probe"):
            cmd = [sys.executable, "-m", "benchmarks.perf_train", "--mode", mode, "--model", model]
            cmd += ["--layer", str(layer), "--steps", steps, "--threads", str(threads)]
            runs.setdefault(mode, []).append(child_json(cmd, env))
            print(f"  training {mode}: {np.median(runs[mode][-1]['step_s']):.2f} s/step", flush=True)
    rows = []
    for results in runs.values():
        first = results[0]
        rows.append(
            {
                **{k: first[k] for k in ("mode", "model", "layer", "rank", "batch", "threads")},
                **{k: first[k] for k in ("trainable_parameters", "total_parameters")},
                "step_median_s": float(np.median([t for r in results for t in r["step_s"]])),
                "steps": sum(len(r["step_s"]) for r in results),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                "training_memory_mb": max(r["training_memory_mb"] for r in results),
            }
        )
    return rows


def baseline_epochs(work: Path, threads: int, env: dict[str, str]) -> dict[str, Any]:
    """benchmarks/perf_baseline.py: i2p-train --baseline, one augmented view per epoch vs one cached view."""
    cmd = [sys.executable, "-m", "benchmarks.perf_baseline", "--threads", str(threads), "--work", str(work)]
    result = child_json(cmd, env)
    result["benchmark"] = " ".join(["python", *cmd[1:]])
    return result


def scan(files: int, threads: int, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.scan", "--files", str(files), "--threads", str(threads)]
    result = child_json(cmd, env)
    result["benchmark"] = " ".join(["python", *cmd[1:]])
    return result


def int8_real(ckpt: Path, work: Path, threads: int, env: dict[str, str], wait_s: float) -> dict[str, Any]:
    """benchmarks/perf_int8.py on ``ckpt``; waits up to ``wait_s`` for a checkpoint still being trained."""
    deadline = time.time() + wait_s
    while not ckpt.is_file() and time.time() < deadline:
        time.sleep(15)
    cmd = [sys.executable, "-m", "benchmarks.perf_int8", "--ckpt", str(ckpt), "--work", str(work)]
    cmd += ["--calib", str(SID_MINI / "val"), "--test", str(SID_MINI / "test"), "--threads", str(threads)]
    result = child_json(cmd, env)
    result["benchmark"] = " ".join(["python", *cmd[1:]])
    return result


def gpu_speed(backbone: str, artifact: Path, reps: int) -> dict[str, Any]:
    """PyTorch eager FP16 (full tower + head, input already on the GPU) vs the Detector's GPU backend."""
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "reason": "torch sees no CUDA device"}
    from i2p.runtime import Detector
    from i2p.train.backbone import load_backbone

    tower, _ = load_backbone(backbone, "none")
    tower = tower.half().cuda().eval()
    head = torch.nn.Linear(tower.output_dim, 1).half().cuda().eval()
    det = Detector(artifact, backend="auto", batch_size=32)
    size = tower.image_size if isinstance(tower.image_size, int) else tower.image_size[0]
    rows = []
    for batch in (1, 8, 32):
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


# -- main ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and files")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--backbone", default=BACKBONE, help="open_clip model of the speed section")
    ap.add_argument("--layer", type=int, default=LAYER, help="L* of the exported detector")
    ap.add_argument("--small", default=SMALL, help="open_clip model of the training section")
    ap.add_argument("--small-layer", type=int, default=SMALL_LAYER)
    ap.add_argument("--e2e", default=E2E, help="open_clip model of the end-to-end section")
    ap.add_argument("--e2e-layer", type=int, default=E2E_LAYER)
    ap.add_argument("--int8-ckpt", type=Path, help="a trained checkpoint (sid-mini) for the int8 section")
    ap.add_argument("--int8-wait", type=float, default=0, help="seconds to wait for --int8-ckpt to appear")
    ap.add_argument("--scan-files", type=int, default=100_000)
    ap.add_argument("--calib-limit", type=int, default=64, help="--calib-images used by the speed export")
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda adds the GPU comparison")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where performance.md/.json go")
    ap.add_argument("--work", type=Path, help="keep checkpoints and artifacts here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts in --work (no export timing)")
    ap.add_argument("--note", help="a sentence for the report, e.g. what else ran on the machine")
    ap.add_argument("--render", action="store_true", help="only rewrite performance.md from performance.json")
    args = ap.parse_args()
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := set(args.sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if "int8" in args.sections and args.int8_ckpt is None:
        args.sections.remove("int8")
    if args.reuse and not args.work:
        ap.error("--reuse needs --work")
    return args


def main() -> None:
    args = parse_args()
    if args.render:
        results = json.loads((args.out / "performance.json").read_text())["cpu"]
        results["note"] = args.note or results.get("note")
        write_report(args.out, results)
        return
    command = "python -m benchmarks.perf" + "".join(f" {a}" for a in sys.argv[1:])
    work = args.work or Path(tempfile.mkdtemp(prefix="i2p-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, Any] = {"command": command, "quick": args.quick, "threads": args.threads}
    results |= {"note": args.note, "sections": args.sections, "machine": machine()}
    results |= {"backbone": args.backbone, "layer": args.layer}
    load: dict[str, list[float]] = {"start": [round(x, 1) for x in os.getloadavg()]}
    print(f"work dir {work}; load average {load['start']}", flush=True)

    def artifact(model: str, layer: int, flags: list[str]) -> tuple[Path, dict | None]:
        out = work / f"{model}_L{layer}.i2p"
        if args.reuse and (out / "manifest.json").is_file():
            return out, None
        ckpt = work / f"{model}_L{layer}.safetensors"
        if not ckpt.is_file():
            print(f"checkpoint {ckpt.name} ...", flush=True)
            write_checkpoint(model, layer, ckpt)
        print(f"i2p-export {ckpt.name} {' '.join(flags)} ...", flush=True)
        return out, export_artifact(ckpt, out, [*flags, "--engine", "no", "--force"], env)

    if "speed" in args.sections:
        calib = ["--calib-images", str(SID_MINI / "val"), "--calib-limit", str(args.calib_limit)]
        main_artifact, results["export"] = artifact(
            args.backbone, args.layer, calib if SID_MINI.is_dir() else []
        )
        print("model speed ...", flush=True)
        reps = {1: 3, 8: 2} if args.quick else {1: 6, 8: 2}
        results["fusions"] = fused_ops(main_artifact)
        results["model_speed"] = model_speed(
            args.backbone, main_artifact, args.layer, [1, 8], reps, args.threads
        )
        load["after_speed"] = [round(x, 1) for x in os.getloadavg()]
    if "training" in args.sections:
        print("training cost ...", flush=True)
        results["training"] = training_cost(args.small, args.small_layer, args.quick, args.threads, env)
        if SID_MINI.is_dir():
            print("frozen-tower training epochs ...", flush=True)
            results["baseline_epochs"] = baseline_epochs(work / "baseline", args.threads, env)
    if "scan" in args.sections:
        print(f"scan of {args.scan_files:,} files ...", flush=True)
        results["scan"] = scan(args.scan_files // (10 if args.quick else 1), args.threads, env)
        print(
            f"  flatness {results['scan']['flatness']:.2f}, RSS +{results['scan']['rss_growth_mb']:.1f} MB",
            flush=True,
        )
    if "e2e" in args.sections:
        small, _ = artifact(args.e2e, args.e2e_layer, ["--samples", "4"])
        images, results["images"] = jpeg_folder(work, 512)
        print("end to end ...", flush=True)
        results["end_to_end"] = end_to_end(small, images, args.quick, args.threads, env)
        results["end_to_end"]["model"] = f"{args.e2e} at L*={args.e2e_layer}"
    if "int8" in args.sections:
        print("int8 on the real detector ...", flush=True)
        results["int8"] = int8_real(args.int8_ckpt, work / "int8", args.threads, env, args.int8_wait)
        print(
            f"  speedup {results['int8']['speedup']:.2f}, AUC deltas {results['int8']['auc_delta']}",
            flush=True,
        )
    if args.device == "cuda" and "speed" in args.sections:
        results["gpu"] = gpu_speed(args.backbone, main_artifact, 5 if args.quick else 20)
    load["end"] = [round(x, 1) for x in os.getloadavg()]
    results["load_average"] = load
    write_report(args.out, results)
    print(f"wrote {args.out / 'performance.md'} and performance.json", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
