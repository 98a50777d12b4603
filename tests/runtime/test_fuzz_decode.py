"""Bounded fuzzing of decode + preprocess: on any bytes, the only exception allowed out is ImageError.

A few seconds in CI; ``benchmarks/fuzz_decode.py`` runs the same properties for longer.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from i2p.runtime.preprocess import ImageError, PreprocessSpec, preprocess
from tests.support.corpus import fuzz_seeds, mutate

# Pillow warns about corrupt EXIF blocks; the property is about exceptions, not warnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# Small limits keep each example fast; the properties do not depend on them.
SPEC = PreprocessSpec(size=32, max_pixels=4_000_000)
SEEDS = fuzz_seeds()


def check(data: bytes | np.ndarray) -> None:
    try:
        x = preprocess(data, SPEC)
    except ImageError:
        return
    assert x.shape == (3, SPEC.size, SPEC.size) and x.dtype == np.float32
    assert np.isfinite(x).all()


FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
MUTATIONS = settings(FUZZ, max_examples=3000)  # cheap examples; enough to hit the GIF truncation bug


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)).map(SEEDS.get).map(lambda b: b[:16]) | st.binary(max_size=64))
def test_format_magic_with_garbage(data: bytes) -> None:
    check(data + bytes(range(256)))


@pytest.mark.slow
@MUTATIONS
@given(st.sampled_from(sorted(SEEDS)), st.integers(0, 2**32 - 1))
def test_mutated_valid_images(name: str, seed: int) -> None:
    """Hypothesis picks the file and the seed of a uniform byte-level mutator (its own integer draws
    favour small positions, which misses truncations in a GIF's second frame)."""
    check(mutate(SEEDS[name], np.random.default_rng(seed)))


@FUZZ
@given(
    hnp.arrays(
        st.sampled_from(["u1", "u2", "i4", "i8", "f2", "f4", "f8", "?", "c8", "O", "U1"]).map(np.dtype),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
        elements=None,
    )
)
@pytest.mark.slow
def test_arrays_of_any_dtype_and_shape(arr: np.ndarray) -> None:
    check(arr)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_decode(name: str) -> None:
    """The unmutated seeds are valid, so the mutations start from real structure."""
    assert preprocess(SEEDS[name], SPEC).shape == (3, 32, 32)
