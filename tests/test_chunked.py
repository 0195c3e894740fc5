"""The chunked backend (and the reference run as a backend through the ops) against the
float64 autograd reference over every mode, odd shape and chunk size."""
import pytest
import torch

from _cases import (MODES, SHAPES, assert_low_precision_ok, assert_matches_reference,
                    finite_difference_ok)

BACKENDS = ["chunked", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_float64_every_mode_and_shape(backend, shape, mode):
    assert_matches_reference(backend, shape, MODES[mode])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("mode", ["arcface", "smoothing", "sub_centers", "linear_ce"])
def test_chunk_sizes(chunk_size, mode):
    # 1, mid, and larger than C (C = 129 is not a multiple of 7 or 64)
    assert_matches_reference("chunked", (64, 129, 33), MODES[mode], chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_float32(backend, mode):
    assert_matches_reference(backend, (33, 70, 24), MODES[mode], dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["arcface", "cosface", "smoothing", "linear_ce"])
def test_half_precision(dtype, mode):
    assert_low_precision_ok("chunked", (33, 70, 24), MODES[mode], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    assert finite_difference_ok(backend)
