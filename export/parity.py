"""Export-time parity: every produced model against the PyTorch model, on the same inputs.

A ``Comparison`` is one model file, run by one runner, on one input set (random images, or real ones
from ``--calib-images``), measured against the PyTorch FP32 reference (the checkpoint's unmerged model):
per-output max/mean absolute error, decision agreement at the stored threshold, and pass/fail against
``Tolerances``. A model no runner here can execute is recorded as ``not-run`` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from i2p.base.tables import format_table

PASS, FAIL, NOT_RUN = "pass", "fail", "not-run"
# Logit tolerances against PyTorch FP32. Measured on ONNX Runtime CPU: FP32 3e-5 (ViT-B/16, L*=8, real
# images) and 8e-7 (random ViT-L/14, L*=12); FP16 0.008 (ViT-B/16, LayerNorm kept in FP32). GPU FP16
# arithmetic differs from ONNX Runtime's CPU kernels, hence the wider FP16 margin.
# INT8 (dynamic, weights per tensor): the limit that defines "near the threshold" for its decision gate.
DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.25}


@dataclass(frozen=True)
class Tolerances:
    """Absolute limits on the logit error; the probability limit follows from it.

    sigmoid's slope is at most 1/4, so a logit within ``logit_atol`` gives a probability within
    ``logit_atol / 4``; checking both catches a broken probability output. Within these limits a
    decision can flip only for samples whose reference probability lies within ``prob_atol`` of the
    threshold; flips beyond that band ("decisive") are counted to show what a failure costs.
    """

    logit_atol: float
    ood_rtol: float | None = None  # |Δood| / max(1, |ood|), with an OOD head (ood_head.OOD_RTOL)

    @property
    def prob_atol(self) -> float:
        return self.logit_atol / 4


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float  # inf when the model produced NaN/inf
    mean_abs: float  # over the finite outputs
    nonfinite: int = 0

    @classmethod
    def between(cls, reference: np.ndarray, candidate: np.ndarray) -> ErrorStats:
        diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
        finite = np.isfinite(diff)
        bad = int((~finite).sum())
        mean = float(diff[finite].mean()) if finite.any() else math.inf
        return cls(math.inf if bad else float(diff.max()), mean, bad)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity: a model with non-finite outputs is reported by the count.
        return {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()
        }


@dataclass(frozen=True)
class Comparison:
    model: str  # file name inside the artifact
    precision: str
    inputs: str  # "random" | "calib-images"
    samples: int
    runner: str  # what executed the model, e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    tolerances: Tolerances
    threshold: float
    status: str  # PASS | FAIL | NOT_RUN
    logit: ErrorStats | None = None
    probability: ErrorStats | None = None
    agreement: float | None = None  # fraction of samples with the same decision as the reference
    flips: int = 0  # decisions that differ from the reference
    decisive_flips: int = 0  # ... on samples farther than prob_atol from the threshold
    note: str = ""
    # The limit the verdict applied, as the table shows it; a gate of its own (INT8) replaces the default
    # "max |Δlogit| <= atol" and marks the max as on record only.
    limit: str = ""
    max_gated: bool = True
    ood: ErrorStats | None = None  # relative error of the ood output: |Δ| / max(1, |reference|)

    @classmethod
    def measure(
        cls,
        *,
        model: str,
        precision: str,
        inputs: str,
        runner: str,
        reference: tuple[np.ndarray, np.ndarray],
        candidate: tuple[np.ndarray, np.ndarray],
        threshold: float,
        tolerances: Tolerances,
        note: str = "",
        ood: tuple[np.ndarray, np.ndarray | None] | None = None,
    ) -> Comparison:
        """Compare (logits, probabilities) of a candidate with the reference's; ``ood``: (reference, candidate)
        scores of a network with an OOD head (a candidate without the output fails)."""
        (ref_logit, ref_prob), (logit, prob) = reference, candidate
        logit_err, prob_err = ErrorStats.between(ref_logit, logit), ErrorStats.between(ref_prob, prob)
        ood_err = None
        if ood is not None:
            ref_ood, cand_ood = ood
            scale = np.maximum(1.0, np.abs(ref_ood.astype(np.float64)))
            missing = np.full(len(ref_ood), np.nan)
            ood_err = ErrorStats.between(ref_ood / scale, (missing if cand_ood is None else cand_ood) / scale)
        differ = (ref_prob >= threshold) != (prob >= threshold)
        decisive = differ & (np.abs(ref_prob - threshold) > tolerances.prob_atol)
        passed = (
            logit_err.max_abs <= tolerances.logit_atol
            and prob_err.max_abs <= tolerances.prob_atol
            and not decisive.any()
            and (ood_err is None or tolerances.ood_rtol is None or ood_err.max_abs <= tolerances.ood_rtol)
        )
        return cls(
            model=model,
            precision=precision,
            inputs=inputs,
            samples=len(ref_logit),
            runner=runner,
            tolerances=tolerances,
            threshold=threshold,
            status=PASS if passed else FAIL,
            logit=logit_err,
            probability=prob_err,
            agreement=float(1 - differ.mean()) if len(differ) else None,
            flips=int(differ.sum()),
            decisive_flips=int(decisive.sum()),
            note=note,
            ood=ood_err,
        )

    @classmethod
    def not_run(
        cls,
        *,
        model: str,
        precision: str,
        inputs: str,
        samples: int,
        reason: str,
        threshold: float,
        tolerances: Tolerances,
    ) -> Comparison:
        return cls(model, precision, inputs, samples, "", tolerances, threshold, NOT_RUN, note=reason)

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    def row(self) -> dict[str, Any]:
        """One line of the summary table."""
        return {
            "model": self.model,
            "inputs": f"{self.inputs} ({self.samples})",
            "max|Δlogit|": _num(self.logit.max_abs if self.logit else None)
            + ("" if self.max_gated or self.logit is None else " (not gated)"),
            "mean|Δlogit|": _num(self.logit.mean_abs if self.logit else None),
            "max|Δprob|": _num(self.probability.max_abs if self.probability else None),
            "agree": _num(self.agreement),
            "limit": self.limit or f"max {self.tolerances.logit_atol:g}",
            "status": self.status,
        }

    def report(self) -> str:
        """Readable multi-line account: what ran, the errors against the limits, the verdict."""
        head = (
            f"{self.model} [{self.precision}] on {self.samples} {self.inputs} inputs: {self.status.upper()}"
        )
        if self.status == NOT_RUN:
            return f"{head}\n  not run: {self.note}"
        lines = [head, f"  runner: {self.runner}"]
        for name, err, atol in (
            ("logit", self.logit, self.tolerances.logit_atol),
            ("probability", self.probability, self.tolerances.prob_atol),
        ):
            extra = f", {err.nonfinite} non-finite" if err and err.nonfinite else ""
            lines.append(
                f"  {name}: max |Δ| {_num(err.max_abs)}, mean |Δ| {_num(err.mean_abs)} (limit {atol:g}){extra}"
            )
        if self.ood is not None:
            limit = "not gated" if self.tolerances.ood_rtol is None else f"limit {self.tolerances.ood_rtol:g}"
            lines.append(
                f"  ood (relative): max |Δ| {_num(self.ood.max_abs)}, mean |Δ| {_num(self.ood.mean_abs)} ({limit})"
            )
        lines.append(
            f"  decisions at threshold {self.threshold:.4g}: agreement {_num(self.agreement)}, "
            f"{self.flips} flipped, {self.decisive_flips} beyond the borderline band (limit 0)"
        )
        if self.note:  # on a pass it is context (what ran, what was on record), not an alarm
            lines.append(f"  {'note' if self.status == FAIL else 'info'}: {self.note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerances"] = {"logit_atol": self.tolerances.logit_atol, "prob_atol": self.tolerances.prob_atol}
        d["logit"] = self.logit.to_dict() if self.logit else None
        d["probability"] = self.probability.to_dict() if self.probability else None
        d["ood"] = self.ood.to_dict() if self.ood else None
        d["tolerances"]["ood_rtol"] = self.tolerances.ood_rtol
        return d


@dataclass(frozen=True)
class ParityReport:
    reference: str  # what the models were compared against
    comparisons: tuple[Comparison, ...]
    # Comparisons of optional files that were dropped because of them (model.int8.onnx): on record, not
    # part of the artifact, so they do not fail the export.
    rejected: tuple[Comparison, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def table(self) -> str:
        return format_table([c.row() for c in self.comparisons])

    def report(self) -> str:
        return "\n".join([f"reference: {self.reference}", *(c.report() for c in self.comparisons)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "passed": self.passed,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "rejected": [c.to_dict() for c in self.rejected],
        }

    def summary(self) -> dict[str, Any]:
        """Per model file: status and worst logit error over all input sets (for the manifest)."""
        out: dict[str, Any] = {}
        for c in self.comparisons:
            s = out.setdefault(c.model, {"status": PASS, "max_abs_logit_error": 0.0, "runner": c.runner})
            if c.status != PASS and s["status"] != FAIL:
                s["status"] = c.status
            if c.logit is not None:
                s["max_abs_logit_error"] = max(s["max_abs_logit_error"], c.logit.max_abs)
            if c.ood is not None:
                s["max_rel_ood_error"] = _finite(max(s.get("max_rel_ood_error") or 0.0, c.ood.max_abs))
        for s in out.values():
            s["max_abs_logit_error"] = _finite(s["max_abs_logit_error"])
        return out


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "inf"
    return f"{v:.3g}" if v and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4f}"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None
