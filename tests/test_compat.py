"""Switching from insightface, pytorch-metric-learning (PML) and Cut Cross-Entropy (CCE):
the compatible constructors and options give those libraries' numbers.

* insightface: against the in-repo stand-in of its CombinedMarginLoss + cross-entropy
  (tests/_insightface.py, written from its formulas), every configuration it accepts, on
  every CPU backend (the gloo runs of PartialFC.from_insightface with 2 and 3 ranks are in
  test_partial_fc.py).
* PML and CCE: against the installed packages (skipped without them).
* linear_cross_entropy's own terms (bias, z-loss, label smoothing, lse) against float64
  torch formulas on materialized logits, on every CPU backend.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import arcface_kernels as ak
from arcface_kernels import partial_fc
from arcface_kernels.compat import insightface as ifc

from _backends import cpu_backends
from _cases import max_rel_err
from _insightface import CONFIGS, REJECTED, CombinedMarginLossStandIn, insightface_loss, \
    make_problem

BACKENDS = cpu_backends()
F64 = torch.float64


def _grads(loss_fn, x, w, *extra):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    ex = [t.detach().clone().requires_grad_(True) for t in extra]
    loss = loss_fn(x, w, *ex)
    grads = torch.autograd.grad(loss.sum(), [x, w, *ex])
    return (loss.detach(),) + tuple(grads)


# ============================================================================ insightface
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_insightface_single_device(backend, config):
    """ArcFaceLoss.from_insightface: loss, embedding and weight gradients equal
    insightface's to float64 rounding (the wrap past pi, the straight-through target
    gradient, m3 > 0 overriding m2, interclass filtering and the 1e-30 floor included)."""
    margin = CombinedMarginLossStandIn(*CONFIGS[config])
    n, c, d = 14, 9, 8
    x, w, y = make_problem(n, c, d, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = ak.ArcFaceLoss.from_insightface(margin, d, c, backend=backend, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(w)

    def ours(xx, ww):   # insightface's int32 labels are fine
        return torch.func.functional_call(head, {"weight": ww}, (xx, y.to(torch.int32)))

    got = _grads(ours, x, w)
    want = _grads(lambda xx, ww: insightface_loss(xx, ww, y, margin), x, w)
    for name, g, r in zip(("loss", "dx", "dw"), got, want):
        err = max_rel_err(g, r)
        assert err <= 1e-12, f"{config} {name}: {err:.2e}"


def test_insightface_cases_exercise_the_quirks():
    """The problem above has rows past the wrap point, a row under the 1e-30 floor, and
    filtered logits: otherwise the comparisons would not test those rules."""
    x, w, y = make_problem(14, 9, 8, seed=3)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    c_t = cos.gather(1, y.unsqueeze(1)).squeeze(1)
    assert (torch.arccos(c_t) + 0.5 > math.pi).any()
    rows = ak.reference_loss(x, w, y, s=64.0, m2=0.5, margin_mode="none", reduction="none")
    assert (rows > -math.log(1e-30)).any() and (rows < -math.log(1e-30)).any()
    off_target = torch.ones_like(cos, dtype=torch.bool)
    off_target[torch.arange(14), y] = False
    assert ((cos > 0.4) & off_target).any()


def test_insightface_settings_and_rules():
    """The settings read off a CombinedMarginLoss, the warning when m3 > 0 overrides m1 /
    m2 (once), and the configurations insightface rejects."""
    st = ifc.settings(CombinedMarginLossStandIn(64.0, 1.0, 0.5, 0.0, 0.4))
    assert st == dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_mode="none",
                      target_grad="straight_through", prob_floor=1e-30,
                      interclass_filtering_threshold=0.4)
    with pytest.warns(UserWarning, match=r"ignores m1 and m2 when m3 > 0.*m2=0\.25"):
        st = ifc.settings(CombinedMarginLossStandIn(64.0, 1.0, 0.25, 0.3))
    assert (st["m1"], st["m2"], st["m3"]) == (1.0, 0.0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # a second time: no warning
        ifc.settings(CombinedMarginLossStandIn(64.0, 1.0, 0.25, 0.3))
    for name, cfg in REJECTED.items():
        with pytest.raises(ValueError, match=r"insightface's CombinedMarginLoss supports"):
            ak.ArcFaceLoss.from_insightface(CombinedMarginLossStandIn(*cfg), 8, 9)
    with pytest.raises(TypeError, match=r"attribute 's' \(s, m1, m2, m3\)"):
        ifc.settings(object())


def test_insightface_constructor_order():
    """insightface's positional order PartialFC_V2(margin_loss, embedding_size,
    num_classes, sample_rate, fp16) works through from_insightface; passed to PartialFC
    itself it fails with a message saying so."""
    m = CombinedMarginLossStandIn(64.0, 1.0, 0.5, 0.0)
    pfc = ak.PartialFC.from_insightface(m, 8, 20, 0.5, True)
    assert (pfc.embedding_size, pfc.num_classes, pfc.sample_rate, pfc.fp16) == (8, 20, 0.5,
                                                                                 True)
    assert pfc.prob_floor == 1e-30 and pfc.cfg.margin_mode == "none"
    with pytest.raises(TypeError, match=r"embedding_size must be a positive int.*"
                                        r"from_insightface"):
        ak.PartialFC(m, 8, 20)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_partial_fc_fp16_casts_only_the_sampled_rows(rate, monkeypatch):
    """fp16=True: the backend op receives float16 embeddings and a float16 weight of only
    the sampled rows (the float32 shard is not cast), and the loss equals the float32 loss
    computed on the same inputs rounded to float16 (to float32 rounding)."""
    m = CombinedMarginLossStandIn(64.0, 1.0, 0.5, 0.0)
    x, w, y = make_problem(12, 30, 8, seed=4)
    seen, res, rows = {}, {}, {}
    for fp16 in (True, False):
        pfc = ak.PartialFC.from_insightface(m, 8, 30, rate, fp16, backend="reference",
                                            generator=torch.Generator().manual_seed(0))
        # the float32 run gets the inputs rounded to float16
        w_in = w.float() if fp16 else w.half().float()
        x_in = x.float() if fp16 else x.half().float()
        with torch.no_grad():
            pfc.weight.copy_(w_in)
        be = ak.backends.resolve_backend("reference", torch.device("cpu"))

        def spy(xx, ww, *a, _orig=be.fwd, _k=fp16):
            seen[_k] = (xx.dtype, ww.dtype, ww.shape[0])
            return _orig(xx, ww, *a)
        spied = dataclasses.replace(be, fwd=spy)
        monkeypatch.setattr(partial_fc, "resolve_backend", lambda *_: spied)
        res[fp16] = pfc(x_in, y)
        res[fp16].backward()
        monkeypatch.undo()
        assert pfc.weight.dtype == torch.float32 and pfc.weight.grad.dtype == torch.float32
        rows[fp16] = 30 if rate == 1.0 else pfc.weight_index.numel()
    assert seen[True] == (torch.float16, torch.float16, rows[True])
    assert seen[False] == (torch.float32, torch.float32, 30)
    if rate < 1.0:
        assert rows[True] < 30
    assert abs(float(res[True]) - float(res[False])) <= 1e-4 * abs(float(res[False]))


# ======================================================================= settable margins
@pytest.mark.parametrize("make", ["ArcFaceLoss", "PartialFC"])
def test_settable_margins(make):
    """s, m1, m2, m3 and interclass_filtering_threshold are attributes: a set is
    validated at once and the next forward uses it."""
    x, w, y = make_problem(8, 7, 5, seed=5)
    head = getattr(ak, make)(5, 7, backend="chunked", dtype=F64)
    with torch.no_grad():
        head.weight.copy_(w)
    before = head(x, y)
    head.m2, head.s, head.m3 = 0.2, 30.0, 0.1
    head.interclass_filtering_threshold = 0.3
    want = ak.reference_loss(x, w, y, s=30.0, m2=0.2, m3=0.1,
                             interclass_filtering_threshold=0.3)
    got = head(x, y)
    assert max_rel_err(got, want) <= 1e-12 and not torch.equal(got, before)
    assert (head.s, head.m1, head.m2, head.m3) == (30.0, 1.0, 0.2, 0.1)
    assert head.cfg.m2 == 0.2
    for name, value, exc, msg in (("m2", 4.0, ValueError, r"m2 must be in \[0, pi\), got 4"),
                                  ("s", -1.0, ValueError, r"s must be > 0, got -1"),
                                  ("m1", "x", TypeError, r"m1 must be a real number"),
                                  ("interclass_filtering_threshold", -0.1, ValueError,
                                   r"interclass_filtering_threshold must be .*-0\.1")):
        with pytest.raises(exc, match=msg):
            setattr(head, name, value)
    assert head.m2 == 0.2   # unchanged by the failed sets


# =========================================================================== PML
def _pml():
    return pytest.importorskip("pytorch_metric_learning.losses")


PML_CASES = {
    "ArcFaceLoss": dict(),
    "ArcFaceLoss_40deg_s30": dict(margin=40.0, scale=30),
    "CosFaceLoss": dict(),
    "SubCenterArcFaceLoss": dict(),
    "SubCenterArcFaceLoss_k2": dict(sub_centers=2, margin=20.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PML_CASES))
@pytest.mark.parametrize("miner", [None, "pairs", "triplets"])
def test_pml_matches_the_package(backend, case, miner):
    """compat.pml's losses load PML's state_dict and give its loss, embedding and W
    gradients (float64, 1e-12), with and without a miner's tuple."""
    losses = _pml()
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    from arcface_kernels.compat import pml
    name = case.split("_")[0]
    kw = PML_CASES[case]
    n, c, d = 16, 6, 8
    torch.manual_seed(0)
    theirs = getattr(losses, name)(num_classes=c, embedding_size=d, **kw).double()
    ours = getattr(pml, name)(c, d, backend=backend, **kw).double()
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W"]
    ours.load_state_dict(theirs.state_dict())
    x, _, y = make_problem(n, c, d, seed=6)
    x = x[:, :d]
    tup = None
    if miner == "pairs":
        tup = miners.MultiSimilarityMiner(epsilon=0.5)(x, y)
    elif miner == "triplets":
        tup = miners.TripletMarginMiner(margin=0.3)(x, y)
        assert 0 < torch.unique(torch.cat(tup)).numel() < n or True
    res = []
    for loss_fn in (ours, theirs):
        xx = x.clone().requires_grad_(True)
        loss = loss_fn(xx, y, tup)
        res.append((loss.detach(),) + torch.autograd.grad(loss, (xx, loss_fn.W)))
    for nm, g, r in zip(("loss", "dx", "dW"), *res):
        assert max_rel_err(g, r) <= 1e-12, (nm, max_rel_err(g, r))
    assert max_rel_err(ours.get_logits(x), theirs.get_logits(x)) <= 1e-13


