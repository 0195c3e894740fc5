"""Shared test helpers: named loss settings and shapes taken from the one grid
(arcface_kernels.testing), input factories, and comparisons of one call against the
float64 reference for the tests that are not grid checks. The grid runs over every
backend in tests/test_backends.py."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

import arcface_kernels as ak
from arcface_kernels.reference import reference_loss
from arcface_kernels.testing import MARGIN_GRID

# Named loss settings (keyword arguments of arcface_loss / reference_loss) for the tests
# that are not grid checks (PartialFC, sub-centers, the API...): taken from the one grid,
# arcface_kernels.testing.MARGIN_GRID ("arcface" is its s = 64 ArcFace case). The grid
# itself is run over every backend in tests/test_backends.py.
MODES: Dict[str, dict] = {c.name: dict(c.settings) for c in MARGIN_GRID
                          if c.pattern in ("aligned", "aligned_ignored")}
MODES["arcface"] = dict(MODES.pop("arcface_s64"), s=64.0, m2=0.5)

# (N, C, D) of the grid's odd shapes: C not a multiple of typical blocks, D not a power
# of two.
SHAPES = [c.shape for c in MARGIN_GRID if c.name in (
    "shape_1x1x1", "one_row", "one_class", "combined_m1", "arcface_s64", "odd_sizes")]


def make_inputs(n: int, c: int, d: int, *, dtype=torch.float64, device="cpu", seed: int = 0,
                sub_centers: int = 1, ignore_index: int = -100, ignore_some: bool = True,
                aligned: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (embeddings [n, d], weight [c*K, d], labels [n]). With ``aligned`` the
    embeddings lean toward their class centre so that targets cover the whole range of
    cosines (margin branches, fallback); with ``ignore_some`` every 4th row is ignored."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c * sub_centers, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if aligned:
        lean = torch.linspace(-2.0, 3.0, n, dtype=torch.float64).unsqueeze(1)
        x = x + lean * w.view(c, sub_centers, d)[y, 0] / w.norm(dim=1).mean()
    if ignore_some and n > 2:
        y[1::4] = ignore_index
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), y.to(device)


def run_loss(backend: Optional[str], x, w, y, mode: dict, chunk_size=None):
    """(loss, dx, dw) of one call: backend=None means the float64 autograd reference."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    if backend is None:
        loss = reference_loss(x, w, y, **mode)
    else:
        loss = ak.arcface_loss(x, w, y, backend=backend, chunk_size=chunk_size, **mode)
    seed = torch.Generator().manual_seed(1)
    # a non-uniform upstream gradient for reduction="none"
    gout = torch.rand(loss.shape, generator=seed, dtype=torch.float64).to(loss) + 0.5
    dx, dw = torch.autograd.grad(loss, (x, w), gout)
    return loss.detach(), dx, dw


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(max |want|, 1), in float64 (absolute below magnitude 1)."""
    got, want = got.double().cpu(), want.double().cpu()
    if want.numel() == 0:
        return 0.0
    scale = max(want.abs().max().item(), 1.0)
    return (got - want).abs().max().item() / scale


def assert_matches_reference(backend: str, shape, mode: dict, *, dtype=torch.float64,
                             device="cpu", chunk_size=None, tol: Optional[float] = None,
                             seed: int = 0):
    """Loss and both gradients of ``backend`` at ``dtype`` equal the float64 reference
    to ``tol`` (relative to the largest magnitude of each quantity).

    Default tolerances: 1e-10 in float64; 2e-4 in float32 (s = 64 amplifies the rounding
    of cosines ~64-fold). For float16 / bfloat16 use :func:`assert_low_precision_ok`.
    """
    n, c, d = shape
    k = mode.get("sub_centers", 1)
    x, w, y = make_inputs(n, c, d, dtype=torch.float64, seed=seed, sub_centers=k)
    want = run_loss(None, x, w, y, mode)
    got = run_loss(backend, x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype),
                   y.to(device), mode, chunk_size=chunk_size)
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 2e-4
    for name, g, r in zip(("loss", "dx", "dw"), got, want):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err = max_rel_err(g, r)
        assert err <= tol, f"{backend} {name}: relative error {err:.3e} > {tol:.1e}"


def assert_low_precision_ok(backend: str, shape, mode: dict, dtype, *, device="cpu",
                            factor: float = 4.0, seed: int = 0, input_scale: float = 1.0):
    """In float16 / bfloat16 a backend's error against the float64 reference is at most
    ``factor`` times the reference's own error at that precision, plus one unit roundoff
    of the dtype (the gradients are stored in it).

    "The reference's own error" is that of naive PyTorch at its best in that precision:
    the inputs rounded to ``dtype``, the math in float32, the gradients rounded to
    ``dtype``. (Plain float16 arithmetic over the whole reference overflows or divides by
    zero: F.normalize's eps underflows in half precision.) ``input_scale`` multiplies x and
    w (norms far from 1: the cosines are unchanged, the gradients scale)."""
    n, c, d = shape
    k = mode.get("sub_centers", 1)
    x, w, y = make_inputs(n, c, d, dtype=torch.float64, seed=seed, sub_centers=k)
    x, w = x * input_scale, w * input_scale
    exact = run_loss(None, x, w, y, mode)
    xl, wl = x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    loss_n, dx_n, dw_n = run_loss(None, xl.float(), wl.float(), y.to(device), mode)
    naive = (loss_n, dx_n.to(dtype), dw_n.to(dtype))
    got = run_loss(backend, xl, wl, y.to(device), mode)
    unit = torch.finfo(dtype).eps / 2
    for name, g, nv, r in zip(("loss", "dx", "dw"), got, naive, exact):
        assert g.dtype == (torch.float32 if name == "loss" else dtype), f"{name}: {g.dtype}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err, ref_err = max_rel_err(g, r), max_rel_err(nv, r)
        assert err <= factor * ref_err + unit, (
            f"{backend} {dtype} {name}: error {err:.3e} vs reference's own {ref_err:.3e}")


__all__ = ["MODES", "SHAPES", "make_inputs", "run_loss", "max_rel_err",
           "assert_matches_reference", "assert_low_precision_ok"]
