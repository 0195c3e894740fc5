"""Check anyone's margin-softmax loss (or linear cross-entropy) against a float64 oracle.

    from arcface_kernels.testing import check_margin_loss
    report = check_margin_loss(my_loss, supports={"s": True, "m2": True})
    print(report); report.assert_ok()

``fn(embeddings, weight, labels, **settings) -> loss`` is the implementation under test:
embeddings [N, D], weight [C * sub_centers, D] (one row per class centre, as insightface
stores it; adapt a [D, C] layout inside fn), labels [N] int64. The settings are keyword
arguments in the vocabulary of :func:`arcface_kernels.arcface_loss` (:data:`DEFAULTS`):
s, m1, m2, m3 (target logit s * (cos(m1 theta + m2) - m3)), margin_mode ("fallback",
"easy", "none"), target_grad ("exact", "straight_through"), normalize, sub_centers,
label_smoothing, ignore_index and reduction.

``supports`` declares what fn implements: a mapping of setting -> True (any value) or a
collection of the values it implements; ``defaults`` changes the value a setting has in
the cases that do not set it (both may also be attributes of fn). Only declared settings are passed to fn; a case
that needs an undeclared setting at other than its default, or a value outside the
declared ones, is skipped and reported as such. Without ``supports`` (argument or an
attribute ``fn.supports``) every setting is passed.

What a check does, per case of the grid (:data:`MARGIN_GRID`), dtype and device:

* builds the inputs in float64 and rounds them to the dtype;
* runs fn forward and backward (a fixed non-uniform upstream gradient for
  reduction="none"), and the oracle on the same rounded inputs in float64
  (:func:`arcface_kernels.reference.reference_loss`: plain autograd over the logits;
  linear cross-entropy: ``F.cross_entropy``);
* compares the loss and the gradients of embeddings and weight: the error relative to
  the largest magnitude of each (for the loss at least 1: lse - z_y may cancel to
  about 0) must be at most ``atol_scale * (4 * naive + floor)``,
  where ``naive`` is the error of naive PyTorch at that dtype (the oracle computed in
  float32, gradients rounded to the dtype) and ``floor`` is :data:`FLOORS` [dtype]
  (float64: 1e-10, so float32 arithmetic fails a float64 check);
* reports a non-finite value where the oracle is finite as a failure, and an exception
  raised by fn as an error;
* runs torch.autograd.gradcheck in float64 on the cases marked for it.

:func:`fuzz_margin_loss` draws further cases from a seed (shapes, margins, dtypes and
adversarial inputs); with ``hypothesis`` installed it also shrinks a failure to its
smallest case. :func:`margin_loss_tests` turns the grid into pytest test items, so a
user's test file is three lines; ``arcface-kernels check MODULE:FUNCTION`` runs the same
from the shell.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import random as _random
from typing import Callable, Iterable, List, Mapping, Optional, Sequence

import torch

from ._cases import (DEFAULTS, LINEAR_DEFAULTS, LINEAR_GRID, MARGIN_GRID, PATTERNS, Case,
                     build_inputs)
from ._check import (FACTOR, FLOORS, CaseResult, Report, linear_oracle, margin_oracle,
                     parse_dtype, run_cases)


def _select(grid: Sequence[Case], names: Optional[Iterable[str]],
            shapes: Optional[Iterable[Sequence[int]]] = None) -> List[Case]:
    """The grid's cases named in ``names`` (all when None), each at every one of
    ``shapes`` ((N, C, D); the case's own shape when None)."""
    if isinstance(names, str):
        names = [names]
    if names is None:
        chosen = list(grid)
    else:
        names = list(names)
        known = {c.name: c for c in grid}
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown case(s) {bad}; the grid has {list(known)}")
        chosen = [known[n] for n in names]
    if shapes is None:
        return chosen
    shapes = [tuple(int(v) for v in sh) for sh in shapes]
    if not shapes or any(len(sh) != 3 or min(sh) < 1 for sh in shapes):
        raise ValueError(f"shapes must be (N, C, D) triples of positive ints, got {shapes}")
    return [dataclasses.replace(c, name=f"{c.name}@{'x'.join(map(str, sh))}", shape=sh)
            for c in chosen for sh in shapes]


def check_margin_loss(fn: Callable, *, supports: Optional[Mapping[str, object]] = None,
                      cases: Optional[Sequence[Case]] = None,
                      names: Optional[Iterable[str]] = None,
                      modes: Optional[Iterable[str]] = None,
                      shapes: Optional[Iterable[Sequence[int]]] = None,
                      dtypes: Iterable = (torch.float64, torch.float32),
                      devices: Iterable[str] = ("cpu",), atol_scale: float = 1.0,
                      gradcheck: bool = True,
                      defaults: Optional[Mapping[str, object]] = None) -> Report:
    """Run the margin-loss grid (or ``cases``, or the grid's cases named in ``names``)
    on ``fn`` for every dtype and device; returns the :class:`Report` (module docstring).
    ``defaults`` replaces settings the cases leave at their defaults (e.g. an
    implementation that only has insightface's current semantics:
    ``{"margin_mode": "none", "target_grad": "straight_through"}``). ``modes`` is
    another name for ``names``; ``shapes`` runs each chosen case at each (N, C, D).
    """
    if modes is not None and names is not None:
        raise ValueError("pass names or modes (the same thing), not both")
    chosen = list(cases) if cases is not None else _select(
        MARGIN_GRID, names if modes is None else modes, shapes)
    return run_cases(fn, chosen, kind="margin", supports=supports, dtypes=dtypes,
                     devices=devices, atol_scale=atol_scale, gradcheck=gradcheck,
                     defaults=defaults)


def check_linear_cross_entropy(fn: Callable, *,
                               supports: Optional[Mapping[str, object]] = None,
                               cases: Optional[Sequence[Case]] = None,
                               names: Optional[Iterable[str]] = None,
                               shapes: Optional[Iterable[Sequence[int]]] = None,
                               dtypes: Iterable = (torch.float64, torch.float32),
                               devices: Iterable[str] = ("cpu",), atol_scale: float = 1.0,
                               gradcheck: bool = True) -> Report:
    """The same for plain linear cross-entropy, ``fn(x, weight, labels, **settings)``
    with the settings of :data:`LINEAR_DEFAULTS` (ignore_index, reduction,
    label_smoothing, softcap, shift). The oracle is ``F.cross_entropy`` of x @ weight.T
    (softcap: softcap * tanh(logits / softcap); shift: position t predicts label t + 1 of
    [B, T] labels, x [B, T, D]); "mean" over zero rows is 0."""
    chosen = list(cases) if cases is not None else _select(LINEAR_GRID, names, shapes)
    return run_cases(fn, chosen, kind="linear", supports=supports, dtypes=dtypes,
                     devices=devices, atol_scale=atol_scale, gradcheck=gradcheck)


# ----------------------------------------------------------------------- random cases
_FAMILIES = ("arcface", "cosface", "sphereface", "m1_below_1", "combined")
_RANDOM_PATTERNS = ("aligned", "aligned_ignored", "random", "near_pi", "wrap_point",
                    "parallel", "antiparallel", "zero_rows", "duplicate_rows", "huge_norms",
                    "tiny_norms", "sub_center_flip")


def _case_from_draws(i: int, n: int, c: int, d: int, family: str, s: float, m: float,
                     margin_mode: str, target_grad: str, k: int, smoothing: float,
                     reduction: str, pattern: str) -> Case:
    settings = dict(s=s, margin_mode=margin_mode, target_grad=target_grad)
    if family == "arcface":
        settings.update(m2=m)
    elif family == "cosface":
        settings.update(m2=0.0, m3=m)
    elif family == "sphereface":
        settings.update(m1=1.0 + m, m2=0.0)
    elif family == "m1_below_1":
        settings.update(m1=1.0 - m / 4, m2=m)
    else:
        settings.update(m2=m, m3=m / 2)
    if k > 1:
        settings["sub_centers"] = k
    if smoothing:
        settings["label_smoothing"] = smoothing
    if reduction != "mean":
        settings["reduction"] = reduction
    if pattern == "sub_center_flip" and k < 3:
        pattern = "near_pi"
    return Case(f"random{i}", (n, c, d), {k_: v for k_, v in settings.items()
                                          if v != DEFAULTS[k_]}, pattern, seed=i)


def random_margin_cases(count: int, seed: int = 0) -> List[Case]:
    """``count`` cases drawn from ``seed`` (no hypothesis needed): shapes N <= 40,
    C <= 90, 2 <= D <= 40 (with D = 1 every cosine is exactly +-1, where psi is not
    Lipschitz: a last-place difference in a normalized vector moves psi by ~1e-8, beyond
    any estimate of float64 rounding; the grid's 1 x 1 x 1 case covers D = 1), a margin family with random s and margin, wrap mode, target
    gradient, sub-centers, smoothing, reduction and an adversarial input pattern."""
    rnd = _random.Random(seed)
    out = []
    for i in range(count):
        out.append(_case_from_draws(
            i, rnd.randint(1, 40), rnd.randint(1, 90), rnd.randint(2, 40),
            rnd.choice(_FAMILIES), round(rnd.uniform(1.0, 64.0), 2),
            round(rnd.uniform(0.0, 0.8), 3), rnd.choice(("fallback", "easy", "none")),
            rnd.choice(("exact", "straight_through")), rnd.choice((1, 1, 2, 3)),
            rnd.choice((0.0, 0.0, 0.1)), rnd.choice(("mean", "sum", "none")),
            rnd.choice(_RANDOM_PATTERNS)))
    return out


def _hypothesis_strategy():
    from hypothesis import strategies as st
    # simplest values first: hypothesis shrinks toward them
    return st.builds(
        _case_from_draws, st.just(0), st.integers(1, 40), st.integers(1, 90),
        st.integers(2, 40), st.sampled_from(_FAMILIES),
        st.floats(1.0, 64.0, allow_nan=False).map(lambda v: round(v, 2)),
        st.floats(0.0, 0.8, allow_nan=False).map(lambda v: round(v, 3)),
        st.sampled_from(("fallback", "easy", "none")),
        st.sampled_from(("exact", "straight_through")), st.sampled_from((1, 2, 3)),
        st.sampled_from((0.0, 0.1)), st.sampled_from(("mean", "sum", "none")),
        st.sampled_from(_RANDOM_PATTERNS))


def fuzz_margin_loss(fn: Callable, *, examples: int = 30, seed: int = 0,
                     supports: Optional[Mapping[str, object]] = None,
                     dtypes: Iterable = (torch.float64, torch.float32),
                     devices: Iterable[str] = ("cpu",), atol_scale: float = 1.0,
                     use_hypothesis: Optional[bool] = None) -> Report:
    """Randomized checks: ``examples`` cases drawn from ``seed``.

    With hypothesis (installed, and ``use_hypothesis`` not False) the draws are
    hypothesis's, and a failure is shrunk to the smallest failing case, which the report
    then holds (``report.smallest_failure``; its description also in the reasons). Without it the
    seeded draws of :func:`random_margin_cases` run, and the report holds every result,
    the smallest failing case (by N * C * D) first."""
    dts = [parse_dtype(d) for d in dtypes]
    kw = dict(kind="margin", supports=supports, dtypes=dts, devices=devices,
              atol_scale=atol_scale, gradcheck=False)
    if use_hypothesis is None:
        use_hypothesis = importlib.util.find_spec("hypothesis") is not None
    if use_hypothesis:
        from hypothesis import HealthCheck, find, settings
        from hypothesis.errors import NoSuchExample
        tried = [0]

        def fails(case: Case) -> bool:
            tried[0] += 1
            return not run_cases(fn, [case], **kw).ok
        try:
            worst = find(_hypothesis_strategy(), fails,
                         settings=settings(max_examples=examples, database=None,
                                           deadline=None,
                                           suppress_health_check=list(HealthCheck)),
                         random=_random.Random(seed))
        except NoSuchExample:
            rep = Report(f"fuzz of {getattr(fn, '__name__', repr(fn))} (hypothesis)")
            rep.results.append(CaseResult("random", ",".join(map(str, dts)), ",".join(
                map(str, devices)), "pass", reason=f"{tried[0]} drawn cases passed"))
            return rep
        rep = run_cases(fn, [worst], title=f"fuzz of {getattr(fn, '__name__', repr(fn))}"
                        f" (hypothesis, shrunk)", **kw)
        for r in rep.results:
            r.reason = f"{r.reason} [smallest failing case: {worst.describe()}]"
        rep.smallest_failure = worst
        return rep
    cases = random_margin_cases(examples, seed)
    rep = run_cases(fn, cases, title=f"fuzz of {getattr(fn, '__name__', repr(fn))} "
                    f"(seed {seed})", **kw)
    size = {c.name: c.shape[0] * c.shape[1] * c.shape[2] for c in cases}
    desc = {c.name: c.describe() for c in cases}
    for r in rep.results:
        if not r.ok:
            r.reason = f"{r.reason} [{desc[r.case]}]"
    rep.results.sort(key=lambda r: (r.ok, size[r.case]))
    if rep.failures:
        rep.smallest_failure = next(c for c in cases if c.name == rep.failures[0].case)
    return rep


# ------------------------------------------------------------------------------ pytest
def margin_loss_tests(fn: Callable, *, kind: str = "margin",
                      supports: Optional[Mapping[str, object]] = None,
                      cases: Optional[Sequence[Case]] = None,
                      dtypes: Iterable = (torch.float64, torch.float32),
                      devices: Iterable[str] = ("cpu",), atol_scale: float = 1.0,
                      gradcheck: bool = True) -> Callable[..., None]:
    """A pytest test function, one test item per (case, dtype, device)::

        from arcface_kernels.testing import margin_loss_tests
        from mypackage import my_arcface_loss
        test_my_arcface_loss = margin_loss_tests(my_arcface_loss, supports={...})

    ``kind="linear"`` runs the linear cross-entropy grid. Skipped cases are pytest skips.
    """
    import pytest
    grid = list(cases) if cases is not None else (MARGIN_GRID if kind == "margin"
                                                  else LINEAR_GRID)
    dts = [parse_dtype(d) for d in dtypes]
    devs = [str(d) for d in devices]
    params = [pytest.param(c, dt, dev, id=f"{c.name}-{str(dt)[6:]}-{dev}")
              for c in grid for dt in dts for dev in devs]

    @pytest.mark.parametrize("case, dtype, device", params)
    def test(case: Case, dtype: torch.dtype, device: str) -> None:
        rep = run_cases(fn, [case], kind=kind, supports=supports, dtypes=[dtype],
                        devices=[device], atol_scale=atol_scale, gradcheck=gradcheck)
        if not rep.failures and all(r.status == "skip" for r in rep.results):
            pytest.skip("; ".join(sorted({r.reason for r in rep.results})))
        rep.assert_ok()
    test.__name__ = f"test_{getattr(fn, '__name__', 'loss')}"
    return test


__all__ = ["check_margin_loss", "check_linear_cross_entropy", "fuzz_margin_loss",
           "margin_loss_tests", "random_margin_cases", "Case", "CaseResult", "Report",
           "MARGIN_GRID", "LINEAR_GRID", "DEFAULTS", "LINEAR_DEFAULTS", "PATTERNS", "FLOORS",
           "FACTOR", "build_inputs", "margin_oracle", "linear_oracle", "parse_dtype"]
