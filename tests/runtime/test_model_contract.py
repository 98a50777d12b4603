"""Every model file of an artifact is checked before a backend loads it (``i2p.runtime.model_check``).

Each hostile graph is written into a real artifact with the manifest's sha256 updated to match, so only
the new checks can refuse it: the I/O contract (input name, dtype, rank, fixed dims; logit name, dtype,
one value per image), the graph's bounds (node and initializer caps, no control flow or subgraphs, an op
allowlist, a capped load time), and no external data. A network that fails while running gives error rows
for the images of that call, never a traceback.
"""

from __future__ import annotations

import glob
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from i2p.base.files import sha256_file
from i2p.runtime import ArtifactError, Detector
from i2p.runtime.backends import InferenceError, checked_logits
from i2p.runtime.backends.onnxruntime import OnnxRuntimeBackend
from i2p.runtime.bench_cli import bench
from i2p.runtime.detect_cli import detect
from i2p.runtime.model_check import (
    ALLOWED_OPS,
    MAX_INITIALIZERS,
    MAX_NODES,
    UnsupportedGraphError,
    check_loadable,
)
from i2p.runtime.onnx_graph import OnnxGraph, read_graph
from tests.support.fake_artifact import build_model, make_artifact

SIZE = 32
KINDS = {  # manifest entry (path, precision, format) of each model file kind
    "fp32": ("model.onnx", "fp32", "onnx"),
    "fp16": ("model.fp16.onnx", "fp16", "onnx"),
    "cpu": ("model.cpu.onnx", "fp32", "onnx-ort-fused"),
    "int8": ("model.int8.onnx", "int8", "onnx-ort-fused"),
}


def artifact(tmp_path: Path, name: str = "a.i2p") -> Path:
    """A real artifact holding all four kinds of model file (model.cpu.onnx: a copy of model.onnx)."""
    root = make_artifact(tmp_path / name, size=SIZE, int8=True)
    (root / "model.cpu.onnx").write_bytes((root / "model.onnx").read_bytes())
    data = json.loads((root / "manifest.json").read_text())
    data["models"].append({"path": "model.cpu.onnx", "precision": "fp32", "format": "onnx-ort-fused"})
    data["files"]["model.cpu.onnx"] = sha256_file(root / "model.cpu.onnx")
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def plant(root: Path, kind: str, model: onnx.ModelProto, external: bool = False) -> Path:
    """Write ``model`` as the ``kind`` file of ``root`` and update the manifest's sha256 to match."""
    rel = KINDS[kind][0]
    if external:
        onnx.save(model, root / rel, save_as_external_data=True, location="weights.bin", size_threshold=0)
    else:
        (root / rel).write_bytes(model.SerializeToString())
    data = json.loads((root / "manifest.json").read_text())
    data["files"][rel] = sha256_file(root / rel)
    (root / "manifest.json").write_text(json.dumps(data))
    return root / rel


def graph(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto] = (),
    image: tuple[int, list] = (TensorProto.FLOAT, ["batch", 3, SIZE, SIZE]),
    logit: tuple[int, list | None] = (TensorProto.FLOAT, ["batch"]),
    **model_kw: object,
) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("image", image[0], image[1])],
        [helper.make_tensor_value_info("logit", logit[0], logit[1])],
        list(inits),
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], **model_kw)
    model.ir_version = 8
    return model


def mean_logit(image: str = "image", out: str = "logit") -> list[onnx.NodeProto]:
    """logit[n] = mean of image n: a valid network for [batch, 3, S, S] -> [batch]."""
    return [helper.make_node("ReduceMean", [image], [out], axes=[1, 2, 3], keepdims=0)]


# -- the I/O contract ---------------------------------------------------------------------------------------


def _float16_input() -> onnx.ModelProto:
    cast = helper.make_node("Cast", ["image"], ["image32"], to=TensorProto.FLOAT)
    return graph([cast, *mean_logit("image32")], image=(TensorProto.FLOAT16, ["batch", 3, SIZE, SIZE]))


