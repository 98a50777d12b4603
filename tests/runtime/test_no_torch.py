"""The runtime works in a process where torch (and the training/export packages) cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("torch", "torchvision", "open_clip", "i2p.train", "i2p.export")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    artifact, image = sys.argv[1], sys.argv[2]

    from i2p.runtime import Detector
    [p] = Detector(artifact).predict(image)
    assert p.ok, p

    from i2p.cli import main
    try:
        main(["detect", image, "--model", artifact, "--json"])
    except SystemExit as e:
        assert e.code == 0, e.code
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip"))
        print(json.dumps({"probability": p.probability, "loaded": loaded}), file=sys.stderr)
    """
)


def test_runtime_and_detect_run_without_torch(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "fake.i2p")
    image = tmp_path / "x.png"
    image.write_bytes(encode(base_image(), "PNG"))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(artifact), str(image)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["loaded"] == []
    row = json.loads(proc.stdout)  # the detect row, from the same lazy i2p group users run
    assert row["path"] == str(image) and row["probability"] == report["probability"]
