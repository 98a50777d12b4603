"""One streaming protocol: a local Detector and a RemoteDetector are driven by i2p-detect the same way."""

from __future__ import annotations

import inspect
from pathlib import Path

from i2p.base.files import sha256_file
from i2p.runtime import Detector
from i2p.runtime.streaming import ScorerInfo, StreamingDetector
from tests.support.fake_artifact import make_artifact


def test_a_detector_speaks_the_protocol_and_names_its_scorer(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "a.i2p")
    with Detector(artifact, backend="onnxruntime") as det:
        assert isinstance(det, StreamingDetector)
        assert det.scorer == ScorerInfo(
            det.backend.name, det.backend.precision, f"sha256:{sha256_file(artifact / 'manifest.json')}"
        )


def test_the_remote_detector_has_the_same_signatures() -> None:
    """No branch on the kind of detector: the remote one takes the same arguments (tritonclient not needed)."""
    from i2p.runtime.remote import RemoteDetector

    for name in ("predict_stream", "close"):
        local, remote = (
            inspect.signature(getattr(Detector, name)),
            inspect.signature(getattr(RemoteDetector, name)),
        )
        assert list(local.parameters) == list(remote.parameters), name
    assert not hasattr(RemoteDetector, "backend")  # it no longer fakes one: both say who scored in .scorer
