"""i2p-export --force replaces only what is recognisably an i2p artifact: never a folder that merely holds a
file named manifest.json, one with a file of the user's beside the artifact, or a folder through a link."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from i2p.export.artifact import check_target
from i2p.export.export_cli import export
from i2p.export.network import ExportError
from tests.support.fake_artifact import make_artifact


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "det.i2p")


def refused(target: Path, *words: str) -> str:
    with pytest.raises(ExportError) as e:
        check_target(target, force=True)
    for word in words:
        assert word in str(e.value), str(e.value)
    return str(e.value)


def test_a_real_artifact_is_replaceable(artifact: Path) -> None:
    check_target(artifact, force=True)
    (artifact / "engines").mkdir()
    (artifact / "engines" / "x.engine").write_bytes(b"cache")  # the runtime's engine cache is ours too
    check_target(artifact, force=True)
    with pytest.raises(ExportError, match="pass --force"):
        check_target(artifact, force=False)


def test_a_web_folder_with_a_manifest_json_is_refused(tmp_path: Path) -> None:
    web = tmp_path / "site"
    web.mkdir()
    (web / "index.html").write_text("<html>")
    (web / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/", "icons": []}))
    refused(web, "not an i2p artifact manifest", "not replacing it")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "My PWA"}',
        '{"format": "i2p-artifact", "format_version": 1, "files": ["a"]}',
        '{"format": "i2p-artifact", "files": {}}',
        '{"format": "other", "format_version": 1, "files": {}}',
        "[1, 2]",
        "not json",
        "[" * 100_000,
        "",
    ],
)
def test_a_manifest_json_that_is_not_ours_is_refused(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "thing"
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    refused(folder, "not an i2p artifact manifest")
    assert (folder / "manifest.json").read_text() == text


@pytest.mark.parametrize("extra", ["notes.txt", "sub/notes.txt", "index.html", "emptydir/"])
def test_an_artifact_with_a_file_of_the_users_is_refused(artifact: Path, extra: str) -> None:
    path = artifact / extra
    path.parent.mkdir(parents=True, exist_ok=True)
    if extra.endswith("/"):
        path.mkdir()
    else:
        path.write_text("mine")
    refused(artifact, extra.split("/")[0], "does not list")


def test_links_are_refused(artifact: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.i2p"
    link.symlink_to(artifact)
    refused(link, "symbolic link")
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    (artifact / "parity.json").unlink(missing_ok=True)
    os.symlink(outside, artifact / "extra.txt")
    refused(artifact, "symbolic link")


def test_the_cli_refuses_before_any_work(tmp_path: Path) -> None:
    web = tmp_path / "site"
    web.mkdir()
    (web / "index.html").write_text("<html>")
    (web / "manifest.json").write_text('{"name": "My PWA"}')
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"never read")
    result = CliRunner().invoke(export, ["--ckpt", str(ckpt), "--out", str(web), "--force"])
    assert result.exit_code == 1 and "not an i2p artifact manifest" in result.output, result.output
    assert (web / "index.html").read_text() == "<html>" and sorted(p.name for p in web.iterdir()) == [
        "index.html",
        "manifest.json",
    ]
