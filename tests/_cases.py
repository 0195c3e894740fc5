"""Shared test material: the grid of loss modes and shapes, input factories, and the one
comparison of a backend against the float64 reference. Every backend's test file uses
these, so a new mode added here is checked on every backend."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

import arcface_kernels as ak
from arcface_kernels.reference import reference_loss

# Loss modes (keyword arguments of arcface_loss / reference_loss).
MODES: Dict[str, dict] = {
    "arcface": dict(s=64.0, m2=0.5),
    "cosface": dict(s=64.0, m2=0.0, m3=0.35),
    "combined": dict(s=32.0, m1=1.0, m2=0.3, m3=0.2),
    "sphereface": dict(s=30.0, m1=1.35, m2=0.0, m3=0.0),
    "combined_m1": dict(s=16.0, m1=1.2, m2=0.3, m3=0.1, margin_mode="none"),
    "easy": dict(s=64.0, m2=0.5, margin_mode="easy"),
    "no_wrap": dict(s=64.0, m2=0.5, margin_mode="none"),
    "big_margin_fallback": dict(s=8.0, m2=2.5),  # many targets in the fallback branch
    "straight_through": dict(s=64.0, m2=0.5, target_grad="straight_through"),
    "smoothing": dict(s=64.0, m2=0.5, label_smoothing=0.1),
    "linear_ce": dict(s=1.0, m2=0.0, normalize=False),
    "linear_cosface": dict(s=2.0, m2=0.0, m3=0.5, normalize=False),
    "reduction_sum": dict(s=64.0, m2=0.5, reduction="sum"),
    "reduction_none": dict(s=64.0, m2=0.5, reduction="none"),
    "sub_centers": dict(s=64.0, m2=0.5, sub_centers=3),
}

# (N, C, D): odd shapes, C not a multiple of typical blocks, D not a power of two.
SHAPES = [(1, 1, 1), (1, 7, 17), (5, 1, 4), (9, 13, 17), (33, 70, 24), (64, 129, 33)]


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


def finite_difference_ok(backend: str, dtype=torch.float64) -> bool:
    """gradcheck of the backend on a tiny problem in float64 (every mode but sub-centers,
    whose max is not differentiable at ties)."""
    x, w, y = make_inputs(4, 5, 3, seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    return torch.autograd.gradcheck(
        lambda a, b: ak.arcface_loss(a, b, y, backend=backend, s=4.0, m2=0.3,
                                     label_smoothing=0.1), (x, w), eps=1e-6, atol=1e-6)


__all__ = ["MODES", "SHAPES", "make_inputs", "run_loss", "max_rel_err",
           "assert_matches_reference", "assert_low_precision_ok", "finite_difference_ok"]
