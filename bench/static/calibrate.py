"""Calibration of the static report on a GPU: the same steps the report predicts, measured.

    python -m bench.static.calibrate --out FILE.json [--backends triton,cpp]
                                     [--shapes NxCxDxLOSS,...] [--reps 3]

For each backend and shape (bf16; the report's shapes by default) it runs the step
``arcface_loss(...)`` forward + backward on real tensors and records:

* measured_ms {fwd, bwd, total}: CUDA-event times, median of ``--reps`` steps after a
  warm-up step (fwd: the forward alone; bwd: total - fwd);
* extra_bytes: peak allocated beyond inputs and gradients (max_memory_allocated);
* host_enqueue_ms: CPU time until the step call returns, before synchronizing;
* host_syncs: synchronizing calls counted by torch.cuda.set_sync_debug_mode("warn");
* kernels: device time and launch count per kernel name, from torch.profiler.

Then ``python -m bench static --measured FILE.json`` shows the measurements beside the
predictions (``bench/gpu_check.sh`` does both). Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
import warnings
from typing import List, Optional, Sequence

import torch

from .report import LOSS_KWARGS, SHAPES, _git


def _parse_shapes(text: Optional[str]):
    if not text:
        return SHAPES
    out = []
    for item in text.split(","):
        n, c, d, loss = item.split("x")
        out.append((int(n), int(c), int(d), loss))
    return out


def _step(backend, x, w, y, loss):
    import arcface_kernels as ak
    return ak.arcface_loss(x, w, y, backend=backend, **LOSS_KWARGS[loss])


def _events_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(backend: str, n: int, c: int, d: int, loss: str, reps: int) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(c, d, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, c, (n,), device=dev, generator=g)

    def full():
        x.grad = w.grad = None
        _step(backend, x, w, y, loss).backward()

    def fwd():
        with torch.no_grad():
            _step(backend, x, w, y, loss)

    full()
    torch.cuda.synchronize()
    total = _events_ms(full, reps)
    fwd_ms = _events_ms(lambda: _step(backend, x, w, y, loss), reps)
    # memory: one step from a clean peak, gradients excluded
    x.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(backend, x, w, y, loss).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = x.grad.untyped_storage().nbytes() + w.grad.untyped_storage().nbytes()
    # host enqueue time and synchronizing calls of one step
    x.grad = w.grad = None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        _step(backend, x, w, y, loss).backward()
        enqueue = time.perf_counter() - t0
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(wn.message).splitlines()[0] for wn in caught
             if "synchroniz" in str(wn.message).lower()]
    # per-kernel device time
    from torch.profiler import ProfilerActivity, profile
    x.grad = w.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        full()
        torch.cuda.synchronize()
    kern = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kern.setdefault(e.name, dict(name=e.name, launches=0, ms=0.0))
            k["launches"] += 1
            k["ms"] += e.device_time / 1e3 if hasattr(e, "device_time") else e.cuda_time / 1e3
    x = w = y = None   # free them (shared with the closures above) before empty_cache
    torch.cuda.empty_cache()
    return dict(backend=backend, N=n, C=c, D=d, dtype="bf16", loss=loss,
                measured_ms=dict(fwd=fwd_ms, bwd=total - fwd_ms, total=total),
                measured_tflops=8.0 * n * c * d / (total / 1e3) / 1e12,
                extra_bytes=peak - grads, host_enqueue_ms=enqueue * 1e3,
                host_syncs=len(syncs), sync_messages=syncs[:10],
                kernels=sorted(kern.values(), key=lambda k: -k["ms"])[:25])


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _events_ms(lambda: a @ b, 10)
    return 2 * 8192 ** 3 / (ms / 1e3) / 1e12


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.static.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", default="triton,cpp")
    ap.add_argument("--shapes", default=None, help="NxCxDxLOSS items (LOSS: arcface, linear_ce)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("calibration needs a CUDA device")
    import arcface_kernels as ak
    rows: List[dict] = []
    for backend in args.backends.split(","):
        if backend not in ak.available_backends():
            print(f"calibrate: {backend} not available: {ak.backend_status().get(backend)}",
                  file=sys.stderr)
            continue
        for n, c, d, loss in _parse_shapes(args.shapes):
            print(f"calibrate: {backend} N={n} C={c} D={d} {loss}", file=sys.stderr, flush=True)
            try:
                rows.append(measure(backend, n, c, d, loss, args.reps))
            except Exception as e:   # keep going: one failure must not lose the others
                rows.append(dict(backend=backend, N=n, C=c, D=d, dtype="bf16", loss=loss,
                                 error=f"{type(e).__name__}: {e}"[:500]))
                torch.cuda.empty_cache()
            with open(args.out, "w") as f:   # written after each shape: a timeout keeps them
                json.dump(_doc(rows, None), f, indent=1)
    with open(args.out, "w") as f:
        json.dump(_doc(rows, matmul_tflops()), f, indent=1)
    print(f"calibrate: wrote {args.out}", file=sys.stderr)
    return 0


def _doc(rows, mm) -> dict:
    import triton
    return dict(schema="arcface-kernels static calibration, v1",
                meta=dict(date_utc=_dt.datetime.now(_dt.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M:%S"), gpu=torch.cuda.get_device_name(0),
                    torch=torch.__version__, triton=triton.__version__,
                    git_commit=_git("rev-parse", "HEAD"), matmul_tflops=mm),
                shapes=rows)


if __name__ == "__main__":
    sys.exit(main())
