"""Running a user's loss over the cases, against the float64 oracle, into a report."""
from __future__ import annotations

import dataclasses
import inspect
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import reference_loss
from ._cases import DEFAULTS, IGNORING_PATTERNS, LINEAR_DEFAULTS, Case, build_inputs

#: Each dtype's error floor, relative to the largest magnitude of the quantity: float64
#: must be exact to well below float32's resolution (so float32 accumulation fails);
#: float32 and the half types get the rounding of the gradient they store, and the
#: float32 floor covers a logit scale s = 64 times a cosine's rounding.
FLOORS: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: torch.finfo(torch.float16).eps / 2,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2,
}
#: How many times naive PyTorch's own error at a dtype an implementation may make.
FACTOR = 4.0

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


def parse_dtype(text: Union[str, torch.dtype]) -> torch.dtype:
    """"float32" / "fp32" / torch.float32 -> torch.float32 (ValueError otherwise)."""
    if isinstance(text, torch.dtype):
        if text in DTYPE_NAMES:
            return text
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES.values())}, got {text}")
    aliases = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32",
               "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(text), str(text))
    for dt, n in DTYPE_NAMES.items():
        if n == name:
            return dt
    raise ValueError(f"dtype must be one of {list(DTYPE_NAMES.values())}, got {text!r}")


@dataclass
class CaseResult:
    """The outcome of one (case, dtype, device): status "pass", "fail", "skip" or
    "error" (the implementation raised), the relative errors of the loss and of the
    gradients of embeddings (dx) and weight (dw), the tolerance, and why."""

    case: str
    dtype: str
    device: str
    status: str
    errors: Dict[str, float] = field(default_factory=dict)
    tol: Dict[str, float] = field(default_factory=dict)
    reason: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "skip")


