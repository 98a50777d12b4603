"""Longer fuzz run of decode + preprocess than CI affords: mutated valid images and random bytes.

    .venv/bin/python -m benchmarks.fuzz_decode --seconds 600

Any exception other than ImageError, a non-finite output or a decode slower than --slow-s is a
finding: the input is saved under --out for a regression test, and the run exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from benchmarks.support.corpus import fuzz_seeds, mutate
from i2p.runtime.preprocess import ImageError, PreprocessSpec, preprocess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--slow-s", type=float, default=5.0, help="a decode slower than this is a finding")
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # Pillow warns about every corrupt EXIF block; those are not findings
    spec = PreprocessSpec(size=args.size)
    rng = np.random.default_rng(args.seed)
    seeds = list(fuzz_seeds().items())
    runs, rejected, findings, slowest = 0, 0, 0, 0.0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        if rng.random() < 0.05:
            name, data = "random", rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
        else:
            name, seed = seeds[int(rng.integers(0, len(seeds)))]
            data = mutate(seed, rng)
        t0 = time.monotonic()
        problem = None
        try:
            x = preprocess(data, spec)
            if not np.isfinite(x).all():
                problem = "non-finite output"
        except ImageError:
            rejected += 1
        except Exception:
            problem = traceback.format_exc()
        elapsed = time.monotonic() - t0
        slowest = max(slowest, elapsed)
        if elapsed > args.slow_s:
            problem = f"decode took {elapsed:.1f} s"
        runs += 1
        if problem:
            findings += 1
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{name}-{runs}.bin"
            path.write_bytes(data)
            print(f"FINDING {path}: {problem}", flush=True)
    print(
        f"{runs} inputs in {args.seconds:.0f} s ({runs / args.seconds:.0f}/s): {rejected} rejected with ImageError, "
        f"{runs - rejected - findings} decoded, {findings} findings; slowest {slowest * 1e3:.0f} ms"
    )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
