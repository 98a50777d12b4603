"""I2P_* environment variables: a bad value is one message naming the variable, raised where it is used
(never at import, which took down every command, ``--help`` included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from i2p.runtime.memory import SettingError, decode_memory_bytes
from tests.support.fake_artifact import make_artifact

BAD = [
    "abc",
    "-5",
    "0",
    "nan",
    "inf",
    "1e3",
    "2048.5",
    "99999999999999999999",
    "1048577",
    "٩٥",
    "1_024",
    " + 5",
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "fake.i2p")


@pytest.mark.parametrize("value", BAD)
def test_bad_decode_memory_is_an_error_naming_the_variable(value: str, monkeypatch) -> None:
    monkeypatch.setenv("I2P_DECODE_MEMORY_MB", value)
    with pytest.raises(
        SettingError, match=r"^I2P_DECODE_MEMORY_MB=.*whole number of MiB from 1 to 1,048,576"
    ):
        decode_memory_bytes()


@pytest.mark.parametrize(
    ("value", "mib"), [("", 2048), ("  ", 2048), ("1", 1), (" 512 ", 512), ("1048576", 2**20)]
)
def test_good_decode_memory_values(value: str, mib: int, monkeypatch) -> None:
    monkeypatch.setenv("I2P_DECODE_MEMORY_MB", value)
    assert decode_memory_bytes() == mib * 2**20


def _detect(env_value: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "I2P_DECODE_MEMORY_MB": env_value}
    code = "from i2p.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "detect", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "1e400"])
def test_detect_with_a_bad_variable_exits_with_one_line_naming_it(
    value: str, artifact: Path, tmp_path
) -> None:
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    res = _detect(value, "--model", str(artifact), str(image))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    named = [line for line in res.stderr.splitlines() if "I2P_DECODE_MEMORY_MB" in line]
    assert len(named) == 1, res.stderr
    assert repr(value) in named[0]


def test_the_variable_is_not_read_at_import_and_help_works() -> None:
    res = _detect("abc", "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
