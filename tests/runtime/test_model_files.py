"""The model-file catalogue is the one list that export, the manifest's validation and the Detector read:
a manifest entry no row describes (or a kind listed twice) is refused at load, and the Detector's choice
follows the rows' preference order on real ONNX Runtime sessions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from i2p.runtime import ArtifactError, Detector
from i2p.runtime import manifest as manifest_module
from i2p.runtime.model_files import (
    CATALOGUE,
    CPU,
    ENGINE_PRECISIONS,
    FP16,
    FP32,
    INT8,
    PRECISIONS,
    ModelFile,
    choose,
    images_per_call,
    kind_of,
)
from i2p.runtime.tensorrt import cache as engine_cache
from tests.support.fake_artifact import make_artifact


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("catalogue") / "a.i2p", int8=True)


@pytest.fixture
def artifact(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "a.i2p"
    shutil.copytree(pristine, root)
    return root


def edit_models(root: Path, edit) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data["models"])
    (root / "manifest.json").write_text(json.dumps(data))


def test_every_reader_takes_its_lists_from_the_catalogue() -> None:
    assert manifest_module.PRECISIONS == PRECISIONS == ("fp32", "fp16", "int8")
    assert engine_cache.PRECISIONS == ENGINE_PRECISIONS == ("fp16", "fp32")
    assert len({(k.precision, k.format) for k in CATALOGUE}) == len(CATALOGUE)  # a row is one kind
    for kind in (FP32, FP16, CPU, INT8):
        assert kind_of(kind.entry) is kind


def test_images_per_call_is_the_rows_limit() -> None:
    assert images_per_call("int8", 32) == 1 and images_per_call("fp32", 32) == 32
    assert images_per_call("fp16", 5) == 5


def test_preference_order_on_each_device() -> None:
    models = [FP32.entry, FP16.entry, CPU.entry, INT8.entry]
    assert choose(models, "cpu") == [INT8.entry, CPU.entry, FP32.entry]
    assert choose(models, "cpu", "fp32") == [CPU.entry, FP32.entry]
    assert choose(models, "gpu") == [FP16.entry, FP32.entry]
    assert choose(models, "gpu", "int8") == []
    with pytest.raises(ValueError, match="device"):
        choose(models, "tpu")


@pytest.mark.parametrize(
    ("precision", "format"),
    [("int8", "onnx"), ("fp16", "onnx-ort-fused"), ("fp32", "tensorrt-engine"), ("fp32", "onnx-fused")],
)
def test_a_model_entry_no_row_describes_is_refused(artifact: Path, precision: str, format: str) -> None:
    """Before the catalogue these loaded, and the file was silently never used."""

    def edit(models):
        models[0].update(precision=precision, format=format)

    edit_models(artifact, edit)
    with pytest.raises(ArtifactError, match=r"manifest.json: field 'models\[0\]': no kind of model file"):
        Detector(artifact)


@pytest.mark.parametrize("index", [0, 2])
def test_a_kind_listed_twice_is_refused(artifact: Path, index: int) -> None:
    """Two FP32 ONNX entries (or two INT8): which one would run was an accident of order."""

    def edit(models):
        models.append(dict(models[index]))

    edit_models(artifact, edit)
    with pytest.raises(ArtifactError, match="each kind is listed once"):
        Detector(artifact)


def test_the_detector_loads_what_the_catalogue_prefers(artifact: Path) -> None:
    with Detector(artifact, backend="onnxruntime") as det:
        assert det.backend.model_path.name == INT8.file and det.backend.precision == "int8"
    with Detector(artifact, backend="onnxruntime", precision="fp32") as det:
        assert det.backend.model_path.name == FP32.file
    with Detector(artifact, backend="onnxruntime", precision="fp16") as det:
        assert det.backend.model_path.name == FP16.file
    assert [m.path for m in Detector(artifact, backend="onnxruntime").manifest.choose("gpu")] == [
        FP16.file,
        FP32.file,
    ]
    assert ModelFile("x.onnx", "fp32") in choose([ModelFile("x.onnx", "fp32")], "cpu")
