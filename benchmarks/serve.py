"""Serving load test: concurrent clients through a real Triton server vs the in-process Detector.

    .venv/bin/python -m benchmarks.serve                        # builds a ViT-B/32 L*=8 artifact first
    .venv/bin/python -m benchmarks.serve --artifact det.i2p --clients 1,4,16 --write-docs

Each client sends one image per request and waits for the answer (the web-service pattern). In-process,
the clients are threads sharing one ``Detector`` (``predict([bytes])``); through Triton, each is a
``RemoteDetector`` on gRPC to the ensemble (Python-backend preprocessing and network, as on a CPU-only
server), whose dynamic batcher may merge concurrent requests. Both run on the same machine, one after
the other for every client count, with the same ONNX Runtime thread count; figures are throughput and
p50/p99 latency, and Triton's throughput as a ratio of in-process. ``--queue-delays`` also measures the
dynamic batcher's delay at the largest client count (how export/triton.py's default was chosen).
``--write-docs`` replaces the "Serving" section of docs/performance.md (the rest of the file is
benchmarks/perf.py's).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.perf import E2E, E2E_LAYER, export_artifact, jpeg_folder, machine, write_checkpoint
from i2p.base.tables import format_table
from i2p.export.triton import QUEUE_DELAY_US

REPO = Path(__file__).resolve().parents[1]
DOC, SECTION = REPO / "docs" / "performance.md", "## Serving"


def load(
    clients: int, requests: int, blobs: list[bytes], predict_factory: Callable[[], Any]
) -> dict[str, float]:
    """``clients`` threads x ``requests`` one-image calls: images/s and latency percentiles (ms)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_line = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        predict, close = predict_factory()
        try:
            start_line.wait()
            for j in range(requests):
                t0 = time.perf_counter()
                (p,) = predict([blobs[(k * requests + j) % len(blobs)]])
                latencies[k].append(time.perf_counter() - t0)
                if not p.ok:
                    errors.append(p.error)
        finally:
            close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start_line.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    flat = np.concatenate(latencies) * 1e3
    return {
        "images_per_s": clients * requests / wall,
        "p50_ms": float(np.percentile(flat, 50)),
        "p99_ms": float(np.percentile(flat, 99)),
    }


def in_process(artifact: Path, threads: int) -> Callable[[], Any]:
    from i2p.runtime import Detector

    detector = Detector(artifact, threads=threads)
    detector.predict([])  # loaded before timing
    return lambda: (detector.predict, lambda: None)


def through_triton(url: str) -> Callable[[], Any]:
    from i2p.runtime.remote import RemoteDetector

    def factory() -> Any:
        remote = RemoteDetector(url, batch_size=1, concurrency=1)
        return remote.predict, remote.close

    return factory