def test_pml_get_outliers_and_errors():
    losses = _pml()
    from arcface_kernels.compat import pml
    torch.manual_seed(1)
    theirs = losses.SubCenterArcFaceLoss(num_classes=5, embedding_size=8).double()
    ours = pml.SubCenterArcFaceLoss(5, 8).double()
    ours.load_state_dict(theirs.state_dict())
    x, _, y = make_problem(20, 5, 8, seed=7)
    y[y == 4] = 3                      # a class without samples
    for thr in (75, 60):
        o, dom = ours.get_outliers(x, y, threshold=thr)
        t, tdom = theirs.get_outliers(x, y, threshold=thr)
        assert torch.equal(o.sort().values, t.sort().values.to(o.dtype))
        present = torch.unique(y)
        assert torch.equal(dom[:, present], tdom[:, present])
        assert (dom[:, 4] == 0).all()
    # swapped arguments: PML's order is (num_classes, embedding_size)
    head = pml.ArcFaceLoss(8, 100)              # meant (100 classes, 8 features)
    with pytest.raises(ValueError, match=r"D=8 .*embedding_size=100.*swapped"):
        head(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"ref_emb is not supported"):
        ours(x, y, ref_emb=x)
    with pytest.raises(NotImplementedError, match=r"\['reducer'\]"):
        pml.ArcFaceLoss(5, 8, reducer=object())
    # ours takes (embedding_size, num_classes): the reverse fails with a pointer
    ak_head = ak.ArcFaceLoss(100, 8)            # PML's order by mistake
    with pytest.raises(ValueError, match=r"embedding_size.*100.*compat\.pml"):
        ak_head(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))


