"""Triton Python-backend model ``<ensemble>_network``: the artifact on the runtime's ONNX Runtime backend.

For CPU-only servers and Triton builds without an ONNX Runtime backend. ``1/artifact/`` holds the
manifest and the FP32 ONNX files; ``Detector`` verifies their sha256 and picks the model it would pick
in-process on this CPU (the fused ``model.cpu.onnx`` unless exported with ``--no-cpu``), so the logits match.
With the artifact's OOD output the backend also returns the ``ood`` scores, sent as a second output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from i2p.runtime import Detector
from i2p.runtime.backends import checked_scores
from i2p.runtime.schema import OOD_OUTPUT
from i2p.runtime.serving import LOGIT


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / params["artifact"]
        self.input = config["input"][0]["name"]
        self.detector = Detector(
            artifact,
            backend="onnxruntime",
            precision="fp32",
            threads=int(params.get("threads", "0")) or None,
            batch_size=max(1, config.get("max_batch_size", 1)),
        )

    def execute(self, requests: list) -> list:
        """One ONNX Runtime run over every request the dynamic batcher gathered."""
        try:
            batches = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
            pixels = np.ascontiguousarray(np.concatenate(batches))
            logits, ood = checked_scores(self.detector.backend.infer(pixels), len(pixels))
        except Exception as e:
            error = pb_utils.TritonError(f"network: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        outputs = {LOGIT: logits, **({OOD_OUTPUT: ood} if ood is not None else {})}
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        parts = {
            name: np.split(np.asarray(v, np.float32).reshape(-1, 1), cuts) for name, v in outputs.items()
        }
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(name, parts[name][i]) for name in outputs])
            for i in range(len(requests))
        ]

    def finalize(self) -> None:
        self.detector.close()