def _two_columns() -> onnx.ModelProto:
    """logit [batch, 2]: loaded before, and predict read 2N values for N images (wrong scores, no error)."""
    model = build_model(SIZE)
    fc_w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc_w"))
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "fc_w"))
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "fc_b"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.concatenate([fc_w, -fc_w], axis=1), "fc_w"),
            numpy_helper.from_array(np.array([-0.5, 0.5], np.float32), "fc_b"),
        ]
    )
    for node in model.graph.node:  # the logit is the Gemm's [batch, 2] output itself
        if node.op_type == "Gemm":
            node.output[0] = "logit"
        if node.op_type in ("Sigmoid",):
            node.input[0] = "logit"
    model.graph.node.remove(
        next(n for n in model.graph.node if n.output[0] == "logit" and n.op_type == "Squeeze")
    )
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["batch", 2]))
    model.graph.output[1].CopyFrom(
        helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 2])
    )
    model.graph.node.remove(next(n for n in model.graph.node if n.output[0] == "probability"))
    next(n for n in model.graph.node if n.op_type == "Sigmoid").output[0] = "probability"
    return model


def _whole_batch(keepdims: int, dims: list) -> onnx.ModelProto:
    """One value for the whole batch: [] or [1]."""
    node = helper.make_node("ReduceMean", ["image"], ["logit"], keepdims=keepdims)
    if keepdims:
        flat = helper.make_node("Reshape", ["image", "minus_one"], ["flat"])
        node = [flat, helper.make_node("ReduceMean", ["flat"], ["logit"], axes=[0], keepdims=1)]
        return graph(node, [numpy_helper.from_array(np.array([-1], np.int64), "minus_one")], logit=(1, dims))
    return graph([node], logit=(TensorProto.FLOAT, dims))


def _renamed_input() -> onnx.ModelProto:
    model = graph(mean_logit("pixels"))
    model.graph.input[0].name = "pixels"
    return model


def _second_input() -> onnx.ModelProto:
    model = graph([*mean_logit(out="m"), helper.make_node("Add", ["m", "extra"], ["logit"])])
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch"]))
    return model


def _no_logit() -> onnx.ModelProto:
    model = graph(mean_logit(out="score"))
    model.graph.output[0].name = "score"
    return model


