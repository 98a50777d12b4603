"""Detector: predictions, batching, artifact checks, misuse, thread safety, backend choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from i2p.runtime import ArtifactError, BackendUnavailableError, Detector, ImageError, Prediction
from i2p.runtime import detector as detector_module
from i2p.runtime.manifest import FORMAT_VERSION
from i2p.runtime.preprocess import ResizePlan, preprocess, resize_plan
from tests.support.concurrency import run_in_threads
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import build_model, make_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact") / "fake.i2p")


@pytest.fixture(scope="module")
def det(artifact: Path) -> Detector:
    return Detector(artifact, backend="onnxruntime")


def stand_in(name: str, precision: str, infer: Any, **extra: Any) -> SimpleNamespace:
    """A Backend stand-in: host preprocessing and any batch size unless ``extra`` says otherwise."""
    fields = {"accepts_images": False, "max_batch": None, "close": lambda: None, **extra}
    return SimpleNamespace(name=name, precision=precision, infer=infer, **fields)


def test_batches_are_cut_once_to_the_backend_limit(artifact: Path, det: Detector, monkeypatch) -> None:
    """Detector(batch_size=5) on a backend taking at most 2 images: every call gets <= 2, in order."""
    sizes: list[int] = []

    def infer(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return det.backend.infer(x)

    monkeypatch.setattr(
        Detector, "_open_backend", lambda self, *a: stand_in("small", "fp32", infer, max_batch=2)
    )
    small = Detector(artifact, batch_size=5)
    imgs = images(5)
    assert [r.probability for r in small.predict(imgs)] == [r.probability for r in det.predict(imgs)]
    assert sizes == [2, 2, 1]
    sizes.clear()
    batch = np.stack([preprocess(im, det.spec) for im in imgs])
    np.testing.assert_array_equal(small.predict_batch(batch), det.predict_batch(batch))
    assert sizes == [2, 2, 1]


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct images of assorted sizes (none square, so the resize and crop are exercised)."""
    rng = np.random.default_rng(seed)
    return [base_image(int(rng.integers(20, 90)), int(rng.integers(20, 90)), seed=i) for i in range(n)]


def test_every_input_kind_gives_the_same_result(det: Detector, tmp_path: Path) -> None:
    pixels = base_image(61, 47)
    png = encode(pixels, "PNG")
    (tmp_path / "a.png").write_bytes(png)
    results = det.predict([tmp_path / "a.png", str(tmp_path / "a.png"), png, Image.fromarray(pixels), pixels])
    assert all(r.ok for r in results), results
    assert len({r.probability for r in results}) == 1
    assert results[0].source == str(tmp_path / "a.png")
    # The probability is the network's on exactly the preprocessed tensor.
    expected = det.predict_batch(preprocess(pixels, det.spec)[None])
    assert results[0].probability == pytest.approx(float(expected[0]), abs=0)


def test_predict_batch_equals_predict_through_preprocess(det: Detector) -> None:
    imgs = images(7)
    batch = np.stack([preprocess(im, det.spec) for im in imgs])
    probs = det.predict_batch(batch)
    assert probs.shape == (7,) and probs.dtype == np.float32
    assert [r.probability for r in det.predict(imgs)] == [float(p) for p in probs]
    assert len(set(probs.tolist())) == 7  # the images really differ to the network


def test_single_input_and_empty_sequence(det: Detector) -> None:
    img = images(1)[0]
    [single] = det.predict(img)
    assert single == det.predict([img])[0]
    assert det.predict([]) == []
    assert det.predict_batch(np.zeros((0, 3, 32, 32), np.float32)).shape == (0,)


def test_batching_does_not_change_results(artifact: Path, det: Detector) -> None:
    imgs = images(11)
    small = Detector(artifact, backend="onnxruntime", batch_size=3)
    assert small.predict(imgs) == det.predict(imgs)
    batch = np.stack([preprocess(im, det.spec) for im in imgs])
    np.testing.assert_array_equal(small.predict_batch(batch), det.predict_batch(batch))


