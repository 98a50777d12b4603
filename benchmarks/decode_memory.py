"""Peak memory of decoding hostile-but-small inputs, each in a fresh interpreter (README, "Reliability").

    .venv/bin/python -m benchmarks.decode_memory

Cases: a 16-bit 8000x8000 grey PNG (~0.5 MB on disk, 64 MP), the same decoded by 4 threads at once
(under the shared decode budget), a 1 GiB sparse .jpg, a 2x5000 strip. Prints the peak RSS growth of
each above the interpreter's peak after imports and one small warm-up image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.support.corpus import base_image, encode, png_bytes

SCRIPT = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from i2p.runtime.preprocess import ImageError, PreprocessSpec, preprocess
from benchmarks.support.corpus import base_image, encode
from benchmarks.support.memory import peak_rss_mb, reset_peak_rss
spec = PreprocessSpec(size=224)
preprocess(encode(base_image(), "PNG"), spec)
reset_peak_rss()
base = peak_rss_mb()
def one(p):
    try:
        preprocess(p, spec)
        return "ok"
    except ImageError as e:
        return str(e)[-60:]
with ThreadPoolExecutor(len(sys.argv) - 1) as pool:
    outcome = list(pool.map(one, sys.argv[1:]))
print(json.dumps([outcome[0], peak_rss_mb() - base]))
"""


def peak(paths: list[Path]) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, paths)], capture_output=True, text=True, check=True
    )
    outcome, mb = json.loads(out.stdout.splitlines()[-1])
    return outcome, mb


def main() -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="i2p-decode-memory-"))
    grey = tmp / "grey16_8000.png"
    grey.write_bytes(png_bytes(8000, 8000, 16, 0, (bytes(16000) for _ in range(8000))))
    copies = [grey] + [tmp / f"grey16_{i}.png" for i in range(3)]
    for c in copies[1:]:
        c.write_bytes(grey.read_bytes())
    sparse = tmp / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(2**30)
    strip = tmp / "strip_2x5000.png"
    strip.write_bytes(encode(base_image(2, 5000), "PNG"))
    cases = [
        (f"16-bit 8000x8000 PNG ({grey.stat().st_size / 1e6:.1f} MB file)", [grey]),
        ("same, 4 threads at once", copies),
        ("1 GiB sparse .jpg", [sparse]),
        ("2x5000 PNG", [strip]),
    ]
    print(f"{'input':<40} {'peak RSS growth':>16}  outcome")
    for name, paths in cases:
        outcome, mb = peak(paths)
        print(f"{name:<40} {mb:>13.0f} MB  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
