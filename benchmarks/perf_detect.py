"""End to end: i2p-detect's code path against model-only throughput on one Detector, and RSS over a long stream.

    .venv/bin/python benchmarks/perf_detect.py --model det.i2p --images DIR [--count 512] [--rss-images 2000]

Model-only: ``Detector.predict_batch`` on tensors preprocessed beforehand (decoding excluded). End to
end: ``Detector.predict_stream`` over the files, which is what ``i2p-detect`` runs (threaded
decoding overlapped with inference). The two alternate chunk by chunk on the same Detector, so their
ratio is measured side by side. Then one long stream (files cycled) samples RSS every 100 images.
Imports the runtime only (no torch), like a deployment. Prints one JSON object; run by benchmarks/perf.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import psutil

from i2p.runtime import Detector
from i2p.runtime.preprocess import preprocess
from i2p.runtime.sources import iter_images


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    ap.add_argument("--count", type=int, default=512, help="images in the side-by-side throughput runs")
    ap.add_argument("--chunk", type=int, default=128, help="images per alternation")
    ap.add_argument("--rss-images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32, help="i2p-detect's default")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="i2p-detect's default")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # as i2p-detect does

    files = sorted(iter_images([args.images], recursive=True))
    if len(files) < args.count:
        sys.exit(f"{args.images}: {len(files)} images, the run needs {args.count}")
    det = Detector(args.model, backend="onnxruntime", batch_size=args.batch_size, threads=args.threads)
    chunk = args.chunk
    tensors = np.stack([preprocess(f, det.spec) for f in files[:chunk]])

    def model_only() -> None:
        det.predict_batch(tensors)  # split into batch_size batches inside, like the stream's batches

    def end_to_end(paths: list[str]) -> int:
        return sum(not p.ok for p in det.predict_stream(paths, args.workers))

    model_only()
    end_to_end(files[: args.batch_size])  # warm-up: thread pool, Pillow's decoders
    model_times, stream_times, errors = [], [], 0
    for start in range(0, args.count - chunk + 1, chunk):
        t0 = time.perf_counter()
        model_only()
        t1 = time.perf_counter()
        errors += end_to_end(files[start : start + chunk])
        t2 = time.perf_counter()
        model_times.append(t1 - t0)
        stream_times.append(t2 - t1)
    model_ips, stream_ips = chunk / np.median(model_times), chunk / np.median(stream_times)

    rss = [(0, rss_mb())]
    cycled = itertools.islice(itertools.cycle(files), args.rss_images)
    t0 = time.perf_counter()
    for i, _ in enumerate(det.predict_stream(cycled, args.workers), 1):
        if i % 100 == 0:
            rss.append((i, rss_mb()))
    long_ips = args.rss_images / (time.perf_counter() - t0)
    warm = next(mb for n, mb in rss if n >= min(200, args.rss_images))
    print(
        json.dumps(
            {
                "backend": det.backend.name,
                "model_file": det.backend.model_path.name,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "threads": args.threads,
                "images": len(model_times) * chunk,
                "chunk": chunk,
                "errors": errors,
                "model_only_images_per_s": model_ips,
                "end_to_end_images_per_s": stream_ips,
                "ratio": stream_ips / model_ips,
                "model_only_chunk_s": model_times,
                "end_to_end_chunk_s": stream_times,
                "rss_images": args.rss_images,
                "rss_stream_images_per_s": long_ips,
                "rss_mb": rss,
                "rss_growth_after_200_mb": rss[-1][1] - warm,
            }
        )
    )


if __name__ == "__main__":
    main()