def test_threshold_decides_the_label(artifact: Path, tmp_path: Path) -> None:
    imgs = images(8)
    probs = np.array([r.probability for r in Detector(artifact).predict(imgs)])
    cut = float(np.median(probs))
    via_manifest = Detector(make_artifact(tmp_path / "t.i2p", threshold=cut))
    via_argument = Detector(artifact, threshold=cut)
    assert via_manifest.threshold == via_argument.threshold == cut
    for d in (via_manifest, via_argument):
        results = d.predict(imgs)
        assert [r.is_fake for r in results] == [bool(p >= cut) for p in probs]
        assert {r.label for r in results} == {"fake", "real"}


def test_fp16_model_agrees_with_fp32(artifact: Path, det: Detector) -> None:
    fp16 = Detector(artifact, backend="onnxruntime", precision="fp16")
    assert (fp16.backend.precision, det.backend.precision) == ("fp16", "fp32")
    imgs = images(6)
    a = np.array([r.probability for r in det.predict(imgs)])
    b = np.array([r.probability for r in fp16.predict(imgs)])
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert not np.array_equal(a, b)  # it really ran the other network


def test_a_bad_input_never_fails_the_batch(det: Detector, tmp_path: Path) -> None:
    good = images(3)
    missing = tmp_path / "missing.jpg"
    results = det.predict(
        [good[0], b"not an image", good[1], missing, np.zeros((0, 5, 3), np.uint8), good[2]]
    )
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    assert [r.probability for r in results if r.ok] == [r.probability for r in det.predict(good)]
    assert "<12 bytes>" in results[1].error and "not a readable image" in results[1].error
    assert str(missing) in results[3].error and "No such file" in results[3].error
    assert "shape (0, 5, 3)" in results[4].error
    assert results[1] == Prediction(results[1].source, None, None, results[1].error)


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda d: d.predict(5), TypeError, "got int"),
        (lambda d: d.predict([base_image(), None]), TypeError, "input 1 is a NoneType"),
        (lambda d: d.predict(np.zeros((2, 3, 32, 32), np.float32)), TypeError, "use predict_batch"),
        (lambda d: d.predict_batch([[1.0]]), TypeError, "numpy array"),
        (
            lambda d: d.predict_batch(np.zeros((2, 32, 32, 3), np.float32)),
            ValueError,
            "float32 [N, 3, 32, 32]",
        ),
        (lambda d: d.predict_batch(np.zeros((2, 3, 32, 32), np.uint8)), ValueError, "got uint8"),
    ],
)
def test_misuse_raises_a_clear_error(det: Detector, call, exc, message) -> None:
    with pytest.raises(exc, match=message.replace("[", r"\[")):
        call(det)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"backend": "cuda"}, ValueError, "choose one of auto, tensorrt, onnxruntime"),
        ({"precision": "int4"}, ValueError, "precision='int4'"),
        ({"batch_size": 0}, ValueError, "positive integer"),
        ({"backend": "tensorrt", "precision": "fp32"}, ValueError, "TensorRT backend runs FP16"),
    ],
)
def test_bad_arguments(artifact: Path, kwargs, exc, message) -> None:
    with pytest.raises(exc, match=message):
        Detector(artifact, **kwargs)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="artifact directory"):
        Detector(42)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        Detector(tmp_path / "nope.i2p")
    with pytest.raises(ArtifactError, match="no manifest.json here"):
        Detector(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        Detector(tmp_path)


def _rewrite_manifest(root: Path, **changes: object) -> None:
    data = json.loads((root / "manifest.json").read_text())
    data.update(changes)
    (root / "manifest.json").write_text(json.dumps(data))


def test_tampered_truncated_and_missing_models_are_refused(tmp_path: Path) -> None:
    root = make_artifact(tmp_path / "a.i2p")
    onnx.save(build_model(32, seed=1), root / "model.onnx")  # a valid network, but not the exported one
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 .* does not match the manifest.*re-export"):
        Detector(root, precision="fp32")
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 .* does not match"):
        Detector(root, precision="fp16")  # every model file is checked at load, not only the one in use

    root = make_artifact(tmp_path / "b.i2p")
    data = (root / "model.fp16.onnx").read_bytes()
    (root / "model.fp16.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.fp16.onnx: sha256 .* does not match"):
        Detector(root, precision="fp16")

    (root / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx: listed in manifest.json but missing"):
        Detector(root, precision="fp32")


def test_unlisted_model_and_missing_precision_are_refused(tmp_path: Path) -> None:
    root = make_artifact(tmp_path / "a.i2p")
    _rewrite_manifest(root, files={})
    with pytest.raises(ArtifactError, match="not listed in manifest.json; refusing an unverified file"):
        Detector(root)
    root = make_artifact(tmp_path / "b.i2p", fp16=False)
    with pytest.raises(ArtifactError, match=r"no fp16 model in this artifact \(it has: fp32\).*--fp16"):
        Detector(root, precision="fp16")
    _rewrite_manifest(root, models=[])
    with pytest.raises(ArtifactError, match="lists no model files"):
        Detector(root)


def test_manifest_io_must_match_the_runtime_contract(tmp_path: Path) -> None:
    root = make_artifact(tmp_path / "a.i2p")
    _rewrite_manifest(root, inputs=[{"name": "image", "dtype": "float32", "shape": ["batch", 3, 64, 64]}])
    with pytest.raises(ArtifactError, match=r"needs one \[batch, 3, 32, 32\] input and a 'logit' output"):
        Detector(root)
    root = make_artifact(tmp_path / "b.i2p")
    _rewrite_manifest(root, outputs=[{"name": "probability", "dtype": "float32", "shape": ["batch"]}])
    with pytest.raises(ArtifactError, match=r"outputs \['probability'\]"):
        Detector(root)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    root = make_artifact(tmp_path / "new.i2p", format_version=FORMAT_VERSION + 1)
    with pytest.raises(
        ArtifactError, match=f"format version {FORMAT_VERSION + 1} is newer.*upgrade i2p-detector"
    ):
        Detector(root)


@pytest.mark.slow
def test_concurrent_predict_matches_serial(det: Detector) -> None:
    """8 threads x 500 calls on one Detector give exactly the serial results."""
    inputs = images(16, seed=3)
    calls = [inputs[(t * 7 + i * 3) % 16] for t in range(8) for i in range(500)]
    serial = [det.predict(c) for c in calls]
    assert run_in_threads(lambda i: det.predict(calls[i]), len(calls), threads=8) == serial


def test_logs_the_backend_and_precision(artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="i2p"):
        Detector(artifact)
    assert "onnxruntime[CPUExecutionProvider], precision fp32" in caplog.text


# -- backend choice and hooks, with stand-in backends -----------------------------------------------------


class FakeTensorRT:
    """Stands in for i2p.runtime.backends.tensorrt on machines without TensorRT."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple] = []

    def TensorRTBackend(self, artifact_dir, manifest, device, max_batch, gpu_preprocessing):  # noqa: N802
        self.calls.append((artifact_dir, manifest.name, device, max_batch, gpu_preprocessing))
        if self.fail:
            raise RuntimeError("no engine for this GPU")
        return stand_in("tensorrt", "fp16", lambda x: np.zeros(len(x), np.float32))


def test_tensorrt_is_preferred_when_present(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT()
    monkeypatch.setattr(detector_module, "_tensorrt_module", lambda: fake)
    d = Detector(artifact, device=1, batch_size=4)
    assert d.backend.name == "tensorrt" and fake.calls == [(artifact, "fake", 1, 4, True)]
    Detector(artifact, batch_size=4, gpu_preprocessing=False)
    assert fake.calls[-1] == (artifact, "fake", 0, 4, False)
    assert Detector(artifact, backend="onnxruntime").backend.name.startswith("onnxruntime")
    assert Detector(artifact, precision="fp32").backend.name.startswith("onnxruntime")


def test_auto_falls_back_when_tensorrt_fails(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(detector_module, "_tensorrt_module", lambda: FakeTensorRT(fail=True))
    with caplog.at_level(logging.WARNING, logger="i2p"):
        assert Detector(artifact).backend.name.startswith("onnxruntime")
    assert "TensorRT backend failed (no engine for this GPU); falling back" in caplog.text
    with pytest.raises(RuntimeError, match="no engine for this GPU"):
        Detector(artifact, backend="tensorrt")


def test_tensorrt_backend_without_tensorrt(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detector_module, "_tensorrt_module", lambda: None)
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU with the tensorrt and pycuda"):
        Detector(artifact, backend="tensorrt")


def test_gpu_preprocessing_hook_gets_decoded_images(
    artifact: Path, det: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that accepts images receives uint8 HWC images at their own size with each one's resize
    plan (computed once, while decoding), bad inputs excluded."""
    seen: list[list[tuple]] = []

    def infer_images(imgs: list[np.ndarray], plans: list[ResizePlan]) -> np.ndarray:
        seen.append([(im.shape, im.dtype) for im in imgs])
        assert plans == [resize_plan(im.shape[1], im.shape[0], det.spec) for im in imgs]
        return det.backend.infer(np.stack([preprocess(im, det.spec) for im in imgs]))  # "on the device"

    gpu = stand_in("gpu-stand-in", "fp32", det.backend.infer, infer_images=infer_images, accepts_images=True)
    monkeypatch.setattr(Detector, "_open_backend", lambda self, *a: gpu)
    hooked = Detector(artifact, batch_size=2)
    imgs = images(3)
    sliver = np.zeros((1, 100_000, 3), np.uint8)  # center-cropped to 16:1 on the GPU path too
    results = hooked.predict([imgs[0], b"junk", imgs[1], sliver, imgs[2]])
    expected = [r.probability for r in det.predict([*imgs, sliver])]
    assert [r.probability for r in results] == [expected[0], None, expected[1], expected[3], expected[2]]
    assert seen == [  # batches of 2 inputs, one bad in the first
        [(imgs[0].shape, np.uint8)],
        [(imgs[1].shape, np.uint8), ((1, 16, 3), np.uint8)],
        [(imgs[2].shape, np.uint8)],
    ]
    batch = np.stack([preprocess(im, det.spec) for im in imgs])
    np.testing.assert_array_equal(hooked.predict_batch(batch), det.predict_batch(batch))  # floats: infer()


def test_non_finite_network_output_is_an_error_row(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan = stand_in("nan", "fp16", lambda x: np.full(len(x), np.nan, np.float32))
    monkeypatch.setattr(Detector, "_open_backend", lambda self, *a: nan)
    [r] = Detector(artifact).predict(images(1))
    assert not r.ok and "non-finite" in r.error and r.probability is None


def test_image_error_is_a_value_error(det: Detector) -> None:
    """Callers catching ValueError around preprocess keep working."""
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ImageError, match="<3 bytes>: not a readable image"):
        preprocess(b"abc", det.spec)


def test_an_int8_verdict_does_not_depend_on_the_other_images_of_the_batch(tmp_path: Path) -> None:
    """The CPU default INT8 model: an image's probability is the same alone, in any order, next to any image."""
    artifact = make_artifact(tmp_path / "q.i2p", int8=True)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(4)]
    images += [np.zeros((32, 32, 3), np.uint8), np.full((64, 20, 3), 255, np.uint8)]  # extreme batch-mates
    with Detector(artifact, backend="onnxruntime", batch_size=8) as det:
        assert det.backend.precision == "int8"
        alone = [det.predict(img)[0].probability for img in images]
        together = [p.probability for p in det.predict(images)]
        reversed_ = [p.probability for p in det.predict(images[::-1])][::-1]
    assert together == alone and reversed_ == alone
