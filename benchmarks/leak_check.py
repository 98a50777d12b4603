"""10,000 predictions through one Detector, printing RSS and open descriptors as they go.

    .venv/bin/python -m benchmarks.leak_check                       # the small test artifact
    .venv/bin/python -m benchmarks.leak_check --model model.i2p --threads 8

Inputs cycle through good files, bad files (the generated corpus) and in-memory arrays, so the error
paths are exercised as much as the happy one. Exits 1 if growth after warm-up exceeds the bounds.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from benchmarks.support.corpus import base_image, make_bad_corpus
from benchmarks.support.fake_artifact import make_artifact
from i2p.runtime import Detector


def usage() -> tuple[float, int]:
    gc.collect()
    proc = psutil.Process()
    return proc.memory_info().rss / 2**20, proc.num_fds()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="artifact directory (default: a small generated one)")
    ap.add_argument("--predictions", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=2000, help="lets per-thread malloc arenas settle")
    ap.add_argument("--threads", type=int, default=1, help="callers sharing the Detector")
    ap.add_argument("--rss-bound-mb", type=float, default=16.0)
    ap.add_argument("--fd-bound", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # Pillow's palette-transparency warning, once per file
    tmp = Path(tempfile.mkdtemp(prefix="i2p-leak-"))
    model = args.model or make_artifact(tmp / "fake.i2p")
    corpus = tmp / "corpus"
    make_bad_corpus(corpus)
    # The 20000x20000 and 81 MP bombs are refused from their headers; the big strip is kept out for speed.
    files = [p for p in sorted(corpus.iterdir()) if p.name != "strip_10000x10.png"]
    inputs = [*files, base_image(64, 48), base_image(300, 200)]
    det = Detector(model)
    print(f"{det!r}: {len(inputs)} inputs in rotation, {args.threads} thread(s)")

    def predict(i: int) -> None:
        det.predict(inputs[i % len(inputs)])

    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(predict, range(args.warmup)))
        rss0, fds0 = usage()
        print(f"after {args.warmup} warm-up predictions: RSS {rss0:.1f} MB, {fds0} open descriptors")
        t0 = time.perf_counter()
        step = max(1, args.predictions // 10)
        for start in range(0, args.predictions, step):
            list(pool.map(predict, range(start, min(start + step, args.predictions))))
            rss, fds = usage()
            print(
                f"{min(start + step, args.predictions):>7} predictions: RSS {rss:7.1f} MB ({rss - rss0:+6.1f}), fds {fds} ({fds - fds0:+d})"
            )
    elapsed = time.perf_counter() - t0
    grew_mb, grew_fds = rss - rss0, fds - fds0
    ok = grew_mb <= args.rss_bound_mb and grew_fds <= args.fd_bound
    print(
        f"{args.predictions} predictions in {elapsed:.1f} s: RSS {grew_mb:+.1f} MB (bound {args.rss_bound_mb}), "
        f"fds {grew_fds:+d} (bound {args.fd_bound}) -> {'OK' if ok else 'GROWTH ABOVE BOUND'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
