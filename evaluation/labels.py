"""Labelled image sets: discovery of folders and CSV manifests, without torch.

Sources (see ``discover``): a UniversalFakeDetect folder ``<root>/<generator>/{0_real,1_fake}``, a flat
``<root>/{0_real,1_fake}``, either with ``real``/``fake`` folder names, or a CSV manifest
``path,label[,generator]``. Training (``i2p.train.data``) and the torch-free evaluation of an exported
artifact (``i2p eval --model``) read labelled data through this one module.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from i2p.base.files import IMAGE_EXTENSIONS, is_image_name

CLASS_DIRS = {"0_real": 0, "real": 0, "1_fake": 1, "fake": 1}  # folder name (any case) -> label
CSV_LABELS = {"0": 0, "real": 0, "1": 1, "fake": 1}
_LABEL_NAMES = ("real", "fake")


class DataError(ValueError):
    """A data source does not match any supported layout; the message names the path and the problem."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 real, 1 fake
    generator: str


# ---------------------------------------------------------------------------------------------- discovery


def discover(source: str | os.PathLike) -> list[Sample]:
    """All labelled images of a folder or CSV manifest, sorted by (generator, label, path).

    Folders: if ``source`` itself holds class folders (``0_real``/``1_fake`` or ``real``/``fake``) it is
    one generator named after the folder; otherwise each sub-folder is a generator, and its class
    folders may sit at any depth (CNNDetection's ``progan/airplane/0_real`` counts as ``progan``). Images
    are found recursively inside class folders, by extension; hidden files and folders are skipped.

    Every image counts once: a file listed twice (by any path that resolves to it: ``./a.png``, a symlink)
    with one label is kept once with a warning giving the count; with both labels it is a DataError.
    """
    src = Path(source)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise DataError(f"{src}: expected a folder of images or a .csv manifest (path,label[,generator])")
        samples = _read_csv(src)
    elif src.is_dir():
        samples = _read_folder(src)
    else:  # a FIFO would block the read, a device would stream forever
        raise DataError(f"{src}: not a folder or a regular file (a FIFO, socket or device?)")
    return sorted(_unique(samples, src), key=lambda s: (s.generator, s.label, str(s.path)))


def _unique(samples: list[Sample], source: Path) -> list[Sample]:
    """Each image once, compared by its resolved path (``./a.png`` and ``a.png``, a symlink and its target
    are one file): the same file under two labels is a DataError naming it; listed again with its label
    it is kept once (the first listing, with its generator), with one warning that says how many."""
    first: dict[str, Sample] = {}
    conflicts: list[str] = []
    repeats = 0
    for s in samples:
        key = os.path.realpath(s.path)
        seen = first.setdefault(key, s)
        if seen is s:
            continue
        if seen.label != s.label:
            conflicts.append(
                f"{seen.path} ({_LABEL_NAMES[seen.label]}) and {s.path} ({_LABEL_NAMES[s.label]})"
            )
        else:
            repeats += 1
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise DataError(
            f"{source}: {len(conflicts)} file(s) labelled both real and fake: {'; '.join(conflicts[:3])}{more}"
        )
    if repeats:
        warnings.warn(
            f"{source}: {repeats} duplicate listing(s) of the same file ignored (each image counts once)",
            stacklevel=3,
        )
    return list(first.values())


def _read_folder(root: Path) -> list[Sample]:
    own = _class_dirs(root)
    if own:
        return _read_classes(own, root.name)
    generators = {d: _find_class_dirs(d) for d in _subdirs(root)}
    if not any(generators.values()):
        raise DataError(
            f"{root}: no class folders found. Expected <root>/<generator>/{{0_real,1_fake}}, "
            f"<root>/{{0_real,1_fake}} (or real/fake names), or a CSV manifest"
        )
    for folder, classes in generators.items():
        if not classes:
            raise DataError(f"{folder}: generator folder without 0_real/1_fake (or real/fake) folders inside")
    return [s for folder, classes in generators.items() for s in _read_classes(classes, folder.name)]


def _read_classes(class_dirs: list[tuple[Path, int]], generator: str) -> list[Sample]:
    samples = []
    for class_dir, label in class_dirs:
        images = list(_images_under(class_dir))
        if not images:
            raise DataError(
                f"{class_dir}: class folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples += [Sample(p, label, generator) for p in images]
    return samples


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_dirs(folder: Path) -> list[tuple[Path, int]]:
    """Class folders directly inside ``folder``; two folders for one class is an error."""
    found = [(d, CLASS_DIRS[d.name.lower()]) for d in _subdirs(folder) if d.name.lower() in CLASS_DIRS]
    for label in (0, 1):
        same = [d.name for d, lab in found if lab == label]
        if len(same) > 1:
            raise DataError(f"{folder}: both {' and '.join(same)} exist; keep one folder per class")
    return found


def _find_class_dirs(folder: Path) -> list[tuple[Path, int]]:
    """Class folders at the shallowest depths below ``folder`` (never looking inside a class folder)."""
    found = _class_dirs(folder)
    if found:
        return found
    return [c for d in _subdirs(folder) for c in _find_class_dirs(d)]


def _images_under(folder: Path) -> Iterator[Path]:
    """Image files below ``folder`` in sorted order, following symlinked folders once."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_name(name):
                yield Path(dirpath) / name


def _read_csv(path: Path) -> list[Sample]:
    """``path,label[,generator]`` rows; relative paths are resolved against the CSV's folder."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            header = [h.strip().lower() for h in reader.fieldnames or []]
            if "path" not in header or "label" not in header:
                raise DataError(
                    f"{path}: header must name the columns path,label[,generator]; got {header or 'nothing'}"
                )
            reader.fieldnames = header
            samples = [_csv_row(path, reader.line_num, row, len(header)) for row in reader]
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}, near line {reader.line_num + 1}: not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        except csv.Error as e:  # a field over csv.field_size_limit() (128 KiB), a NUL byte, ...
            raise DataError(
                f"{path}, near line {reader.line_num + 1}: not a readable CSV row ({e})"
            ) from None
    if not samples:
        raise DataError(f"{path}: the manifest lists no images")
    return samples


def _csv_row(csv_path: Path, line: int, row: dict[str | None, str | None], n_columns: int) -> Sample:
    where = f"{csv_path}, line {line}"
    if None in row or any(v is None for v in row.values()):  # DictReader's marks of extra / missing fields
        raise DataError(f"{where}: the number of fields differs from the header's {n_columns}")
    file = (row["path"] or "").strip()
    if not file:
        raise DataError(f"{where}: empty path")
    label = (row["label"] or "").strip().lower()
    if label not in CSV_LABELS:
        raise DataError(f"{where}: label {row['label']!r} is not one of 0, 1, real, fake")
    generator = (row.get("generator") or "").strip() or csv_path.stem
    return Sample(csv_path.parent / file, CSV_LABELS[label], generator)


def class_counts(samples: Sequence[Sample]) -> dict[str, tuple[int, int]]:
    """generator -> (number of real, number of fake) images, for summaries and sanity checks."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in samples:
        counts[s.generator][s.label] += 1
    return {g: (c[0], c[1]) for g, c in sorted(counts.items())}
