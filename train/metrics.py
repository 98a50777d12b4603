"""Detection metrics for training and ``i2p eval``: the runtime's implementation, re-exported.

The numpy code lives in ``i2p.runtime.metrics`` so that evaluating an exported artifact (no torch)
and evaluating a checkpoint compute every number with the same code; training imports it from here.
"""

from i2p.runtime.metrics import (
    DEFAULT_TARGETS,
    MEAN,
    Metrics,
    OperatingPoint,
    average_precision,
    calibrate_threshold,
    evaluate,
    expected_calibration_error,
    metrics_table,
    operating_points,
    point_name,
    roc_auc,
    tpr_at_fpr,
)

__all__ = [
    "DEFAULT_TARGETS",
    "MEAN",
    "Metrics",
    "OperatingPoint",
    "average_precision",
    "calibrate_threshold",
    "evaluate",
    "expected_calibration_error",
    "metrics_table",
    "operating_points",
    "point_name",
    "roc_auc",
    "tpr_at_fpr",
]
