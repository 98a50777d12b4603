"""Triton Python-backend model ``<ensemble>_preprocess``: encoded image bytes -> model input + error.

Copied by ``i2p-export --triton`` as ``1/model.py``. Decoding is ``i2p.runtime``'s (the Detector's own),
so server and in-process results agree; an image that fails gets an error, never fails the batch.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.serving import DECODE_ERROR, IMAGE, PIXELS, decode_batch, text_tensor


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.spec = PreprocessSpec.from_dict(json.loads(config["parameters"]["preprocess"]["string_value"]))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)
                pixels, errors = decode_batch(list(blobs), self.spec)
                outputs = [
                    pb_utils.Tensor(PIXELS, pixels),
                    pb_utils.Tensor(DECODE_ERROR, text_tensor(errors)),
                ]
                responses.append(pb_utils.InferenceResponse(outputs))
            except Exception as e:  # a malformed request fails alone; the instance stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess: {e}")))
        return responses
