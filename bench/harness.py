"""How the benchmark measures: timing, peak memory, TFLOP/s, the sweep and its CSV.

* Time: ``triton.testing.do_bench`` on CUDA (event timing, L2 flushed between runs,
  gradients reset; median and 20/80% quantiles); ``torch.utils.benchmark.Timer`` on the
  CPU (with torch's intra-op threads as set), in ``rounds`` rounds that interleave the
  providers so that load from other processes hits all of them alike; the rounds are
  merged with ``Measurement.merge`` and the median and quantiles taken over every timed
  run. Each (provider, mode) is called once or twice untimed first (compilation,
  autotuning, first touch).
* Memory: :func:`arcface_kernels._memory.peak_memory` around one more untimed call:
  bytes allocated beyond what was live before it (CUDA: max_memory_allocated; CPU: the
  profiler's allocation events). ``peak_mem_mib`` counts everything the call allocates, the gradients dx and
  dW included; ``workspace_mib`` is that minus the gradients: what a fused backend keeps
  bounded (flat in C), and what grows with N x C in the reference.
* TFLOP/s: 2NCD for the forward, 6NCD for the backward, 8NCD for both (model FLOPs of
  the two matmuls of the forward and the recompute + two gradient matmuls of the
  backward), set against a matmul rate measured in the same run (bf16 on CUDA, fp32 on
  the CPU): ``frac_of_matmul``.
"""
from __future__ import annotations

import csv
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from arcface_kernels._memory import peak_memory

from .providers import Bound, Inputs, Problem, Provider, available_bytes, dtype_name, \
    is_oom, make_inputs

MODES = ("forward", "backward", "full")
FLOP_FACTOR = {"forward": 2, "backward": 6, "full": 8}
QUANTILES = (0.2, 0.8)

COLUMNS = ["provider", "loss", "mode", "device", "dtype", "N", "C", "D", "status", "message",
           "time_ms", "time_q20_ms", "time_q80_ms", "n_timed", "peak_mem_mib",
           "workspace_mib", "inputs_mib", "gflop", "tflops", "matmul_tflops",
           "frac_of_matmul", "time_vs_reference", "mem_vs_reference"]

MIB = float(1 << 20)


def model_flops(mode: str, n: int, c: int, d: int) -> int:
    """FLOPs counted for one call: 2NCD forward, 6NCD backward, 8NCD forward+backward."""
    if mode not in FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return FLOP_FACTOR[mode] * n * c * d


@dataclass
class TimeStats:
    """Times of one (provider, mode) in milliseconds."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    n: int


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_from_times(times_ms: Sequence[float]) -> TimeStats:
    """Median and 20/80% quantiles of a list of run times (ms)."""
    if not times_ms:
        raise ValueError("no times to summarize")
    return TimeStats(statistics.median(times_ms), _quantile(times_ms, QUANTILES[0]),
                     _quantile(times_ms, QUANTILES[1]), len(times_ms))


def time_cuda(fn: Callable[[], object], leaves: List[torch.Tensor], warmup_ms: float = 25,
              rep_ms: float = 100) -> List[float]:
    """Run times (ms) of ``fn`` by triton.testing.do_bench (gradients of ``leaves`` reset
    before each run)."""
    from triton.testing import do_bench
    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                         return_mode="all")
        return [float(t) for t in times]
    except (AssertionError, TypeError):  # older triton: no return_mode="all"
        med, lo, hi = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                               quantiles=[0.5, *QUANTILES])
        return [float(lo), float(med), float(hi)]


def time_cpu(fn: Callable[[], object], estimate_s: float, min_time_s: float, label: str = "",
             sub_label: str = "", description: str = ""):
    """One torch.utils.benchmark Measurement of ``fn`` on the CPU: a single run when one
    run already takes ``min_time_s`` (the warm-up measured it), else blocked_autorange."""
    from torch.utils import benchmark
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=torch.get_num_threads(), label=label,
                            sub_label=sub_label, description=description)
    if estimate_s >= min_time_s:
        return timer.timeit(1)
    return timer.blocked_autorange(min_run_time=min_time_s)


def matmul_tflops(device: torch.device, min_time_s: float = 1.0) -> float:
    """A matmul rate measured here: bf16 8192^3 on CUDA (do_bench median), fp32 2048^3 on
    the CPU (torch.utils.benchmark, fastest block); random operands."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    if device.type == "cuda":
        med_ms = statistics.median(time_cuda(lambda: a @ b, [], 25, 200))
        sec = med_ms / 1e3
    else:  # the fastest block: on a shared CPU the median mixes in other work
        a @ b
        sec = min(time_cpu(lambda: a @ b, 0.0, min_time_s, "matmul").times)
    return 2 * n ** 3 / sec / 1e12


