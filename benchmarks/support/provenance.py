"""Which code a benchmark measured: the commit its recorded figures belong to."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """HEAD's short hash, or the ``GIT_COMMIT`` file of a ``git archive`` snapshot; None if neither."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip()
    snapshot = REPO / "GIT_COMMIT"
    return snapshot.read_text().strip() if snapshot.is_file() else None
