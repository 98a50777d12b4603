"""``Produced``: what one export step leaves behind, returned by the step instead of written into a shared record.

Each model step is *produce → check → keep* over a row of the model-file catalogue
(``i2p.runtime.model_files``): it writes a file, runs its gate, and returns the rows it kept with the
comparisons that kept them (or, for a dropped optional file, those that dropped it) and a note. The
pipeline adds the results up; the manifest lists ``kept`` and ``parity.json`` is made from them once.
"""

from __future__ import annotations

from dataclasses import dataclass

from i2p.runtime.model_files import FileKind

from .parity import Comparison, ParityReport


@dataclass(frozen=True)
class Produced:
    kept: tuple[FileKind, ...] = ()  # catalogue rows of the files kept, in the order they were made
    comparisons: tuple[Comparison, ...] = ()  # parity of the kept files against PyTorch
    rejected: tuple[Comparison, ...] = ()  # parity of optional files that were dropped
    notes: tuple[str, ...] = ()  # one line each for the export summary

    def __add__(self, other: Produced) -> Produced:
        return Produced(
            self.kept + other.kept,
            self.comparisons + other.comparisons,
            self.rejected + other.rejected,
            self.notes + other.notes,
        )

    def parity(self, reference: str) -> ParityReport:
        """parity.json's record: the one place a ParityReport of the export is assembled."""
        return ParityReport(reference, self.comparisons, self.rejected)
