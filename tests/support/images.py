"""Test helpers on top of ``i2p.synthetic``: CSV manifests of synthetic image folders."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

from i2p.synthetic import LAYOUTS, Row, make_image_folder, synthetic_image

__all__ = ["LAYOUTS", "Row", "make_image_folder", "synthetic_image", "write_csv_manifest"]


def write_csv_manifest(
    csv_path: str | Path, rows: Iterable[Row], relative: bool = True, with_generator: bool = True
) -> Path:
    """Write ``path,label[,generator]`` rows; paths relative to the CSV's folder when ``relative``."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "generator"] if with_generator else ["path", "label"])
        for path, label, generator in rows:
            p = Path(path).resolve()
            shown = Path(os.path.relpath(p, csv_path.parent.resolve())) if relative else p
            writer.writerow([shown.as_posix(), label, generator][: 3 if with_generator else 2])
    return csv_path
