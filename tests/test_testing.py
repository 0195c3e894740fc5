"""arcface_kernels.testing, the public checker: planted bugs are found and named, a
correct implementation passes, the report, the pytest helper, the fuzzer, the CLI."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from arcface_kernels._math import fallback_threshold
from arcface_kernels.reference import _Psi as _RefPsi
from arcface_kernels._config import GRAD_MODES, WRAP_MODES
from arcface_kernels.testing import (MARGIN_GRID, Case, Report, check_linear_cross_entropy,
                                     check_margin_loss, fuzz_margin_loss,
                                     margin_loss_tests, random_margin_cases)
import arcface_kernels._math as akm


# ------------------------------------------------------- a plain implementation to mutate
def _psi(c, m1, m2, m3, wrap, grad, clamp):
    """psi(c) with psi'(c) (the reference's: the floor at c = +-1), optionally without
    the clamp of the cosine."""
    return _RefPsi.apply(c.clamp(-1.0, 1.0) if clamp else c, m1, m2, m3, wrap, grad)


def plain_loss(x, w, y, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_mode="fallback",
               target_grad="exact", normalize=True, sub_centers=1, label_smoothing=0.0,
               ignore_index=-100, reduction="mean", bugs=()):
    """The loss written plainly, with planted bugs switched on by name."""
    if "float32_accumulation" in bugs:
        x, w = x.float(), w.float()
    if normalize:
        c = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    else:
        c = x @ w.T
    n, k = x.shape[0], sub_centers
    wrap, grad = WRAP_MODES[margin_mode], GRAD_MODES[target_grad]
    valid = y != ignore_index
    col = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
    clamp = "no_clamp" not in bugs
    if k > 1 and "max_after_margin" in bugs:
        cc = c.view(n, -1, k)
        tgt_cols = cc.gather(1, col.unsqueeze(2).expand(n, 1, k)).squeeze(1)   # [N, K]
        psi = _psi(tgt_cols, m1, m2, m3, wrap, grad, clamp).max(dim=1).values
        c = cc.max(dim=2).values
    else:
        if k > 1:
            c = c.view(n, -1, k).max(dim=2).values
        psi = _psi(c.gather(1, col).squeeze(1), m1, m2, m3, wrap, grad, clamp)
    if "margin_on_all" in bugs:
        z = s * _psi(c, m1, m2, m3, wrap, grad, clamp)
    else:
        z = s * c.scatter(1, col, psi.unsqueeze(1))
    if "target_grad_sign" in bugs:
        zt = z.gather(1, col)
        z = z.scatter(1, col, 2 * zt.detach() - zt)   # same value, gradient negated
    z_t = z.gather(1, col).squeeze(1)
    rows = torch.logsumexp(z, dim=1) - (1 - label_smoothing) * z_t
    if label_smoothing:
        rows = rows - label_smoothing / z.shape[1] * z.sum(dim=1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if "float32_accumulation" in bugs:
        rows = rows.double()
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = n if "ignored_in_mean" in bugs else valid.sum().clamp(min=1)
    return rows.sum() / count


def planted(*bugs):
    def fn(x, w, y, **kw):
        return plain_loss(x, w, y, bugs=bugs, **kw)
    fn.__name__ = "plain_loss_" + "_".join(bugs) if bugs else "plain_loss"
    return fn


_FAST = ["arcface", "arcface_s64", "sphereface", "ignore_mean", "combined_m1", "m1_below_1_near_pi",
         "wrap_point", "smoothing", "ignore_index", "all_ignored", "reduction_none",
         "sub_centers", "sub_center_flip", "one_class", "parallel", "parallel_m1",
         "antiparallel_m1", "zero_rows", "huge_norms", "tiny_norms"]


def test_plain_implementation_passes():
    rep = check_margin_loss(planted(), names=_FAST)
    assert rep.ok, str(rep)
    assert rep.counts()["pass"] >= 2 * len(_FAST)


# bug -> cases that must be among the failures (the case that pins the bug down)
PLANTED = {
    "target_grad_sign": ["arcface", "arcface_s64", "sphereface"],
    "no_clamp": ["parallel_m1", "m1_below_1_near_pi"],
    "ignored_in_mean": ["ignore_mean", "smoothing", "ignore_index"],
    "margin_on_all": ["arcface", "arcface_s64", "sub_centers"],
    "float32_accumulation": ["arcface", "arcface_s64", "sub_centers"],
    "max_after_margin": ["sub_center_flip"],
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_is_reported_with_its_case(bug):
    dtypes = [torch.float64] if bug == "float32_accumulation" else [torch.float64,
                                                                     torch.float32]
    rep = check_margin_loss(planted(bug), names=_FAST, dtypes=dtypes, gradcheck=False)
    assert not rep.ok
    failed = rep.failed_cases()
    for case in PLANTED[bug]:
        assert case in failed, f"{bug}: {case} not reported; failures {failed}\n{rep}"
    with pytest.raises(AssertionError, match=PLANTED[bug][0]):
        rep.assert_ok()
    if bug == "no_clamp":
        assert any("not finite" in r.reason for r in rep.failures)
    if bug == "max_after_margin":
        # it is only the flip case: the bug is invisible wherever psi is monotonic
        assert "sub_centers" not in failed


def test_fallback_threshold_without_the_pi_cap_is_caught(monkeypatch):
    """m1 < 1: (pi - m2) / m1 > pi, so the threshold needs min(..., pi). Removing it from
    the oracle survived the old grid; now the C++ backend (its own threshold, in
    csrc/arcface_math.h) disagrees with the mutated oracle at m1_below_1_near_pi."""
    pytest.importorskip("arcface_kernels._cpp")
    import functools
    import arcface_kernels as ak
    fn = functools.partial(ak.arcface_loss, backend="cpp")
    assert check_margin_loss(fn, names=["m1_below_1_near_pi"]).ok
    monkeypatch.setattr(akm, "fallback_threshold",
                        lambda m1, m2: math.cos((math.pi - m2) / m1))
    rep = check_margin_loss(fn, names=["m1_below_1_near_pi"], gradcheck=False)
    assert "m1_below_1_near_pi" in rep.failed_cases(), str(rep)
    assert fallback_threshold(0.8, 0.3) == -1.0   # the real one, for the record


def test_report_table_and_counts():
    rep = check_margin_loss(planted("margin_on_all"), names=["arcface", "one_class"],
                            dtypes=["float64"], gradcheck=False)
    text = str(rep)
    assert "arcface" in text and "fail" in text and "dx err" in text
    c = rep.counts()
    assert c["fail"] == 1 and c["pass"] == 1   # C = 1: every class is the target
    assert isinstance(rep, Report) and not rep.ok


def test_supports_skips_what_is_not_declared():
    calls = []

    def only_arcface(x, w, y, s, m2):
        calls.append((s, m2))
        return plain_loss(x, w, y, s=s, m2=m2)
    rep = check_margin_loss(only_arcface, supports={"s": True, "m2": True},
                            names=["arcface", "cosface", "sub_centers", "easy"],
                            dtypes=["float64"], gradcheck=False)
    status = {r.case: r.status for r in rep.results}
    assert status["arcface"] == "pass"
    assert status["cosface"] == "skip" and status["sub_centers"] == "skip"
    assert status["easy"] == "skip"
    assert "m3" in next(r.reason for r in rep.results if r.case == "cosface")
    assert rep.ok and calls


def test_an_exception_is_an_error_not_a_crash():
    def broken(x, w, y, **kw):
        raise RuntimeError("kaboom")
    rep = check_margin_loss(broken, names=["arcface"], dtypes=["float64"])
    assert rep.counts()["error"] >= 1 and "kaboom" in rep.results[0].reason
    with pytest.raises(AssertionError, match="arcface"):
        rep.assert_ok()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown case"):
        check_margin_loss(planted(), names=["nope"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_margin_loss(planted(), names=["arcface"], dtypes=["int8"])
    with pytest.raises(ValueError, match="supports: unknown setting 'margin'"):
        check_margin_loss(planted(), names=["arcface"], supports={"margin": True})
    with pytest.raises(TypeError, match="fn must be callable"):
        check_margin_loss(3, names=["arcface"])


def test_linear_cross_entropy_check():
    def linear(x, w, y, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               softcap=None, shift=False):
        if shift:
            x, y = x[..., :-1, :], y[..., 1:]
        logits = x.reshape(-1, x.shape[-1]) @ w.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        rows = F.cross_entropy(logits, y.reshape(-1), ignore_index=ignore_index,
                               reduction="none", label_smoothing=label_smoothing)
        if reduction == "none":
            return rows.view(y.shape)
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / (y != ignore_index).sum().clamp(min=1)
    rep = check_linear_cross_entropy(linear)
    assert rep.ok, str(rep)
    names = {r.case for r in rep.results}
    assert {"linear_softcap", "linear_shift", "gradcheck/linear_ce"} <= names

    def nan_mean(x, w, y, **kw):   # torch's own mean over zero rows: NaN
        return F.cross_entropy(x @ w.T, y, ignore_index=kw.get("ignore_index", -100))
    rep = check_linear_cross_entropy(nan_mean, supports={"ignore_index": True},
                                     dtypes=["float64"], gradcheck=False)
    assert "linear_all_ignored" in rep.failed_cases()


def test_random_cases_are_seeded():
    a, b = random_margin_cases(6, seed=3), random_margin_cases(6, seed=3)
    assert a == b and a != random_margin_cases(6, seed=4)
    assert all(isinstance(c, Case) for c in a)


def test_fuzz_finds_and_shrinks_a_planted_bug():
    rep = fuzz_margin_loss(planted("margin_on_all"), examples=15, seed=0,
                           dtypes=["float64"])
    assert not rep.ok
    worst = rep.smallest_failure
    assert worst is not None and worst.describe() in rep.failures[0].reason
    pytest.importorskip("hypothesis")
    # shrunk: hypothesis reduces the shape to a handful of rows and classes
    n, c, d = worst.shape
    assert n <= 3 and c <= 3, worst


def test_fuzz_passes_a_correct_implementation():
    rep = fuzz_margin_loss(planted(), examples=8, seed=1, dtypes=["float64"],
                           use_hypothesis=False)
    assert rep.ok, str(rep)


# one test item per case: what a user's three-line test file does
test_plain_loss_items = margin_loss_tests(planted(), cases=[c for c in MARGIN_GRID
                                                            if c.name in _FAST[:6]],
                                          dtypes=["float64"])


def test_cli_exit_status(tmp_path):
    mod = tmp_path / "my_losses.py"
    mod.write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from arcface_kernels import arcface_loss

        def good(x, w, y, **kw):
            return arcface_loss(x, w, y, backend="chunked", **kw)

        def bad(x, w, y, **kw):
            return arcface_loss(x, w, y, backend="chunked", **kw) * 1.001
    """))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    base = [sys.executable, "-m", "arcface_kernels", "check"]
    ok = subprocess.run(base + ["my_losses:good", "--cases", "arcface,cosface",
                                "--dtypes", "float64"], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "passed" in ok.stdout
    bad = subprocess.run(base + ["my_losses:bad", "--cases", "arcface", "--dtypes",
                                 "float64"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 1 and "arcface" in bad.stdout, bad.stdout + bad.stderr
    missing = subprocess.run(base + ["my_losses:nothing"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert missing.returncode == 2 and "nothing" in missing.stderr


def test_peers_as_documented():
    """docs/testing.md's findings on peers' code, kept true: pytorch-metric-learning's
    ArcFaceLoss gives infinite gradients for an embedding parallel to its class centre
    and passes the rest it supports; the insightface transcription's gradients are
    right, its loss is capped at 69.08 and m3 > 0 drops m2."""
    pytest.importorskip("pytorch_metric_learning")
    import importlib
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    try:
        peers = importlib.import_module("examples.check_peers")
    finally:
        sys.path.remove(root)
    rep = check_margin_loss(peers.pml_arcface, gradcheck=False)
    assert set(rep.failed_cases()) == {"parallel", "shape_1x1x1"}, str(rep)
    assert all("not finite" in r.reason for r in rep.failures)
    rep = check_margin_loss(peers.insightface_combined_margin, gradcheck=False,
                            names=["arcface", "arcface_s64", "combined", "sphereface"])
    by = {(r.case, r.dtype): r for r in rep.results}
    assert by[("arcface", "float64")].status == "pass"
    big = by[("arcface_s64", "float64")]
    assert big.status == "fail" and big.errors["dx"] < 1e-12 and big.errors["loss"] > 1e-3
    assert by[("combined", "float64")].errors["dx"] > 0.1
    assert by[("sphereface", "float64")].status == "skip"   # m1 != 1 is rejected


def test_modes_and_shapes_select_and_resize_cases():
    rep = check_margin_loss(planted(), modes=["cosface", "sub_centers"],
                            shapes=[(3, 17, 5), (1, 2, 2)], dtypes=["float64"],
                            gradcheck=False)
    names = [r.case for r in rep.results]
    assert names == ["cosface@3x17x5", "cosface@1x2x2", "sub_centers@3x17x5",
                     "sub_centers@1x2x2"] and rep.ok, str(rep)
    rep = check_margin_loss(planted("margin_on_all"), modes="cosface", shapes=[(4, 9, 6)],
                            dtypes=["float64"], gradcheck=False)
    assert rep.failed_cases() == ["cosface@4x9x6"]
    with pytest.raises(ValueError, match="shapes must be"):
        check_margin_loss(planted(), modes=["cosface"], shapes=[(0, 2, 2)])
    with pytest.raises(ValueError, match="not both"):
        check_margin_loss(planted(), modes=["cosface"], names=["cosface"])
