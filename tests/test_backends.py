"""Every backend's loss and gradients against the float64 oracle, through the public
checker :mod:`arcface_kernels.testing`: the one grid of cases (margins, wrap modes,
target gradients, smoothing, ignore_index, reductions, sub-centers, odd shapes,
adversarial inputs), in float64 and float32 (and half precision where a backend computes
it here), with chunk sizes that leave a partial last chunk, linear cross-entropy, and
randomized cases. On a GPU the same grid runs on CUDA tensors (marked ``gpu``)."""
from __future__ import annotations

import functools

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.testing import (LINEAR_GRID, MARGIN_GRID, check_linear_cross_entropy,
                                     check_margin_loss, fuzz_margin_loss)

from _backends import cpu_backends, cuda_backends

CPU = cpu_backends()
CUDA = cuda_backends()

# Half precision on the CPU: the C++ kernel and chunked compute it (float32 math); the
# reference op computes in the input dtype (it is the oracle's form, not a half-precision
# kernel); the Triton interpreter's bfloat16 dot is not faithful, so only float16 there.
CPU_HALF = {"cpp": ["float16", "bfloat16"], "chunked": ["float16", "bfloat16"],
            "triton": ["float16"], "reference": []}

LINEAR_SUPPORTS = {"ignore_index": True, "reduction": True, "label_smoothing": True}


def loss_fn(backend: str, chunk_size=None):
    fn = functools.partial(ak.arcface_loss, backend=backend, chunk_size=chunk_size)
    fn.__name__ = f"arcface_loss[{backend}" + (f", chunk_size={chunk_size}]"
                                               if chunk_size else "]")
    return fn


def linear_fn(backend: str):
    fn = functools.partial(ak.arcface_loss, backend=backend, normalize=False, s=1.0,
                           m2=0.0)
    fn.__name__ = f"linear arcface_loss[{backend}]"
    return fn


@pytest.mark.parametrize("case", MARGIN_GRID, ids=[c.name for c in MARGIN_GRID])
@pytest.mark.parametrize("backend", CPU)
def test_margin_grid(backend, case):
    check_margin_loss(loss_fn(backend), cases=[case]).assert_ok()


_HALF_CASES = [c for c in MARGIN_GRID if c.name in (
    "arcface_s64", "cosface", "sphereface", "combined_m1", "easy", "smoothing",
    "reduction_none", "sub_centers", "one_class", "odd_sizes", "zero_rows", "huge_norms",
    "tiny_norms", "parallel_m1")]


@pytest.mark.parametrize("case", _HALF_CASES, ids=[c.name for c in _HALF_CASES])
@pytest.mark.parametrize("backend", [b for b in CPU if CPU_HALF.get(b)])
def test_margin_grid_half(backend, case):
    check_margin_loss(loss_fn(backend), cases=[case], dtypes=CPU_HALF[backend]).assert_ok()


# C = 70 and 129 in chunks of 8 (and 32): the last chunk is partial (70 = 8 * 8 + 6)
_CHUNK_CASES = [c for c in MARGIN_GRID if c.name in (
    "arcface_s64", "smoothing", "reduction_none", "sub_centers", "big_margin_fallback",
    "odd_sizes")]


@pytest.mark.parametrize("chunk_size", [8, 32])
@pytest.mark.parametrize("case", _CHUNK_CASES, ids=[c.name for c in _CHUNK_CASES])
@pytest.mark.parametrize("backend", [b for b in CPU if b != "reference"])
def test_margin_grid_partial_chunks(backend, case, chunk_size):
    rep = check_margin_loss(loss_fn(backend, chunk_size), cases=[case], gradcheck=False)
    rep.assert_ok()


@pytest.mark.parametrize("backend", CPU)
def test_linear_cross_entropy_grid(backend):
    rep = check_linear_cross_entropy(linear_fn(backend), supports=LINEAR_SUPPORTS)
    rep.assert_ok()
    # softcap and shift are not implemented: skipped, and said so
    skipped = {r.case for r in rep.results if r.status == "skip"}
    assert {"linear_softcap", "linear_shift"} <= skipped


@pytest.mark.parametrize("backend", [b for b in CPU if b != "triton"])
def test_randomized_cases(backend):
    """Randomized shapes, margins and adversarial inputs (seeded; hypothesis when it is
    installed). The interpreted triton backend is too slow for many draws here."""
    rep = fuzz_margin_loss(loss_fn(backend), examples=12, seed=sorted(CPU).index(backend),
                           dtypes=["float64", "float32"])
    rep.assert_ok()


# ----------------------------------------------------------------------- on a CUDA GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", MARGIN_GRID, ids=[c.name for c in MARGIN_GRID])
@pytest.mark.parametrize("backend", CUDA)
def test_margin_grid_cuda(backend, case):
    dtypes = ["float32", "float16", "bfloat16"] + (["float64"] if backend in (
        "reference", "chunked", "triton") else [])
    check_margin_loss(loss_fn(backend), cases=[case], dtypes=dtypes, devices=["cuda"],
                      gradcheck=False).assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [1, 8, 32])
@pytest.mark.parametrize("backend", [b for b in CUDA if b != "reference"])
def test_partial_chunks_cuda(backend, chunk_size):
    check_margin_loss(loss_fn(backend, chunk_size), cases=_CHUNK_CASES,
                      dtypes=["float32", "bfloat16"], devices=["cuda"],
                      gradcheck=False).assert_ok()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA)
def test_linear_cross_entropy_cuda(backend):
    check_linear_cross_entropy(linear_fn(backend), supports=LINEAR_SUPPORTS,
                               dtypes=["float32", "bfloat16"], devices=["cuda"],
                               gradcheck=False).assert_ok()


def test_every_cpu_backend_is_covered():
    assert {"reference", "chunked"} <= set(CPU)
    assert len(LINEAR_GRID) >= 8 and len(MARGIN_GRID) >= 30


def test_cpp_cuda_below_sm80_reported_and_skipped(monkeypatch):
    """cpp's CUDA kernels need compute capability 8.0: on an older device 'auto' passes
    over cpp, and asking for it names the reason (no GPU needed: the device query is
    patched)."""
    from arcface_kernels import backends as B

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    dev = torch.device("cuda", 0)
    assert "7.5" in B._device_unsupported("cpp", dev)
    assert B._device_unsupported("triton", dev) is None
    assert B._device_unsupported("cpp", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert B._device_unsupported("cpp", dev) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    be = B._load("cpp")
    if be is None or "cuda" not in be.devices:
        pytest.skip("cpp backend without CUDA kernels: resolve_backend not exercised")
    with pytest.raises(ValueError, match=r"compute capability 8\.0.*7\.5"):
        B.resolve_backend("cpp", dev)
    assert B.resolve_backend("auto", dev).name != "cpp"
