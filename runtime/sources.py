"""The image files ``i2p-detect`` scores: discovered while directories are read, in bounded memory.

Files are yielded while directories are being read (only the names of subdirectories still to visit
are kept), so a tree of millions of files is walked in bounded memory; ``survey`` says why a walk found
nothing. Scoring the stream is ``i2p.runtime.streaming``'s.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator

from i2p.base.files import IMAGE_EXTENSIONS, is_image_name

from .cells import display

log = logging.getLogger("i2p")


def iter_images(paths: Iterable[str | os.PathLike], recursive: bool = False) -> Iterator[str]:
    """Image paths under ``paths``, yielded as the directories are read (in directory order).

    A path named explicitly is always yielded, whatever its extension (its row explains if it is not
    an image). Inside directories only image extensions count; with ``recursive``, subdirectories are
    walked (symlinked ones are not followed, so a link loop cannot trap the walk).
    """
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            yield from _walk(path, recursive)
        else:
            yield path


def _walk(top: str, recursive: bool) -> Iterator[str]:
    pending = deque([top])
    while pending:
        directory = pending.popleft()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if recursive and entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif is_image_name(entry.name):
                        yield entry.path  # a non-file named like an image gets its error row
        except OSError as e:
            log.warning("i2p: skipping directory %s: %s", display(directory), e.strerror or e)


def survey(paths: Iterable[str | os.PathLike], recursive: bool) -> str:
    """Why a scan found no image: what the directories given hold, and ``--recursive`` when it would help."""
    notes, nested = [], False
    for path in map(os.fspath, paths):
        if not os.path.isdir(path):
            continue
        subdirs, others = [], 0
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    elif not is_image_name(entry.name):
                        others += 1
        except OSError as e:
            notes.append(f"{display(path)}: cannot list ({e.strerror or e})")
            continue
        found = [f"{others} other file(s)"] if others else []
        if subdirs:
            shown = ", ".join(map(display, sorted(subdirs)[:5])) + (", ..." if len(subdirs) > 5 else "")
            found.append(f"{len(subdirs)} subdirector{'y' if len(subdirs) == 1 else 'ies'} ({shown})")
            nested = True
        where = "in it or its subdirectories" if recursive else "directly in it"
        notes.append(f"{display(path)}: no image files {where}; found {', '.join(found) or 'nothing'}")
    hint = "; ".join(notes) or "no image files among the paths given"
    if nested and not recursive:
        hint += (
            ". Add --recursive (-r) to score the images in subdirectories (e.g. a <generator>/0_real layout)"
        )
    return hint + f". Image files end in {', '.join(sorted(IMAGE_EXTENSIONS))}."
