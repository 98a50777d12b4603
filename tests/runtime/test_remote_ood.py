"""RemoteDetector and an ensemble with the OOD output: ood/uncertain reach Prediction, and everything the server
sends about them is checked like the verdict (hostile KServe v2 HTTP servers, as in test_remote_hostile)."""

from __future__ import annotations

import csv
import json
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.http", reason="the client needs tritonclient (the [serve] extra)")

from i2p.runtime.detect_cli import detect  # noqa: E402
from i2p.runtime.remote import RemoteDetector, ServerError  # noqa: E402
from i2p.runtime.serving import NON_FINITE, ood_verdicts, verdicts  # noqa: E402
from tests.runtime import test_remote_hostile as hostile  # noqa: E402

GOOD_CONFIG, send = hostile.GOOD_CONFIG, hostile.send
server = hostile.server  # the fixture: a fake server on 127.0.0.1

BLOBS = [b"image one", b"image two", b"image three"]
OOD_CONFIG = {
    **GOOD_CONFIG,
    "output": [{"name": n} for n in ("probability", "label", "error", "ood", "uncertain")],
    "parameters": {**GOOD_CONFIG["parameters"], "ood_threshold": {"string_value": "1.5"}},
}


def body(
    probabilities: list[Any],
    labels: list[str],
    errors: list[str],
    ood: list[Any] | None,
    uncertain: list[Any] | None,
    flag_type: str = "BOOL",
) -> bytes:
    n = len(probabilities)
    outputs = [
        {"name": "probability", "datatype": "FP32", "shape": [n, 1], "data": probabilities},
        {"name": "label", "datatype": "BYTES", "shape": [n, 1], "data": labels},
        {"name": "error", "datatype": "BYTES", "shape": [n, 1], "data": errors},
    ]
    if ood is not None:
        outputs.append({"name": "ood", "datatype": "FP32", "shape": [len(ood), 1], "data": ood})
    if uncertain is not None:
        outputs.append(
            {"name": "uncertain", "datatype": flag_type, "shape": [len(uncertain), 1], "data": uncertain}
        )
    return json.dumps({"outputs": outputs}).encode()


def sane(n: int) -> bytes:
    return body([0.75] * n, ["fake"] * n, [""] * n, [0.5, 2.0, 1.5][:n], [False, True, False][:n])


def test_ood_and_uncertain_reach_the_predictions(server) -> None:
    url, behaviour = server
    behaviour.config = OOD_CONFIG
    behaviour.infer = lambda h, n: send(h, sane(n))
    with RemoteDetector(url, timeout=5) as remote:
        rows = remote.predict(BLOBS)
        assert remote.ood_threshold == 1.5
    assert [(p.label, p.ood, p.uncertain) for p in rows] == [
        ("fake", 0.5, False),
        ("fake", 2.0, True),
        ("fake", 1.5, False),  # not above the threshold
    ]


def test_an_ensemble_without_the_ood_output_gives_none(server) -> None:
    url, behaviour = server
    for params in (
        GOOD_CONFIG["parameters"],
        {**GOOD_CONFIG["parameters"], "ood_threshold": {"string_value": "absent"}},
    ):
        behaviour.config = {**GOOD_CONFIG, "parameters": params}
        with RemoteDetector(url, timeout=5) as remote:
            assert remote.ood_threshold is None
            assert all(p.ok and p.ood is None and p.uncertain is None for p in remote.predict(BLOBS))


def with_(outputs: tuple[str, ...], threshold: str | None) -> dict[str, Any]:
    params = dict(GOOD_CONFIG["parameters"])
    if threshold is not None:
        params["ood_threshold"] = {"string_value": threshold}
    return {**GOOD_CONFIG, "output": [{"name": n} for n in outputs], "parameters": params}


VERDICT = ("probability", "label", "error")
CONFIGS = [
    (with_((*VERDICT, "ood", "uncertain"), None), "without an ood_threshold"),
    (with_((*VERDICT, "ood", "uncertain"), "absent"), "without an ood_threshold"),
    (with_((*VERDICT, "uncertain"), None), "without an ood_threshold"),
    (with_(VERDICT, "1.5"), "without the outputs"),
    (with_((*VERDICT, "ood"), "1.5"), "without the outputs"),
    *((with_((*VERDICT, "ood", "uncertain"), t), "not a finite number >= 0") for t in
      ("nan", "inf", "-inf", "-0.5", "abc", "", "1e400", "1e31")),
]  # fmt: skip


@pytest.mark.parametrize(("config", "message"), CONFIGS, ids=range(len(CONFIGS)))
def test_ood_settings_outside_the_contract_are_refused(server, config: Any, message: str) -> None:
    url, behaviour = server
    behaviour.config = config
    with pytest.raises(ServerError, match=message):
        RemoteDetector(url, timeout=5)


