"""--perturb specs are parsed, bounded and range-checked before any conversion can overflow; every error is
a ValueError naming the spec (``jpeg:inf`` was an OverflowError traceback, ``jpeg:nan`` a message without
the spec; chains and sweeps were unbounded)."""

from __future__ import annotations

import pytest

from i2p.evaluation.perturb import MAX_CHAIN, MAX_CONDITIONS, parse_condition, parse_sweep, parse_sweeps

BAD = [
    "jpeg:inf", "jpeg:-inf", "jpeg:nan", "jpeg:NaN", "jpeg:1e309", "jpeg:1e2", "jpeg:0x5f", "jpeg:95.0.1",
    "jpeg:", "jpeg: ", "jpeg:95,", "jpeg:,95", "jpeg:95,,75", "jpeg:٩٥", "jpeg:９５", "jpeg:1_00", "jpeg:+95",
    "jpeg:-5", "jpeg:0", "jpeg:101", "jpeg:75.5", "jpeg:" + "9" * 400, "resize:inf", "resize:nan",
    "resize:0", "resize:1.5", "resize:-0.5", "resize:1e-3", "blur:inf", "blur:-1", "blur:20.5", "blur:nan",
    "blur:1e400", "webp:80", ":95", "jpeg", "social:", "social:3", "resize:0.5+", "+jpeg:90",
    "resize:0.5+jpeg:inf", "resize:0.5++jpeg:90", "jpeg:95\x00", "jpeg:95,75,nan",
]  # fmt: skip


@pytest.mark.parametrize("spec", BAD)
def test_bad_specs_are_value_errors_naming_the_spec(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_sweeps([spec])
    assert type(info.value) is ValueError
    assert str(info.value).startswith(f"--perturb {spec.strip()[:60]!r}"[:-1])


def test_chain_length_is_bounded() -> None:
    ok = "+".join(["blur:1"] * MAX_CHAIN)
    assert len(parse_condition(ok).steps) == MAX_CHAIN
    with pytest.raises(ValueError, match=f"at most {MAX_CHAIN} steps"):
        parse_condition(ok + "+blur:1")
    with pytest.raises(ValueError, match="characters"):
        parse_condition("+".join(["jpeg:90"] * 10_000))


def test_number_of_conditions_is_bounded() -> None:
    values = ",".join(str(q) for q in range(1, MAX_CONDITIONS + 1))
    assert len(parse_sweep(f"jpeg:{values}")) == MAX_CONDITIONS
    with pytest.raises(ValueError, match=f"at most {MAX_CONDITIONS} values"):
        parse_sweep(f"jpeg:{values},{MAX_CONDITIONS + 1}")
    with pytest.raises(ValueError, match="characters"):
        parse_sweep("jpeg:" + ",".join(["90"] * 10_000))
    many = [f"jpeg:{q}" for q in range(1, MAX_CONDITIONS + 1)]  # + clean: one over
    with pytest.raises(ValueError, match=f"at most {MAX_CONDITIONS}"):
        parse_sweeps(many)
    assert len(parse_sweeps(many[:-1])) == MAX_CONDITIONS


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("jpeg:95,75,50", ["jpeg:95", "jpeg:75", "jpeg:50"]),
        (" JPEG : 95 ", ["jpeg:95"]),
        ("jpeg:1,100", ["jpeg:1", "jpeg:100"]),
        ("resize:.5,1,0.25", ["resize:0.5", "resize:1", "resize:0.25"]),
        ("blur:0,20", ["blur:0", "blur:20"]),
        ("resize:0.5+jpeg:90", ["resize:0.5+jpeg:90"]),
        ("social", ["social"]),
        ("", ["clean"]),
        ("clean", ["clean"]),
    ],
)
def test_good_specs(spec: str, names: list[str]) -> None:
    assert [c.name for c in parse_sweep(spec)] == names