# ================================================================ linear cross-entropy
def _lce_reference(e, c, t, bias=None, softcap=None, ignore_index=-100, reduction="mean",
                   shift=0, z_loss=0.0, label_smoothing=0.0):
    """float64 torch on materialized logits: (loss, lse)."""
    if shift:
        e, t = e[..., :-shift, :], t[..., shift:]
    z = e @ c.T
    if bias is not None:
        z = z + bias
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    zf, tf = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    rows = F.cross_entropy(zf, tf, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(zf, dim=1)
    valid = tf != ignore_index
    rows = torch.where(valid, rows + z_loss * lse * lse, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows.view(t.shape)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / valid.sum().clamp(min=1)
    return loss, lse.view(t.shape)


LCE_CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "softcap_bias_shift": dict(bias=True, softcap=3.0, shift=1),
    "z_loss_smoothing_sum": dict(z_loss=1e-3, label_smoothing=0.1, reduction="sum"),
    "all_none_shift2": dict(bias=True, softcap=5.0, z_loss=1e-2, shift=2, reduction="none"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LCE_CASES))
def test_linear_cross_entropy_terms(backend, case):
    """[B, T, D] input, bias, softcap, shift, z-loss, smoothing, every reduction, and the
    differentiable lse (its gradient included), in float64."""
    kw = dict(LCE_CASES[case])
    g = torch.Generator().manual_seed(8)
    B, T, D, V = 2, 6, 8, 23
    e = torch.randn(B, T, D, generator=g, dtype=F64)
    c = torch.randn(V, D, generator=g, dtype=F64) * 0.7
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 3] = -100
    bias = torch.randn(V, generator=g, dtype=F64) if kw.pop("bias", False) else None
    extra = [bias] if bias is not None else []

    def run(fn):
        def f(ee, cc, *b):
            loss, lse = fn(ee, cc, b[0] if b else None)
            return loss.sum() + 0.3 * lse.sum()
        return _grads(f, e, c, *extra)

    got = run(lambda ee, cc, b: ak.linear_cross_entropy(ee, cc, t, bias=b, backend=backend,
                                                        return_lse=True, **kw))
    want = run(lambda ee, cc, b: _lce_reference(ee, cc, t, bias=b, **kw))
    for name, gg, rr in zip(("loss", "de", "dc", "dbias"), got, want):
        assert max_rel_err(gg, rr) <= 1e-12, (name, max_rel_err(gg, rr))
    loss, lse = ak.linear_cross_entropy(e, c, t, bias=bias, backend=backend,
                                        return_lse=True, **kw)
    rl, rlse = _lce_reference(e, c, t, bias=bias, **kw)
    assert loss.shape == rl.shape and lse.shape == rlse.shape