VERDICTS = [  # the first image's answer is wrong; the other two are fine
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [float("nan"), 0.5, 2.0], [False, False, True], "invalid"),
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [float("inf"), 0.5, 2.0], [True, False, True], "invalid"),
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [-0.25, 0.5, 2.0], [False, False, True], "invalid"),
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [1e31, 0.5, 2.0], [True, False, True], "invalid"),
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [3.0, 0.5, 2.0], [False, False, True], "uncertain False"),
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [0.1, 0.5, 2.0], [True, False, True], "uncertain True"),
    ([0.9, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], [1.5, 0.5, 2.0], [True, False, True], "uncertain True"),
    ([float("nan"), 0.2, 0.9], ["", "real", "fake"], ["bad file", "", ""], [0.7, 0.5, 2.0], [False, False, True],
     "inconsistent"),
    ([float("nan"), 0.2, 0.9], ["", "real", "fake"], ["bad file", "", ""], [float("nan"), 0.5, 2.0],
     [True, False, True], "inconsistent"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("p", "labels", "errors", "ood", "flags", "message"), VERDICTS, ids=range(len(VERDICTS))
)
def test_ood_verdicts_outside_the_contract_are_error_rows(
    server, p, labels, errors, ood, flags, message
) -> None:
    url, behaviour = server
    behaviour.config = OOD_CONFIG
    behaviour.infer = lambda h, n: send(h, body(p, labels, errors, ood, flags))
    with RemoteDetector(url, timeout=5) as remote:
        first, *rest = remote.predict(BLOBS)
    assert first.probability is None and first.ood is None and first.uncertain is None
    assert message in first.error, first.error
    assert [(r.label, r.ood, r.uncertain) for r in rest] == [("real", 0.5, False), ("fake", 2.0, True)]


def test_a_clean_error_row_passes_its_reason_through(server) -> None:
    url, behaviour = server
    behaviour.config = OOD_CONFIG
    nan = float("nan")
    behaviour.infer = lambda h, n: send(
        h, body([nan] * n, [""] * n, ["cannot decode"] * n, [nan] * n, [False] * n)
    )
    with RemoteDetector(url, timeout=5) as remote:
        rows = remote.predict(BLOBS)
    assert all(r.error.endswith(": cannot decode") and r.ood is None for r in rows), rows


ANSWERS = [
    body([0.75] * 3, ["fake"] * 3, [""] * 3, None, None),  # the OOD outputs left out
    body([0.75] * 3, ["fake"] * 3, [""] * 3, [0.5] * 3, None),
    body([0.75] * 3, ["fake"] * 3, [""] * 3, None, [False] * 3),
    body([0.75] * 3, ["fake"] * 3, [""] * 3, [0.5] * 2, [False] * 2),  # two answers for three images
    body([0.75] * 3, ["fake"] * 3, [""] * 3, ["a", "b", "c"], [False] * 3),
    body([0.75] * 3, ["fake"] * 3, [""] * 3, [0.5] * 3, [0, 0, 0], flag_type="INT32"),
    body([0.75] * 3, ["fake"] * 3, [""] * 3, [0.5] * 3, ["false"] * 3, flag_type="BYTES"),
]


@pytest.mark.parametrize("answer", ANSWERS, ids=range(len(ANSWERS)))
def test_malformed_ood_answers_are_error_rows(server, answer: bytes) -> None:
    url, behaviour = server
    behaviour.config = OOD_CONFIG
    behaviour.infer = lambda h, n: send(h, answer)
    with RemoteDetector(url, timeout=5) as remote:
        rows = remote.predict(BLOBS)
    assert all(r.probability is None and r.ood is None and "server error" in r.error for r in rows), rows


def test_relabelling_by_a_local_threshold_keeps_the_server_s_ood(server) -> None:
    url, behaviour = server
    behaviour.config = OOD_CONFIG
    behaviour.infer = lambda h, n: send(h, sane(n))
    with RemoteDetector(url, timeout=5, threshold=0.9) as remote:
        rows = remote.predict(BLOBS)
    assert [(r.label, r.ood, r.uncertain) for r in rows] == [
        ("real", 0.5, False),
        ("real", 2.0, True),
        ("real", 1.5, False),
    ]


def test_detect_with_server_writes_the_ood_columns(server, tmp_path) -> None:
    url, behaviour = server
    behaviour.config = OOD_CONFIG
    behaviour.infer = lambda h, n: send(h, sane(n))
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(
        detect, [str(tmp_path), "--server", url, "--csv", str(out), "--batch-size", "3"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(r["ood"], r["uncertain"]) for r in rows] == [("0.5", "False"), ("2.0", "True"), ("1.5", "False")]


# -- the server side: what the postprocess model computes ------------------------------------------------


def test_ood_verdicts_compare_in_float64_and_clear_error_rows() -> None:
    ood = np.array([0.5, 2.0, np.float32(1.5), 3.0], np.float32)
    scores, flags = ood_verdicts(ood, ["", "", "", "bad file"], threshold=1.5000000001)
    assert flags.dtype == bool and flags.tolist() == [False, True, False, False]
    assert scores[:3].tolist() == [0.5, 2.0, 1.5] and np.isnan(scores[3])
    logits = np.zeros(3, np.float32)
    _, labels, reasons = verdicts(logits, ["", "", ""], 0.5, np.array([1.0, np.nan, np.inf], np.float32))
    assert reasons == ["", NON_FINITE, NON_FINITE] and labels == ["fake", "", ""]