@dataclass
class Report:
    """Every :class:`CaseResult` of a check. ``print(report)`` shows a table;
    :meth:`assert_ok` raises AssertionError listing the failing cases."""

    title: str
    results: List[CaseResult] = field(default_factory=list)
    #: randomized checks: the smallest failing case found (shrunk with hypothesis)
    smallest_failure: Optional[Case] = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and any(r.status == "pass"
                                                       for r in self.results)

    @property
    def failures(self) -> List[CaseResult]:
        return [r for r in self.results if not r.ok]

    def failed_cases(self) -> List[str]:
        """Names of the cases with at least one failure or error."""
        seen: List[str] = []
        for r in self.failures:
            if r.case not in seen:
                seen.append(r.case)
        return seen

    def counts(self) -> Dict[str, int]:
        out = {"pass": 0, "fail": 0, "error": 0, "skip": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def table(self, only_failures: bool = False) -> str:
        rows = [("case", "dtype", "device", "status", "loss err", "dx err", "dw err", "tol",
                 "reason")]
        for r in self.results:
            if only_failures and r.ok:
                continue
            e = [(f"{r.errors[k]:.2e}" if k in r.errors else "-") for k in ("loss", "dx", "dw")]
            tol = f"{max(r.tol.values()):.1e}" if r.tol else "-"
            rows.append((r.case, r.dtype, r.device, r.status, *e, tol, r.reason))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        c = self.counts()
        return (f"{self.title}: {c['pass']} passed, {c['fail']} failed, {c['error']} "
                f"errors, {c['skip']} skipped")

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def assert_ok(self) -> None:
        """Raise AssertionError naming every failing case (with its errors and reason)."""
        if self.ok:
            return
        if not any(r.status == "pass" for r in self.results) and not self.failures:
            raise AssertionError(f"{self.title}: no case ran (all skipped):\n"
                                 + self.table())
        raise AssertionError(f"{self.summary()}; failing cases: "
                             f"{', '.join(self.failed_cases())}\n"
                             + self.table(only_failures=True))


# --------------------------------------------------------------------- what fn supports
def _normalize_supports(supports: Optional[Mapping[str, object]],
                        defaults: Mapping[str, object]) -> Optional[Dict[str, object]]:
    if supports is None:
        return None
    if not isinstance(supports, Mapping):
        raise TypeError(f"supports must be a mapping of setting -> True or allowed values, "
                        f"got {type(supports).__name__}")
    out: Dict[str, object] = {}
    for key, val in supports.items():
        if key not in defaults:
            raise ValueError(f"supports: unknown setting {key!r} (known: {list(defaults)})")
        if val is True or val is False:
            out[key] = val
        elif isinstance(val, (str, int, float)):
            out[key] = frozenset([val])
        else:
            out[key] = frozenset(val)
    return out


def accepted_keywords(fn: Callable) -> Optional[set]:
    """The keyword arguments fn takes (None: any, through **kwargs or no signature)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


def needs(case: Case, supports: Optional[Mapping[str, object]],
          defaults: Mapping[str, object]) -> Tuple[Optional[str], Dict[str, object]]:
    """(why the case is skipped or None, the keyword arguments to pass).

    Without ``supports`` every setting is passed. With it, only the declared settings
    are passed (and of those only the ones fn takes as keywords: a setting declared with
    a single value may be fixed inside fn); a case that sets an undeclared setting to
    other than its default, or a declared one to a value outside the allowed ones, is
    skipped."""
    st = case.full_settings(defaults)
    if supports is None:
        return None, st
    if case.pattern in IGNORING_PATTERNS and not supports.get("ignore_index", False):
        return "needs ignore_index (its labels have ignored rows)", {}
    kwargs: Dict[str, object] = {}
    for key, val in st.items():
        allowed = supports.get(key, False)
        if allowed is False:
            if val != defaults[key]:
                return f"needs {key}={val!r} (not declared in supports)", {}
            continue
        if allowed is not True and val not in allowed:
            return f"needs {key}={val!r} (supports {sorted(map(str, allowed))})", {}
        kwargs[key] = val
    return None, kwargs


# ----------------------------------------------------------------------------- oracles
def margin_oracle(x: Tensor, w: Tensor, y: Tensor, **settings: object) -> Tensor:
    """The margin loss by :func:`arcface_kernels.reference.reference_loss` (plain
    autograd over materialized logits)."""
    return reference_loss(x, w, y, **settings)


def linear_oracle(x: Tensor, w: Tensor, y: Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  softcap: Optional[float] = None, shift: bool = False,
                  bias: Optional[Tensor] = None) -> Tensor:
    """Linear cross-entropy by F.cross_entropy on materialized logits (independent of the
    margin reference). ``shift``: position t predicts label t + 1 of [..., T] labels;
    ``softcap``: logits = softcap * tanh(logits / softcap). "mean" is over the rows not
    ignored, and 0 when every row is ignored (F.cross_entropy would give NaN)."""
    if shift:
        x, y = x[..., :-1, :], y[..., 1:]
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    logits = x2 @ w.T
    if bias is not None:
        logits = logits + bias
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, y2, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if reduction == "none":
        return rows.view(y.shape)
    if reduction == "sum":
        return rows.sum()
    valid = (y2 != ignore_index).sum()
    return rows.sum() / valid.clamp(min=1)


# ------------------------------------------------------------------------------ running
def _rel_err(got: Tensor, want: Tensor, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor) in float64 (absolute where that is 0).

    The loss uses floor 1: it is a difference of logits (lse - z_y), which may cancel to
    about 0 while its rounding error stays that of the logits. The gradients use the
    magnitude of the terms they are summed from (:func:`_natural_scales`), so gradients
    far below 1 (huge norms) are still compared relatively, and exactly cancelled ones
    are not compared as relative noise."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if want.numel() == 0:
        return 0.0
    scale = max(want.abs().max().item(), floor)
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def _run(fn: Callable, x: Tensor, w: Tensor, y: Tensor, kwargs: Mapping[str, object],
         gout_seed: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, d embeddings, d weight) of fn with a fixed non-uniform upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w, y, **kwargs)
    if not isinstance(loss, Tensor):
        raise TypeError(f"the loss function must return a Tensor, got {type(loss).__name__}")
    g = torch.Generator().manual_seed(gout_seed)
    gout = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(
        device=loss.device, dtype=loss.dtype)
    dx, dw = torch.autograd.grad(loss, (x, w), gout, allow_unused=True)
    dx = torch.zeros_like(x) if dx is None else dx
    dw = torch.zeros_like(w) if dw is None else dw
    return loss.detach(), dx.detach(), dw.detach()


def _float64_sensitivity(oracle: Callable, x: Tensor, w: Tensor, y: Tensor,
                         kwargs: Mapping[str, object], want) -> Tuple[Tensor, Tensor, Tensor]:
    """What naive float64 PyTorch's own rounding moves: of two reruns of the oracle, the
    one farther from ``want`` per quantity. One sums the D dimension in another order
    (a cosine at +-1 rounds to one side or the other); the other moves every input by
    at most one unit in the last place (a normalized vector's direction). Targets at
    +-1 and psi' at its floor amplify such differences many-fold, and the tolerance
    must scale with that, not with float64's unit roundoff."""
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(x.shape[-1], generator=g)
    inv = torch.argsort(perm)
    a = _run(oracle, x[..., perm], w[:, perm], y, kwargs)
    a = (a[0], a[1][..., inv], a[2][:, inv])
    ulp = 2.0 ** -52

    def nudge(t: Tensor) -> Tensor:
        return t * (1.0 + ulp * (2.0 * torch.rand(t.shape, generator=g,
                                                  dtype=torch.float64) - 1.0))
    b = _run(oracle, nudge(x), nudge(w), y, kwargs)
    out = []
    for qa, qb, qw in zip(a, b, want):
        finite = torch.isfinite(qw)
        ea = _rel_err(qa[finite], qw[finite]) if bool(torch.isfinite(qa[finite]).all()) \
            else 0.0
        eb = _rel_err(qb[finite], qw[finite]) if bool(torch.isfinite(qb[finite]).all()) \
            else 0.0
        out.append(qa if ea >= eb else qb)
    return tuple(out)


def _natural_scales(x: Tensor, w: Tensor, y: Tensor, settings: Mapping[str, object],
                    loss_shape) -> Tuple[float, float]:
    """The magnitudes the gradients of embeddings and weight are made of, before any
    cancellation: 2 s a_i g_i for a row of x and 2 s b_j sum_i g_i for a row of w (g_i
    the weight of row i in the reduced loss, a and b the inverse norms, their median so
    that a zero row does not set the scale; without normalization the other side's
    norm). Rounding errors scale with these, not with the result: where the normalization
    cancels the gradient exactly (D = 1) the result is rounding noise."""
    x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1)
    if x2.shape[0] == 0 or w.shape[0] == 0:
        return 1.0, 1.0
    s = float(settings.get("s", 1.0))
    g = torch.Generator().manual_seed(1)
    gout = torch.rand(tuple(loss_shape), generator=g, dtype=torch.float64) + 0.5
    valid = (y2 != settings.get("ignore_index", -100)).double()
    if settings.get("reduction", "mean") == "none":
        rows = gout.reshape(-1)[:valid.numel()] * valid if gout.numel() == valid.numel() \
            else valid
    elif settings.get("reduction", "mean") == "sum":
        rows = float(gout) * valid
    else:
        rows = float(gout) * valid / max(1.0, float(valid.sum()))
    xn = torch.linalg.vector_norm(x2, dim=1)
    wn = torch.linalg.vector_norm(w.double(), dim=1)
    if settings.get("normalize", True):
        a = (1.0 / xn.clamp(min=1e-12)).median().item()
        b = (1.0 / wn.clamp(min=1e-12)).median().item()
    else:
        a, b = wn.median().item(), xn.median().item()
    return 2 * s * a * rows.max().item(), 2 * s * b * rows.sum().item()


def _compare(case: Case, dtype: torch.dtype, device: str, fn: Callable, oracle: Callable,
             kwargs: Dict[str, object], oracle_kwargs: Dict[str, object],
             defaults: Mapping[str, object], atol_scale: float) -> CaseResult:
    name = DTYPE_NAMES[dtype]
    res = CaseResult(case.name, name, device, "pass")
    x, w, y = build_inputs(case, dtype, defaults)
    # the oracle sees exactly the inputs fn sees (rounded to dtype), in float64
    want = _run(oracle, x.double(), w.double(), y, oracle_kwargs)
    naive = None
    if dtype == torch.float64:
        naive = _float64_sensitivity(oracle, x.double(), w.double(), y, oracle_kwargs, want)
    else:
        # naive PyTorch at its best in this precision: float32 math, gradients stored in
        # the dtype (half-precision math throughout over- and underflows)
        try:
            lo = _run(oracle, x.float(), w.float(), y, oracle_kwargs)
            naive = (lo[0], lo[1].to(dtype), lo[2].to(dtype))
        except (RuntimeError, ValueError):
            naive = None
    try:
        got = _run(fn, x.to(device), w.to(device), y.to(device), kwargs)
    except Exception as e:  # the implementation's own failure is a finding, not a crash
        res.status, res.reason = "error", f"{type(e).__name__}: {str(e)[:160]}"
        res.detail = traceback.format_exc(limit=4)
        return res
    reasons = []
    natural = dict(zip(("dx", "dw"), _natural_scales(x, w, y, oracle_kwargs,
                                                     want[0].shape)))
    for q, g, r, nv in zip(("loss", "dx", "dw"), got, want,
                           naive if naive is not None else (None, None, None)):
        if tuple(g.shape) != tuple(r.shape):
            reasons.append(f"{q} shape {tuple(g.shape)} != {tuple(r.shape)}")
            res.errors[q] = math.inf
            continue
        g_bad = ~torch.isfinite(g.detach().double().cpu())
        r_bad = ~torch.isfinite(r)
        # a value beyond the dtype's range is rightly inf in it (e.g. the gradient of a
        # zero-norm row, 1e12 times larger than its class's, in float16)
        big = r.abs() > torch.finfo(g.dtype if g.is_floating_point() else dtype).max
        wrong = g_bad & ~r_bad & ~big
        if bool(wrong.any()):
            reasons.append(f"{q} is not finite ({int(wrong.sum())} value(s)) where the "
                           f"oracle is")
            res.errors[q] = math.inf
            continue
        ok_mask = ~r_bad & ~big
        gg, rr = g.detach().double().cpu()[ok_mask], r[ok_mask]
        floor = 1.0 if q == "loss" else natural[q]
        err = _rel_err(gg, rr, floor)
        naive_err = 0.0
        if nv is not None and tuple(nv.shape) == tuple(r.shape):
            nvv = nv.detach().double().cpu()[ok_mask]
            if bool(torch.isfinite(nvv).all()):
                naive_err = _rel_err(nvv, rr, floor)
        tol = atol_scale * (FACTOR * naive_err + FLOORS[dtype])
        res.errors[q], res.tol[q] = err, tol
        if not err <= tol:
            reasons.append(f"{q} error {err:.2e} > tol {tol:.1e}"
                           + (f" (naive {name}: {naive_err:.1e})" if naive_err else ""))
    if reasons:
        res.status, res.reason = "fail", "; ".join(reasons)
    return res


def _gradcheck(case: Case, device: str, fn: Callable, kwargs: Dict[str, object],
               defaults: Mapping[str, object]) -> CaseResult:
    res = CaseResult(f"gradcheck/{case.name}", "float64", device, "pass")
    # finite differences on a small instance of the case: 2 (N + C K) D evaluations
    n, c, d = case.shape
    small = dataclasses.replace(case, shape=(min(n, 4), min(c, 5), min(d, 3)))
    x, w, y = build_inputs(small, torch.float64, defaults)
    x = x.to(device).requires_grad_(True)
    w = w.to(device).requires_grad_(True)
    y = y.to(device)
    try:
        ok = torch.autograd.gradcheck(lambda a, b: fn(a, b, y, **kwargs), (x, w), eps=1e-6,
                                      atol=1e-6, rtol=1e-4, raise_exception=False)
    except Exception as e:
        res.status, res.reason = "error", f"{type(e).__name__}: {str(e)[:160]}"
        return res
    if not ok:
        res.status, res.reason = "fail", "analytic and numerical gradients differ"
    return res


def run_cases(fn: Callable, cases: Sequence[Case], *, kind: str = "margin",
              supports: Optional[Mapping[str, object]] = None,
              dtypes: Iterable = (torch.float64, torch.float32),
              devices: Iterable[str] = ("cpu",), atol_scale: float = 1.0,
              gradcheck: bool = True, title: Optional[str] = None,
              defaults: Optional[Mapping[str, object]] = None) -> Report:
    """Run ``cases`` (kind "margin" or "linear") over dtypes x devices into a Report.

    ``defaults`` (or an attribute ``fn.defaults``) replaces some of the settings a case
    does not set itself: e.g. {"margin_mode": "none", "target_grad": "straight_through"}
    to check an implementation with insightface's current semantics on every case."""
    if kind not in ("margin", "linear"):
        raise ValueError(f"kind must be 'margin' or 'linear', got {kind!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not (isinstance(atol_scale, (int, float)) and atol_scale > 0):
        raise ValueError(f"atol_scale must be a positive number, got {atol_scale!r}")
    base = DEFAULTS if kind == "margin" else LINEAR_DEFAULTS
    oracle = margin_oracle if kind == "margin" else linear_oracle
    if supports is None:
        supports = getattr(fn, "supports", None)
    if defaults is None:
        defaults = getattr(fn, "defaults", None)
    if defaults:
        unknown = [k for k in defaults if k not in base]
        if unknown:
            raise ValueError(f"defaults: unknown setting(s) {unknown} (known: {list(base)})")
        defaults = {**base, **defaults}
    else:
        defaults = base
    sup = _normalize_supports(supports, defaults)
    takes = accepted_keywords(fn)
    dts = [parse_dtype(d) for d in dtypes]
    devs = [str(d) for d in devices]
    report = Report(title or f"{kind} checks of {getattr(fn, '__name__', repr(fn))}")
    for case in cases:
        why, kwargs = needs(case, sup, defaults)
        if sup is not None and takes is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in takes}
        oracle_kwargs = case.full_settings(defaults)
        for dev in devs:
            if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
                for dt in dts:
                    report.results.append(CaseResult(case.name, DTYPE_NAMES[dt], dev,
                                                     "skip", reason="no CUDA device"))
                continue
            for dt in dts:
                if why is not None:
                    report.results.append(CaseResult(case.name, DTYPE_NAMES[dt], dev,
                                                     "skip", reason=why))
                    continue
                report.results.append(_compare(case, dt, dev, fn, oracle, kwargs,
                                               oracle_kwargs, defaults, atol_scale))
            if gradcheck and case.gradcheck and torch.float64 in dts and why is None:
                report.results.append(_gradcheck(case, dev, fn, kwargs, defaults))
    return report