CONTRACT_VARIANTS = {
    "input float16, the runtime feeds float32": (_float16_input, r"input 'image' dtype is float16"),
    "input rank 3": (
        lambda: graph(mean_logit(), image=(TensorProto.FLOAT, ["batch", 3, SIZE])),
        r"input 'image' shape: the network takes 'image' as \['batch', 3, 32\]",
    ),
    "input rank 5": (
        lambda: graph(mean_logit(), image=(TensorProto.FLOAT, ["batch", 1, 3, SIZE, SIZE])),
        r"input 'image' shape:",
    ),
    "input fixed dim 16 where the manifest says 32": (
        lambda: graph(mean_logit(), image=(TensorProto.FLOAT, ["batch", 3, 16, SIZE])),
        r"takes 'image' as \['batch', 3, 16, 32\], but manifest.json says \['batch', 3, 32, 32\]",
    ),
    "input with a named dim where the manifest fixes 32": (
        lambda: graph(mean_logit(), image=(TensorProto.FLOAT, ["batch", 3, "h", "w"])),
        r"takes 'image' as \['batch', 3, 'h', 'w'\]",
    ),
    "input batch fixed at 1": (
        lambda: graph(mean_logit(), image=(TensorProto.FLOAT, [1, 3, SIZE, SIZE])),
        r"takes 'image' as \[1, 3, 32, 32\]",
    ),
    "output [batch, 2]": (_two_columns, r"output 'logit' shape is \['batch', 2\]"),
    "output scalar for the whole batch": (
        lambda: _whole_batch(0, []),
        r"output 'logit' shape is \[\]; the runtime needs one logit per image",
    ),
    "output [1] for the whole batch": (lambda: _whole_batch(1, [1]), r"output 'logit' shape is \[1\]"),
    "output [batch, 3]": (
        lambda: graph(mean_logit(), logit=(TensorProto.FLOAT, ["batch", 3])),
        r"\['batch', 3\]",
    ),
    "output on another axis than the batch": (
        lambda: graph(mean_logit(), logit=(TensorProto.FLOAT, ["n"])),
        r"output 'logit' shape is \['n'\]",
    ),
    "output shape undeclared": (
        lambda: graph(mean_logit(), logit=(TensorProto.FLOAT, None)),
        r"output 'logit' shape is undeclared",
    ),
    "int64 output": (
        lambda: graph(
            [*mean_logit(out="m"), helper.make_node("Cast", ["m"], ["logit"], to=TensorProto.INT64)],
            logit=(TensorProto.INT64, ["batch"]),
        ),
        r"output 'logit' dtype is int64; the manifest says float32",
    ),
    "float16 output": (
        lambda: graph(
            [*mean_logit(out="m"), helper.make_node("Cast", ["m"], ["logit"], to=TensorProto.FLOAT16)],
            logit=(TensorProto.FLOAT16, ["batch"]),
        ),
        r"output 'logit' dtype is float16",
    ),
    "input renamed": (_renamed_input, r"the network has no input 'image' \(inputs: \['pixels'\]\)"),
    "a second input to feed": (
        _second_input,
        r"the network takes \['image', 'extra'\]; the runtime feeds one",
    ),
    "no logit output": (_no_logit, r"the network has no output 'logit' \(outputs: \['score'\]\)"),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("variant", list(CONTRACT_VARIANTS))
def test_each_model_file_must_keep_the_io_contract(tmp_path: Path, variant: str, kind: str) -> None:
    """Refused at load, whichever file holds it (also one the chosen backend would not load)."""
    build, message = CONTRACT_VARIANTS[variant]
    root = artifact(tmp_path)
    path = plant(root, kind, build())
    with pytest.raises(ArtifactError, match=message) as info:
        Detector(root, precision="fp32" if kind != "fp32" else "int8")
    assert str(info.value).startswith(str(path)) and "re-export" in str(info.value)


def test_the_contract_accepts_batch_by_one_logits_and_real_exports(tmp_path: Path) -> None:
    root = make_artifact(tmp_path / "a.i2p", size=SIZE)  # FP32 and FP16: on the CPU, model.onnx runs
    model = graph(mean_logit(out="m"), logit=(TensorProto.FLOAT, ["batch", 1]))
    model.graph.node.append(helper.make_node("Unsqueeze", ["m", "one"], ["logit"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    model.graph.node[0].output[0] = "m"
    plant(root, "fp32", model)
    with Detector(root, precision="fp32") as det:
        assert det.backend.model_path.name == "model.onnx"
        x = np.full((3, 3, SIZE, SIZE), 0.25, np.float32)
        np.testing.assert_allclose(det.predict_batch(x), 1 / (1 + np.exp(-0.25)), rtol=1e-6)
    # the fixtures exported by earlier versions: FP32, FP16, fused CPU (contrib ops) and INT8
    fixtures = sorted(glob.glob(str(Path(__file__).parents[1] / "fixtures" / "v*" / "artifact" / "*.onnx")))
    assert {Path(f).name for f in fixtures} >= {
        "model.onnx",
        "model.fp16.onnx",
        "model.cpu.onnx",
        "model.int8.onnx",
    }
    for f in fixtures:
        g = check_loadable(f)
        assert 0 < len(g.ops) < MAX_NODES and all(op in ALLOWED_OPS[d] for d, op in g.ops)


# -- bounded graphs -----------------------------------------------------------------------------------------


def _loop(trips: int = 10**12) -> onnx.ModelProto:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    inits = [
        numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    loop = helper.make_node("Loop", ["trips", "cond", "m"], ["looped"], body=body)
    return graph([*mean_logit(out="m"), loop, helper.make_node("Identity", ["looped"], ["logit"])], inits)


def _if() -> onnx.ModelProto:
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Identity", ["m"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["batch"])],
        )

    inits = [numpy_helper.from_array(np.array(True), "cond")]
    node = helper.make_node("If", ["cond"], ["logit"], then_branch=branch("then"), else_branch=branch("else"))
    return graph([*mean_logit(out="m"), node], inits)


def _scan() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "body",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    node = helper.make_node("Scan", ["m"], ["logit"], body=body, num_scan_inputs=1)
    return graph([*mean_logit(out="m"), node])


def _many_nodes(n: int) -> onnx.ModelProto:
    nodes = mean_logit(out="t0") + [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    nodes[-1].output[0] = "logit"
    return graph(nodes)


def _many_initializers(n: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([i], np.float32), f"c{i}") for i in range(n)]
    return graph(mean_logit(), inits)


def _function() -> onnx.ModelProto:
    fn = helper.make_function(
        "local", "Mean3", ["x"], ["y"], mean_logit("x", "y"), [helper.make_opsetid("", 17)]
    )
    model = graph([helper.make_node("Mean3", ["image"], ["logit"], domain="local")], functions=[fn])
    model.opset_import.append(helper.make_opsetid("local", 1))
    return model


BOUNDS_VARIANTS = {
    "Loop of 10^12 steps": (_loop, r"control flow or subgraphs \(Loop\)"),
    "Loop of 3 steps": (lambda: _loop(3), r"control flow or subgraphs \(Loop\)"),
    "If": (_if, r"control flow or subgraphs \(If\)"),
    "Scan": (_scan, r"control flow or subgraphs \(Scan\)"),
    "too many nodes": (lambda: _many_nodes(MAX_NODES), f"more than {MAX_NODES:,} nodes"),
    "too many initializers": (
        lambda: _many_initializers(MAX_INITIALIZERS + 1),
        f"more than {MAX_INITIALIZERS:,} init",
    ),
    "100,000 initializers": (lambda: _many_initializers(100_000), "more than .* initializers"),
    "a model-local function": (_function, "model-local functions"),
}


@pytest.mark.parametrize("variant", list(BOUNDS_VARIANTS))
def test_hostile_graphs_are_refused_quickly_before_they_load(tmp_path: Path, variant: str) -> None:
    build, message = BOUNDS_VARIANTS[variant]
    root = artifact(tmp_path)
    path = plant(root, "fp32", build())
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match=message) as info:
        Detector(root)
    assert time.perf_counter() - start < 3.0  # ONNX Runtime took 77 s on the 100,000 initializers
    assert str(info.value).startswith(
        f"{path}: the network has"
    ) and "refusing it before it is loaded" in str(info.value)


def test_graph_caps_are_exact() -> None:
    """The reader stops at the cap; a graph at the cap is read whole."""
    at_cap = _many_nodes(MAX_NODES - 1)  # + the ReduceMean: MAX_NODES nodes
    g = _read(at_cap)
    assert g.over_limit is None and len(g.ops) == MAX_NODES
    assert _read(_many_nodes(MAX_NODES)).over_limit == "nodes"
    assert _read(_many_initializers(MAX_INITIALIZERS)).over_limit is None
    assert _read(_many_initializers(MAX_INITIALIZERS + 1)).over_limit == "initializers"


def _read(model: onnx.ModelProto) -> OnnxGraph:
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(model.SerializeToString())
        f.flush()
        return read_graph(f.name, MAX_NODES, MAX_INITIALIZERS)


@pytest.mark.parametrize(
    ("op", "domain"), [("RandomNormalLike", ""), ("StringNormalizer", ""), ("Attention", "com.example")]
)
def test_ops_outside_the_allowlist_are_refused_before_onnx_runtime(
    tmp_path: Path, op: str, domain: str
) -> None:
    root = make_artifact(tmp_path / "a.i2p", size=SIZE)  # model.onnx is the CPU model it loads
    node = helper.make_node(op, ["m"], ["noise"], domain=domain)
    model = graph([*mean_logit(out="m"), node, helper.make_node("Add", ["m", "noise"], ["logit"])])
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    path = plant(root, "fp32", model)
    with pytest.raises(UnsupportedGraphError, match=f"{path}: nodes with ops outside .*{op}"):
        Detector(root, precision="fp32")
    with pytest.raises(UnsupportedGraphError):
        OnnxRuntimeBackend(path)


def test_an_unreadable_or_truncated_file_with_a_matching_hash_is_refused(tmp_path: Path) -> None:
    root = artifact(tmp_path)
    data = build_model(SIZE).SerializeToString()
    for junk in (data[: len(data) // 2], b"\x0f" * 64, b"\x3a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        path = root / "model.onnx"
        path.write_bytes(junk)
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = sha256_file(path)
        (root / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=f"{path}: ONNX Runtime cannot load this model \\(not ONNX"):
            Detector(root, precision="int8")


def _load_releases_the_gil(path: Path) -> bool:
    """Whether another Python thread runs while ONNX Runtime loads ``path`` (1.32 yes, 1.23 no)."""
    ticks, done = [], threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    start = time.perf_counter()
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    end = time.perf_counter()
    done.set()
    thread.join()
    return sum(start < t < end for t in ticks) >= 5


def test_a_slow_load_is_refused_at_the_time_cap(tmp_path: Path) -> None:
    path = tmp_path / "slow.onnx"
    path.write_bytes(_many_initializers(4000).SerializeToString())  # ~0.2 s for ONNX Runtime to load
    if not _load_releases_the_gil(path):
        pytest.skip(f"onnxruntime {ort.__version__} holds the GIL while loading: the cap cannot interrupt it")
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match="took more than 1e-06 s to load this model; refusing it"):
        OnnxRuntimeBackend(path, load_seconds=1e-6)  # no load fits: a cap the machine's speed cannot beat
    assert time.perf_counter() - start < 0.15  # the caller is free at the cap, the load finishes aside
    assert OnnxRuntimeBackend(path).session is not None  # the default cap loads it


# -- external data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_external_data_is_refused_in_every_model_file_kind(tmp_path: Path, kind: str) -> None:
    """Weights in a side file the manifest does not hash: editing it changed a verdict before."""
    root = artifact(tmp_path)
    model = onnx.load(str(root / KINDS[kind][0]))
    path = plant(root, kind, model, external=True)
    assert (root / "weights.bin").is_file()
    with pytest.raises(ArtifactError, match=f"{path}: the network has tensors with external data"):
        Detector(root, precision="fp32" if kind != "fp32" else "int8")


def test_external_data_in_a_constant_node_is_refused(tmp_path: Path) -> None:
    root = artifact(tmp_path)
    value = numpy_helper.from_array(np.zeros(4, np.float32), "k")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    const = helper.make_node("Constant", [], ["k"], value=value)
    plant(root, "fp32", graph([const, *mean_logit()]))
    with pytest.raises(ArtifactError, match=r"tensors with external data \('k'\)"):
        Detector(root, precision="fp32")


# -- failures while running ---------------------------------------------------------------------------------


def _huge_allocation() -> onnx.ModelProto:
    """A shape from the input (not folded at load) times 10^5 x 10^5: petabytes, asked for at run time."""
    inits = [numpy_helper.from_array(np.array([100_000, 100_000, 1, 1], np.int64), "scale")]
    nodes = [
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Mul", ["shape", "scale"], ["huge"]),
        helper.make_node("ConstantOfShape", ["huge"], ["zeros"]),
        helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
        *mean_logit(out="m"),
        helper.make_node("Add", ["m", "total"], ["logit"]),
    ]
    return graph(nodes, inits)


def _one_value_declared_per_image() -> onnx.ModelProto:
    """Declares [batch] but computes [1]: only the check of what came back can catch it."""
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [
        helper.make_node("Reshape", ["image", "minus_one"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["logit"], axes=[0], keepdims=1),
    ]
    return graph(nodes, inits)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_huge_allocation, "ONNX Runtime failed on model.onnx"),
        (_one_value_declared_per_image, r"the network returned float32 \[1\] for 3 images"),
    ],
)
def test_a_network_failing_while_running_gives_error_rows(tmp_path: Path, build, message: str) -> None:
    root = make_artifact(tmp_path / "a.i2p", size=SIZE)  # model.onnx is the CPU model it loads
    plant(root, "fp32", build())
    images = [np.full((40, 40, 3), v, np.uint8) for v in (0, 128, 255)]
    with Detector(root, precision="fp32", batch_size=3) as det:
        results = det.predict([*images, b"not an image"])
        assert [r.ok for r in results] == [False] * 4
        assert all(re.search(message, r.error) for r in results[:3]), results
        assert "not an image" not in results[0].error and results[3].error != results[0].error
        with pytest.raises(InferenceError):
            det.predict_batch(np.zeros((3, 3, SIZE, SIZE), np.float32))
        # the backend stays usable: a later call fails the same way, it does not crash
        assert not any(r.ok for r in det.predict(images[:2]))


def test_detect_and_bench_report_a_failing_network_without_a_traceback(tmp_path: Path) -> None:
    root = make_artifact(tmp_path / "a.i2p", size=SIZE)  # model.onnx is the CPU model it loads
    plant(root, "fp32", _huge_allocation())
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "gray").save(img)
    runner = CliRunner()
    result = runner.invoke(detect, [str(img), "--model", str(root), "--precision", "fp32", "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "ONNX Runtime failed" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        bench, ["--model", str(root), "--precision", "fp32", "--batch-sizes", "2", "--iters", "1"]
    )
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "ONNX Runtime failed" in result.output and "Traceback" not in result.output


def test_checked_logits_accepts_one_per_image_only() -> None:
    np.testing.assert_array_equal(checked_logits(np.ones((3, 1), np.float16), 3), np.ones(3, np.float32))
    for bad in (np.ones(1), np.ones((3, 2)), np.ones(()), np.ones(3, np.int64), np.ones(4)):
        with pytest.raises(InferenceError, match="for 3 images; expected one logit per image"):
            checked_logits(bad, 3)
