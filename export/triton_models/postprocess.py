"""Triton Python-backend model ``<ensemble>_postprocess``: logit + decode error -> probability, label, error.

Copied by ``i2p-export --triton`` as ``1/model.py``. The sigmoid and the threshold rule are the
Detector's (``i2p.runtime.serving.verdicts``); the threshold is the artifact's default one, or the
operating point named by the request parameter ``operating_point`` (forwarded by the ensemble). With the
``ood_threshold`` parameter (an artifact with the OOD output) it also takes the network's ``ood_score``
and returns ``ood`` and ``uncertain`` (``serving.ood_verdicts``).
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from i2p.runtime.serving import DECODE_ERROR, LOGIT, OOD_SCORE, ood_verdicts, text_tensor, verdicts


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.threshold = float(config["parameters"]["threshold"]["string_value"])
        points = config["parameters"].get("operating_points", {}).get("string_value", "{}")
        self.points = {name: float(t) for name, t in json.loads(points).items()}
        ood = config["parameters"].get("ood_threshold")
        self.ood_threshold = float(ood["string_value"]) if ood is not None else None

    def _threshold(self, request: object) -> float:
        """The default threshold, or that of the point the request's ``operating_point`` parameter names."""
        name = json.loads(request.parameters() or "{}").get("operating_point")
        if name is None:
            return self.threshold
        if not isinstance(name, str) or name not in self.points:
            known = ", ".join(sorted(self.points)) or "none"
            raise ValueError(f"no operating point {str(name)[:80]!r} in this model; it has: {known}")
        return self.points[name]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                logits = pb_utils.get_input_tensor_by_name(request, LOGIT).as_numpy()
                raw = pb_utils.get_input_tensor_by_name(request, DECODE_ERROR).as_numpy().reshape(-1)
                errors = [e.decode("utf-8", "replace") for e in raw]
                ood = None
                if self.ood_threshold is not None:
                    ood = pb_utils.get_input_tensor_by_name(request, OOD_SCORE).as_numpy()
                probabilities, labels, reasons = verdicts(logits, errors, self._threshold(request), ood)
                outputs = [
                    pb_utils.Tensor("probability", probabilities.reshape(-1, 1)),
                    pb_utils.Tensor("label", text_tensor(labels)),
                    pb_utils.Tensor("error", text_tensor(reasons)),
                ]
                if ood is not None:
                    scores, uncertain = ood_verdicts(ood, reasons, self.ood_threshold)
                    outputs.append(pb_utils.Tensor("ood", scores.reshape(-1, 1)))
                    outputs.append(pb_utils.Tensor("uncertain", uncertain.reshape(-1, 1)))
                responses.append(pb_utils.InferenceResponse(outputs))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocess: {e}")))
        return responses