def network_counts(url: str) -> tuple[int, int]:
    """(images, executions) of the network model so far: their ratio is the batch the batcher formed."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url.removeprefix("grpc://"))
    try:
        stats = client.get_inference_statistics("i2p_network", as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def batched_load(url: str, clients: int, requests: int, blobs: list[bytes]) -> dict[str, float]:
    """``load`` through Triton, plus the mean batch the network ran during it."""
    before = network_counts(url)
    result = load(clients, requests, blobs, through_triton(url))
    images, executions = (a - b for a, b in zip(network_counts(url), before, strict=True))
    return {**result, "network_batch": images / max(executions, 1)}


def serve(artifact: Path, work: Path, threads: int, queue_delay_us: int, tag: str) -> Any:
    """A started TritonServer on a fresh repository for ``artifact`` (Python-backend network)."""
    from benchmarks.support.triton_server import TritonServer, missing_reason
    from i2p.export.triton import TritonOptions, write_repository
    from i2p.runtime.manifest import read_manifest

    if (reason := missing_reason()) is not None:
        sys.exit(f"benchmarks.serve: {reason}")
    opts = TritonOptions(backend="python", queue_delay_us=queue_delay_us, network_threads=threads)
    repo = work / f"repo-{tag}"
    write_repository(repo, artifact, read_manifest(artifact), opts, force=True)
    return TritonServer(repo, work / f"server-{tag}").start(timeout=300)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every contender at every client count, in interleaved repetitions (medians): noise hits all alike.

    One server per queue delay is up throughout (idle servers cost memory, not CPU); the first delay is
    the main table's, the others are measured at the largest client count only.
    """
    artifact = args.artifact or build_artifact(work)
    folder, described = jpeg_folder(work, args.images)
    blobs = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[: args.images]]
    servers = {d: serve(artifact, work, args.threads, d, f"delay{d}") for d in args.queue_delays}
    try:
        local = in_process(artifact, args.threads)
        load(1, 5, blobs, local)  # warm-up: sessions, stubs, connections
        for server in servers.values():
            load(1, 5, blobs, through_triton(server.grpc_url))
        rows, sweep = [], []
        for clients in args.clients:
            delays = args.queue_delays if clients == max(args.clients) else args.queue_delays[:1]
            runs = measure(clients, max(args.min_requests, args.total // clients), args.reps, blobs, local,
                           {d: servers[d].grpc_url for d in delays})  # fmt: skip
            a, b = runs["in-process"], runs[delays[0]]
            rows.append(
                {"clients": clients, "requests": a["requests"],
                 "in-process img/s": a["images_per_s"], "in-process p50 ms": a["p50_ms"], "in-process p99 ms": a["p99_ms"],
                 "Triton img/s": b["images_per_s"], "Triton p50 ms": b["p50_ms"], "Triton p99 ms": b["p99_ms"],
                 "network batch": b["network_batch"], "Triton / in-process": b["images_per_s"] / a["images_per_s"]}
            )  # fmt: skip
            print(format_table(rows[-1:]), flush=True)
            if len(delays) > 1:
                sweep = [{"max_queue_delay_us": d, "clients": clients, **runs[d]} for d in delays]
                print(format_table(sweep), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {
        "artifact": str(artifact),
        "images": described,
        "rows": rows,
        "sweep": sweep,
        "reps": args.reps,
        "machine": machine(),
    }


def measure(
    clients: int, requests: int, reps: int, blobs: list[bytes], local: Callable[[], Any], urls: dict[int, str]
) -> dict[Any, dict[str, float]]:
    """Median figures of each contender (``"in-process"``, then each queue delay) over ``reps`` rounds."""
    runs: dict[Any, list[dict[str, float]]] = {"in-process": [], **{d: [] for d in urls}}
    for _ in range(reps):
        runs["in-process"].append(load(clients, requests, blobs, local))
        for d, url in urls.items():
            runs[d].append(batched_load(url, clients, requests, blobs))
    return {
        name: {"requests": clients * requests, **{k: float(np.median([r[k] for r in rs])) for k in rs[0]}}
        for name, rs in runs.items()
    }


def build_artifact(work: Path) -> Path:
    """ViT-B/32 at L*=8, random weights (speed does not depend on them), exported with --cpu like perf.py."""
    out = work / "serve.i2p"
    if (out / "manifest.json").is_file():
        return out
    ckpt = write_checkpoint(E2E, E2E_LAYER, work / "serve.safetensors")
    export_artifact(ckpt, out, ["--cpu", "--engine", "no", "--samples", "2"], env=None)
    return out


def render(result: dict[str, Any], command: str, threads: int) -> str:
    m = result["machine"]
    load_avg = ", ".join(f"{x:.1f}" for x in psutil.getloadavg())
    lines = [
        SECTION,
        "",
        f"Measured {m['date']} with `{command}` (git {m['git_commit']}) on {m['cpu']}, "
        f"{m['physical_cores']} cores, ONNX Runtime with {threads} thread(s) on both sides; load average "
        f"{load_avg} at the end. Artifact: {_describe(Path(result['artifact']))}; images: {result['images']}.",
        "",
        "Every client sends one JPEG per request and waits for the answer. In-process = threads sharing one "
        "`Detector`; Triton = tritonserver 2.51 (nvidia-pytriton wheel) running the `i2p` ensemble with the "
        "Python-backend network (`--triton-backend python`), clients on gRPC; network batch = images per "
        "execution of the network model (Triton's statistics), i.e. what dynamic batching merged. "
        f"Figures are medians of {result['reps']} interleaved rounds (in-process, Triton, in-process, ...).",
        "",
        _markdown(result["rows"]),
    ]
    if result["sweep"]:
        lines += [
            "",
            "Dynamic batching delay (`max_queue_delay_microseconds`) at the largest client count, measured "
            "in the same interleaved rounds:",
            "",
        ]
        lines += [_markdown(result["sweep"])]
    return "\n".join(lines) + "\n"


def _describe(artifact: Path) -> str:
    from i2p.runtime.manifest import read_manifest

    m = read_manifest(artifact)
    return (
        f"{artifact.name} ({m.backbone}, L*={m.layer}/{m.num_layers}, {', '.join(x.path for x in m.models)})"
    )


def _markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    body = ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *body])


def write_section(text: str) -> None:
    """Replace (or append) the Serving section of docs/performance.md, leaving the rest alone."""
    doc = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    doc = pattern.sub(lambda _: text + "\n", doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--artifact", type=Path, help="an i2p artifact (default: build ViT-B/32 L*=8)")
    ap.add_argument("--clients", type=ints, default=[1, 4, 16])
    ap.add_argument("--total", type=int, default=160, help="requests per client count (split over clients)")
    ap.add_argument("--min-requests", type=int, default=10, help="at least this many per client")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (figures are medians)")
    ap.add_argument("--images", type=int, default=64, help="distinct JPEGs cycled through")
    ap.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    ap.add_argument(
        "--queue-delays",
        type=ints,
        default=[QUEUE_DELAY_US],
        help="dynamic batching delays (µs); the first for the main table",
    )
    ap.add_argument("--work", type=Path, help="keep the artifact and repositories here")
    ap.add_argument(
        "--write-docs", action="store_true", help="replace the Serving section of docs/performance.md"
    )
    args = ap.parse_args()
    command = "python -m benchmarks.serve " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        text = render(run(args, work), command.strip(), args.threads)
    print(text)
    if args.write_docs:
        write_section(text)


if __name__ == "__main__":
    main()
