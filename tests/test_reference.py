"""The reference against hand-computed values and closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from arcface_kernels.reference import (SIN2_MIN, fallback_threshold, margin_dpsi, margin_psi,
                                       reference_loss)
from _cases import make_inputs

FALLBACK, EASY, NONE = 0, 1, 2
EXACT, STRAIGHT = 0, 1


def _two_class_loss(c0, c1, psi0, s):
    """loss of one row with target class 0: log(e^{s psi0} + e^{s c1}) - s psi0."""
    z0, z1 = s * psi0, s * c1
    return math.log(math.exp(z0) + math.exp(z1)) - z0


@pytest.mark.parametrize("angle", [0.0, 0.3, 1.2, 2.0, 2.9, math.pi])
@pytest.mark.parametrize("mode", ["fallback", "easy", "none"])
def test_hand_computed_two_classes(angle, mode):
    # x at `angle` from class 0 (unit vectors), class 1 orthogonal to class 0
    s, m2 = 2.0, 0.5
    x = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64) * 3.0
    w = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    y = torch.tensor([0])
    c0, c1 = math.cos(angle), math.sin(angle)
    if mode == "fallback" and angle > math.pi - m2:
        psi = c0 - m2 * math.sin(m2)
    elif mode == "easy" and c0 <= 0:
        psi = c0
    else:
        psi = math.cos(angle + m2)
    want = _two_class_loss(c0, c1, psi, s)
    got = reference_loss(x, w, y, s=s, m2=m2, margin_mode=mode).item()
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_hand_computed_cosface_sphereface():
    x = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    # CosFace: psi = c - m3
    got = reference_loss(x, w, y, s=3.0, m2=0.0, m3=0.35).item()
    assert got == pytest.approx(_two_class_loss(0.6, 0.8, 0.6 - 0.35, 3.0), rel=1e-12)
    # SphereFace m1 = 2, formula as is: cos(2 theta) = 2c^2 - 1
    got = reference_loss(x, w, y, s=3.0, m1=2.0, m2=0.0, margin_mode="none").item()
    assert got == pytest.approx(_two_class_loss(0.6, 0.8, 2 * 0.36 - 1, 3.0), rel=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_linear_cross_entropy(smoothing, reduction):
    x, w, y = make_inputs(11, 7, 5)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = reference_loss(xr, wr, y, s=1.0, m2=0.0, normalize=False, reduction=reduction,
                         label_smoothing=smoothing)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.cross_entropy(xe @ we.T, y, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.rand_like(got) + 0.5
    torch.testing.assert_close(torch.autograd.grad(got, (xr, wr), g),
                               torch.autograd.grad(want, (xe, we), g), rtol=1e-12, atol=1e-12)


def test_zero_margin_is_scaled_cosine_cross_entropy():
    x, w, y = make_inputs(9, 6, 4)
    got = reference_loss(x, w, y, s=10.0, m2=0.0)
    logits = 10.0 * F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    torch.testing.assert_close(got, F.cross_entropy(logits, y), rtol=1e-12, atol=1e-12)


def test_cosface_normalize_false_is_shifted_cross_entropy():
    x, w, y = make_inputs(8, 5, 3, ignore_some=False)
    got = reference_loss(x, w, y, s=2.0, m2=0.0, m3=0.3, normalize=False)
    logits = 2.0 * (x @ w.T) - 2.0 * 0.3 * F.one_hot(y, 5).double()
    torch.testing.assert_close(got, F.cross_entropy(logits, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.0, 0.0), (1.35, 0.2), (2.0, 0.0)])
@pytest.mark.parametrize("wrap", [FALLBACK, EASY, NONE])
def test_dpsi_is_derivative_of_psi(m1, m2, wrap):
    c = torch.linspace(-0.99, 0.99, 397, dtype=torch.float64)
    h = 1e-6
    num = (margin_psi(c + h, m1, m2, 0.1, wrap) - margin_psi(c - h, m1, m2, 0.1, wrap)) / (2 * h)
    ana = margin_dpsi(c, m1, m2, wrap, EXACT)
    # away from the branch switch points, where psi jumps
    keep = torch.ones_like(c, dtype=torch.bool)
    if wrap == FALLBACK:
        keep &= (c - fallback_threshold(m1, m2)).abs() > 1e-3
    if wrap == EASY:
        keep &= c.abs() > 1e-3
    torch.testing.assert_close(ana[keep], num[keep], rtol=1e-6, atol=1e-6)


def test_dpsi_finite_at_the_ends_and_straight_through():
    c = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    d = margin_dpsi(c, 1.0, 0.5, NONE, EXACT)
    assert torch.isfinite(d).all()
    # at c = 1: cos m2 + sin m2 / sqrt(SIN2_MIN)
    assert d[1].item() == pytest.approx(math.cos(0.5) + math.sin(0.5) / math.sqrt(SIN2_MIN))
    assert torch.equal(margin_dpsi(c, 1.0, 0.5, FALLBACK, STRAIGHT), torch.ones(2).double())
    # fallback branch has slope 1 (c = -1 is past pi - m2)
    assert margin_dpsi(c, 1.0, 0.5, FALLBACK, EXACT)[0].item() == 1.0


def test_gradient_matches_design_formula():
    """The reference's autograd gradient equals the closed-form gradient of reference.py's docstring."""
    x, w, y = make_inputs(6, 5, 4, ignore_some=False)
    s, m2 = 8.0, 0.4
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference_loss(xr, wr, y, s=s, m2=m2, reduction="sum").backward()
    a = 1 / x.norm(dim=1, keepdim=True)
    b = 1 / w.norm(dim=1, keepdim=True)
    c = (x * a) @ (w * b).T
    ct = c.gather(1, y[:, None])
    psi = margin_psi(ct, 1.0, m2, 0.0, FALLBACK)
    z = (s * c).scatter(1, y[:, None], s * psi)
    p = torch.softmax(z, dim=1)
    dz = p - F.one_hot(y, 5)
    G = s * dz
    G = G.scatter(1, y[:, None], G.gather(1, y[:, None]) * margin_dpsi(ct, 1.0, m2, FALLBACK, EXACT))
    r = (G * c).sum(1, keepdim=True)
    q = (G * c).sum(0)[:, None]
    dx = a * (G @ (b * w) - r * a * x)
    dw = b * (G.T @ (a * x) - q * b * w)
    torch.testing.assert_close(xr.grad, dx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wr.grad, dw, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck():
    x, w, y = make_inputs(4, 5, 3, seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: reference_loss(a, b, y, s=4.0, m2=0.3, label_smoothing=0.1), (x, w))


def _package_imports(module_file: str) -> set:
    """Modules of arcface_kernels that a module imports (relative and absolute), read
    from its source: module-level and inside functions."""
    import ast
    with open(module_file) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
                out.update([base] if base else [a.name for a in node.names])
            elif node.module and node.module.startswith("arcface_kernels"):
                out.add(node.module.split(".", 1)[1] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".", 1)[1] for a in node.names
                       if a.name.startswith("arcface_kernels."))
    return {m for m in out if m}


def test_the_oracle_imports_no_backend():
    """reference.py, and every module of the package it imports (transitively), imports
    neither the chunked backend nor any kernel package: the oracle shares no code with
    what it checks."""
    import os
    import arcface_kernels
    pkg = os.path.dirname(arcface_kernels.__file__)
    seen, todo = set(), ["reference"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = os.path.join(pkg, mod + ".py")
        if os.path.exists(path):
            todo.extend(_package_imports(path))
    forbidden = {"chunked", "_triton", "_cpp", "_C", "triton_kernels"}
    assert not (seen & forbidden), sorted(seen)
    assert {"_math", "_ops", "_config", "_checks"} <= seen


def test_the_closed_form_backward_matches_autograd():
    """The reference backend's backward op (closed form) against autograd through the
    materialized logits, with a class subset, sub-centers and rows without a target."""
    from arcface_kernels._config import MarginConfig
    from arcface_kernels.reference import (reference_backward, reference_forward,
                                           reference_logits)
    g = torch.Generator().manual_seed(5)
    for k, normalize in ((1, True), (3, True), (1, False)):
        cfg = MarginConfig(s=16.0 if normalize else 1.0, m2=0.3 if normalize else 0.0,
                           m3=0.1, normalize=normalize, sub_centers=k)
        x = torch.randn(9, 6, generator=g, dtype=torch.float64)
        w = torch.randn(11 * k, 6, generator=g, dtype=torch.float64)
        index = torch.tensor([7, 0, 3, 3, 10])
        labels = torch.tensor([0, 4, -1, 2, 1, -1, 3, 0, 4])
        lse = reference_forward(x, w, labels, index, cfg)[0]
        gp, gt, gs = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(3))
        dx, dw, _ = reference_backward(x, w, labels, index, lse, gp, gt, gs, cfg)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        z, _ = reference_logits(xr, wr, labels, index, cfg)
        zt = torch.where(labels >= 0, z.gather(1, labels.clamp(min=0)[:, None])[:, 0],
                         torch.zeros(9, dtype=torch.float64))
        total = (gp * torch.logsumexp(z, 1) + gt * zt + gs * z.sum(1)).sum()
        ax, aw = torch.autograd.grad(total, (xr, wr))
        torch.testing.assert_close(dx, ax, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, aw, rtol=1e-12, atol=1e-12)