def mode_callable(bound: Bound, mode: str, reset_grads: bool) -> Callable[[], object]:
    """The callable timed for ``mode``: forward (with autograd on), backward (of one kept
    forward, retain_graph) or full (forward + backward). ``reset_grads`` sets the leaves'
    .grad to None in the call (on CUDA do_bench does that itself, untimed)."""
    if mode == "forward":
        return bound.loss
    if mode == "full":
        def full():
            if reset_grads:
                bound.zero_grads()
            bound.loss().backward()
        return full
    if mode == "backward":
        loss = (bound.retained_loss or bound.loss)()

        def backward():
            if reset_grads:
                bound.zero_grads()
            loss.backward(retain_graph=True)
        return backward
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def call_memory(fn: Callable[[], object], bound: Bound, device: torch.device):
    """(peak bytes beyond what was live before ``fn()``, bytes of the gradients it
    produced). The gradients are reset first, so that they count as new allocations."""
    bound.zero_grads()
    peak, out = peak_memory(fn, device)
    del out
    grads = sum(t.grad.numel() * t.grad.element_size() for t in bound.leaves
                if t.grad is not None)
    bound.zero_grads()
    return peak, grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(p: Problem, prov: Provider, mode: str, status: str, message: str = "", **kw) -> Dict:
    row = {c: "" for c in COLUMNS}
    row.update(provider=prov.name, loss=prov.loss_mode(p.loss), mode=mode,
               device=p.device.type, dtype=dtype_name(p.dtype), N=p.N, C=p.C, D=p.D,
               status=status, message=message)
    row.update(kw)
    return row