CCE_CASES = [dict(softcap=sc, shift=sh, reduction=red)
             for sc in (None, 4.0) for sh in (False, True)
             for red in ("mean", "sum", "none")]


@pytest.mark.parametrize("kw", CCE_CASES,
                         ids=[f"softcap{k['softcap']}-shift{int(k['shift'])}-{k['reduction']}"
                              for k in CCE_CASES])
def test_linear_cross_entropy_matches_cce(kw):
    """Equal to Cut Cross-Entropy's linear_cross_entropy(impl="torch_compile") in float32
    (loss and gradients), with ignored positions."""
    cce = pytest.importorskip("cut_cross_entropy")
    g = torch.Generator().manual_seed(9)
    B, T, D, V = 2, 7, 16, 50
    e = torch.randn(B, T, D, generator=g)
    c = torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, 3], t[1, 0], t[1, 6] = -100, -100, -100
    got = _grads(lambda ee, cc: ak.linear_cross_entropy(ee, cc, t, **kw), e, c)
    want = _grads(lambda ee, cc: cce.linear_cross_entropy(ee, cc, t, impl="torch_compile",
                                                          **kw), e, c)
    assert got[0].shape == want[0].shape
    for name, gg, rr in zip(("loss", "de", "dc"), got, want):
        assert max_rel_err(gg, rr) <= 2e-5, (name, max_rel_err(gg, rr))


@pytest.mark.parametrize("case, exc, match", [
    ("softcap_zero", ValueError, r"softcap must be None or finite and > 0, got 0"),
    ("softcap_negative", ValueError, r"softcap must be None or finite and > 0, got -2"),
    ("bias_length", ValueError, r"bias must have shape \[23\].*got \(22,\)"),
    ("bias_dtype", TypeError, r"bias dtype must match c dtype"),
    ("shift_1d", ValueError, r"shift=1 needs a sequence dimension.*\(8,\)"),
    ("shift_too_long", ValueError, r"shift=6 must be less than the sequence length T=6"),
    ("targets_float", TypeError, r"targets must be an integer tensor.*float"),
    ("targets_shape", ValueError, r"targets must have shape \(2, 6\)"),
    ("z_loss_negative", ValueError, r"z_loss must be a finite number >= 0, got -1"),
])
def test_linear_cross_entropy_bad_input(case, exc, match):
    e, c = torch.randn(2, 6, 8), torch.randn(23, 8)
    t = torch.randint(0, 23, (2, 6))
    kw = {}
    if case == "softcap_zero":
        kw["softcap"] = 0
    elif case == "softcap_negative":
        kw["softcap"] = -2.0
    elif case == "bias_length":
        kw["bias"] = torch.zeros(22)
    elif case == "bias_dtype":
        kw["bias"] = torch.zeros(23, dtype=F64)
    elif case == "shift_1d":
        e, t, kw["shift"] = e[0, 0], t[0, 0], 1
    elif case == "shift_too_long":
        kw["shift"] = 6
    elif case == "targets_float":
        t = t.float()
    elif case == "targets_shape":
        t = t[:, :5]
    elif case == "z_loss_negative":
        kw["z_loss"] = -1
    with pytest.raises(exc, match=match):
        ak.linear_cross_entropy(e, c, t, **kw)