def _fmt(v: Optional[float], digits: int = 4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return float(f"{v:.{digits}g}")


def add_reference_ratios(rows: List[Dict]) -> None:
    """Fill time_vs_reference / mem_vs_reference against the reference row of the same
    shape, dtype, mode and loss (left empty where there is none)."""
    ref = {}
    for r in rows:
        if r["provider"] == "reference" and r["status"] == "ok":
            ref[(r["device"], r["dtype"], r["N"], r["C"], r["D"], r["mode"], r["loss"])] = r
    for r in rows:
        base = ref.get((r["device"], r["dtype"], r["N"], r["C"], r["D"], r["mode"],
                        r["loss"]))
        if base is None or r["status"] != "ok":
            continue
        if r["time_ms"] != "" and base["time_ms"]:
            r["time_vs_reference"] = _fmt(r["time_ms"] / base["time_ms"])
        if r["peak_mem_mib"] != "" and base["peak_mem_mib"]:
            r["mem_vs_reference"] = _fmt(r["peak_mem_mib"] / base["peak_mem_mib"])


class CsvSink:
    """Appends rows to a CSV as they are produced (a killed run keeps what it had)."""

    def __init__(self, path: Optional[str], append: bool = False):
        self.path = path
        if path and not (append and os.path.exists(path)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, COLUMNS).writeheader()

    def write(self, rows: Iterable[Dict]) -> None:
        if not self.path:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            for r in rows:
                w.writerow(r)


def _timed_call(fn: Callable[[], object], dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def run_problem(p: Problem, providers: Sequence[Provider], modes: Sequence[str], *,
                rounds: int = 3, min_time_s: float = 0.5, memory: bool = True,
                matmul: Optional[float] = None, warmup_ms: float = 25, rep_ms: float = 100,
                progress=None, log: Callable[[str], None] = print,
                deadline: Optional[float] = None) -> List[Dict]:
    """Measure every provider on one problem; returns one row per (provider, mode).
    ``deadline`` (time.monotonic()): providers not set up by then are skipped.

    A provider that cannot run gives "skipped" rows with the reason; one that raises
    gives "error" (or "oom") rows for the modes that failed, with the exception."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    dev = p.device
    inp: Inputs = make_inputs(p)
    inputs_mib = _fmt(inp.nbytes / MIB)
    steps_per = len(modes) * (rounds + (1 if memory else 0))
    live: Dict[str, Bound] = {}
    fns: Dict[tuple, Callable] = {}
    estimate: Dict[tuple, float] = {}
    failed: Dict[tuple, tuple] = {}     # (provider, mode) -> (status, message)
    peaks: Dict[tuple, tuple] = {}      # (provider, mode) -> (peak bytes, grad bytes)
    skipped: Dict[str, str] = {}        # provider -> reason

    def fail(name: str, mode: str, e: BaseException, where: str):
        status = "oom" if is_oom(e) else "error"
        first = str(e).splitlines()[0] if str(e) else ""
        msg = f"{where}: {type(e).__name__}: {first}"[:300]
        failed[(name, mode)] = (status, msg)
        fns.pop((name, mode), None)
        if status == "oom":
            _free(dev)
        log(f"  {name} {mode}: {status}: {msg}")

    # Set-up and warm-up (compiles, autotunes, first-touch) of every provider.
    for prov in providers:
        reason = prov.skip_reason(p)
        need = prov.memory_estimate(p)
        if reason is None and need is not None:
            free = available_bytes(dev)
            if free is not None and need > 0.9 * free:
                reason = (f"needs about {need / 2**30:.1f} GiB beyond the inputs, "
                          f"{free / 2**30:.1f} GiB free")
        if reason is None and deadline is not None and time.monotonic() > deadline:
            reason = "the run's time budget (--time-budget) was spent"
        if reason is not None:
            skipped[prov.name] = reason
            if progress is not None:
                progress.update(steps_per)
            continue
        try:
            live[prov.name] = prov.bind(p, inp)
        except Exception as e:  # noqa: BLE001 - any failure of a provider is recorded
            for m in modes:
                fail(prov.name, m, e, "set-up")
            continue
        for m in modes:
            try:
                fn = mode_callable(live[prov.name], m, reset_grads=dev.type != "cuda")
                t = _timed_call(fn, dev)  # first call: compiles, autotunes, first touch
                if t < 1.0:               # cheap enough to get a cleaner estimate
                    t = _timed_call(fn, dev)
                estimate[(prov.name, m)] = t
                fns[(prov.name, m)] = fn
            except Exception as e:  # noqa: BLE001
                fail(prov.name, m, e, "warm-up")
                if memory and progress is not None:
                    progress.update(1)
                continue
            if memory:  # the second call, untimed, under the memory measurement
                try:
                    peaks[(prov.name, m)] = call_memory(fn, live[prov.name], dev)
                except Exception as e:  # noqa: BLE001
                    fail(prov.name, m, e, "memory")
                if progress is not None:
                    progress.update(1)

    # Timing: rounds interleave the providers.
    samples: Dict[tuple, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for prov in providers:
            if prov.name in skipped:
                continue
            for m in modes:
                key = (prov.name, m)
                if key in fns:
                    try:
                        if dev.type == "cuda":
                            samples[key].extend(time_cuda(
                                fns[key], live[prov.name].leaves, warmup_ms, rep_ms))
                        else:
                            samples[key].append(time_cpu(
                                fns[key], estimate[key], min_time_s, label=m,
                                sub_label=f"N={p.N} C={p.C} D={p.D}",
                                description=prov.name))
                    except Exception as e:  # noqa: BLE001
                        fail(prov.name, m, e, "timing")
                if progress is not None:
                    progress.update(1)

    rows: List[Dict] = []
    for prov in providers:
        for m in modes:
            key = (prov.name, m)
            if prov.name in skipped:
                rows.append(_row(p, prov, m, "skipped", skipped[prov.name],
                                 inputs_mib=inputs_mib))
                continue
            if key in failed:
                status, msg = failed[key]
                rows.append(_row(p, prov, m, status, msg, inputs_mib=inputs_mib))
                continue
            st = _summarize(samples.get(key, []), dev)
            peak, grads = peaks.get(key, (None, None))
            flop = model_flops(m, p.N, p.C, p.D)
            tflops = flop / (st.median_ms / 1e3) / 1e12 if st else None
            rows.append(_row(
                p, prov, m, "ok",
                time_ms=_fmt(st.median_ms) if st else "",
                time_q20_ms=_fmt(st.q20_ms) if st else "",
                time_q80_ms=_fmt(st.q80_ms) if st else "",
                n_timed=st.n if st else "",
                peak_mem_mib=_fmt(peak / MIB) if peak is not None else "",
                workspace_mib=_fmt(max(peak - grads, 0) / MIB) if peak is not None else "",
                inputs_mib=inputs_mib, gflop=_fmt(flop / 1e9),
                tflops=_fmt(tflops), matmul_tflops=_fmt(matmul),
                frac_of_matmul=_fmt(tflops / matmul) if (tflops and matmul) else ""))
    live.clear()
    del inp
    _free(dev)
    add_reference_ratios(rows)
    return rows


def _summarize(samples: list, device: torch.device) -> Optional[TimeStats]:
    if not samples:
        return None
    if device.type == "cuda":
        return stats_from_times(samples)
    from torch.utils import benchmark
    merged = benchmark.Measurement.merge(samples)
    times_ms = [t * 1e3 for m in merged for t in m.times]
    return stats_from_times(times_ms)


def run_sweep(problems: Sequence[Problem], providers: Sequence[Provider],
              modes: Sequence[str], *, csv_path: Optional[str] = None, rounds: int = 3,
              min_time_s: float = 0.5, memory: bool = True, matmul: Optional[float] = None,
              progress: bool = True, warmup_ms: float = 25, rep_ms: float = 100,
              log: Callable[[str], None] = print, append: bool = False,
              time_budget_s: Optional[float] = None) -> List[Dict]:
    """Run every problem (shape) with every provider and mode; rows go to ``csv_path`` as
    each problem finishes (appended to an existing file with ``append``). Past
    ``time_budget_s`` seconds, providers not yet set up are skipped with that reason.
    Returns the rows of this run (see COLUMNS)."""
    sink = CsvSink(csv_path, append=append)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    total = len(problems) * len(providers) * len(modes) * (rounds + (1 if memory else 0))
    rows: List[Dict] = []
    with _progress_bar(total, progress) as bar:
        for p in problems:
            bar.set_postfix_str(f"N={p.N} C={p.C} D={p.D} {dtype_name(p.dtype)}")
            got = run_problem(p, providers, modes, rounds=rounds, min_time_s=min_time_s,
                              memory=memory, matmul=matmul, warmup_ms=warmup_ms,
                              rep_ms=rep_ms, progress=bar, log=log, deadline=deadline)
            sink.write(got)
            rows.extend(got)
    return rows


class _NoBar:
    """What run_sweep needs of a tqdm bar, doing nothing (no tqdm, or --quiet)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_description_str(self, s: str = "", refresh: bool = True) -> None:
        pass


def _progress_bar(total: int, progress: bool):
    """A tqdm bar when asked for and tqdm is installed (the bench extra), else a no-op."""
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc="bench", unit="step", dynamic_ncols=True)
    return _NoBar()


def write_csv(path: str, rows: Sequence[Dict]) -> None:
    """Write ``rows`` to ``path`` (replacing it), columns COLUMNS."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def read_csv(path: str) -> List[Dict]:
    """Rows of a results CSV, numbers converted back to int/float."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                if k in ("N", "C", "D", "n_timed") and v != "":
                    r[k] = int(v)
                elif k not in ("provider", "loss", "mode", "device", "dtype", "status",
                               "message") and v != "":
                    r[k] = float(v)
            out.append(r)
    return out
