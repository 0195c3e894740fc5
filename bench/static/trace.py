"""The host plan of one training step, without a GPU: allocations, kernel launches, host
syncs and host work of a backend's launch path.

A step is ``arcface_loss(x, w, labels, backend=...)`` and its backward, on CUDA tensors
of a torch ``FakeTensorMode`` (shapes, dtypes and devices, no data, no memory). The
kernels are stubbed, everything else runs for real:

* the Python layers (``arcface_loss``, the op's autograd formula, the Triton launchers in
  ``triton_kernels/launch.py``) run as they are; the launch module's ``_launch`` records
  each Triton launch (kernel, grid, arguments, constexprs) instead of making it;
* the cpp backend's CUDA host code (``csrc/cuda/host.cpp``) runs in the extension's dry run
  (``arcface_kernels._C.cuda_dry_run_fwd/bwd``), whose runner records each kernel launch;
* the backward is the autograd graph of the step, walked node by node in the order of
  the engine (:func:`run_backward`; the engine itself needs a CUDA build of torch to run
  on CUDA tensors).

:class:`Tracer`, a TorchDispatchMode above the FakeTensorMode, sees every ATen op of all
of it, the ones the C++ host code issues included, and records:

* memory: each new storage is an allocation of its size rounded up to 512 bytes (the CUDA
  caching allocator's block size, which its ``max_memory_allocated`` counts); a storage is
  freed when its last reference dies. The peak is exact for the allocator's count of
  allocated bytes, though not for its reserved (cached) bytes;
* device work: every op that is not a view, an allocation or a metadata query launches one
  kernel (a GEMM for mm / addmm, else element-wise or reduction work over its operands);
* host syncs: ``.item()`` / ``bool(tensor)`` / ``.tolist()`` (``_local_scalar_dense``,
  ``is_nonzero``) of a GPU tensor, ops with data-dependent output shapes (``nonzero``,
  ``masked_select``, ...), copies between the CPU and the GPU (``copy_`` waits for the
  stream), and ``torch.cuda.synchronize``. Each is given a stand-in result (0, False, an
  empty tensor) and the step goes on. Ops that are only compositions (``.to``,
  ``.contiguous``, ``reshape``, ...) are decomposed, so that the copies they make are
  counted too.

Nothing here is imported by the library.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import sysconfig
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import hardware as hw

aten = torch.ops.aten

#: Ops whose result needs the device's data on the host: each is one host sync.
SYNC_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.is_nonzero.default: "bool(tensor)",
    aten.item.default: "item",
    aten.equal.default: "equal",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.allclose.default: "allclose",
}
#: Ops that make no device work: views, allocations without a fill, metadata.
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "detach", "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
             "sym_storage_offset", "is_same_size", "size", "stride", "dim",
             "_to_copy_meta", "resize_"}
MM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_mm"}


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """What a kernel launch needs to know of a tensor argument, without holding it."""
    dtype: torch.dtype
    shape: tuple
    strides: tuple
    offset_bytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorArg":
        return cls(t.dtype, tuple(t.shape), tuple(t.stride()),
                   t.storage_offset() * t.element_size())

    def stride(self, dim: Optional[int] = None):
        return self.strides if dim is None else self.strides[dim]

    @property
    def nbytes(self) -> int:
        n = 1
        for v in self.shape:
            n *= v
        return n * self.dtype.itemsize

    def data_ptr(self) -> int:
        """A pointer with the alignment a real one would have: the caching allocator's
        blocks are 512-byte aligned, plus the view's offset."""
        return (1 << 20) + self.offset_bytes


@dataclasses.dataclass
class OpRecord:
    """One unit of device work of the step."""
    phase: str                 # "fwd" or "bwd"
    kind: str                  # "aten", "triton" or "cuda"
    name: str
    bytes: int = 0             # operand + result bytes (aten ops; kernels: see specs)
    flops: float = 0.0         # mm-like ops: 2 M N K
    dtype: str = ""
    detail: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SyncRecord:
    phase: str
    what: str
    where: str


@dataclasses.dataclass
class Trace:
    """What one step does on the host and what it asks of the device."""
    ops: List[OpRecord]
    syncs: List[SyncRecord]
    peak_bytes: int            # allocator peak during the step, beyond what lived before
    end_bytes: int             # still allocated at the end (loss, gradients)
    grad_bytes: int            # the gradients' storages (x.grad, w.grad)
    host_events: Dict[str, Dict[str, int]]   # phase -> event -> count
    triton_launches: List[dict]
    wall_s: float
    out_bytes: int = 0         # the step's output (the loss)

    @property
    def extra_bytes(self) -> int:
        """Peak beyond inputs, outputs and gradients: what the backend adds."""
        return max(0, self.peak_bytes - self.grad_bytes - self.out_bytes)

    def launches(self, phase: Optional[str] = None) -> int:
        return sum(1 for o in self.ops if phase is None or o.phase == phase)


def _round(n: int) -> int:
    r = hw.ALLOC_ROUND_BYTES
    return -(-n // r) * r if n > 0 else 0


def _tensors(obj) -> List[torch.Tensor]:
    """The tensors in obj (nested lists, tuples, dicts). Iterative: a recursive closure
    would be a reference cycle holding the tensors until the next garbage collection."""
    out: List[torch.Tensor] = []
    todo = [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            todo.extend(reversed(o))
        elif isinstance(o, dict):
            todo.extend(reversed(list(o.values())))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _caller() -> str:
    """The innermost frame of this project's code that led to the current op."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        f = fr.filename.replace(os.sep, "/")
        if ("/arcface_kernels/" in f or "/triton_kernels/" in f or "/tests/" in f) \
                and "/bench/static/" not in f:
            return f"{os.path.basename(fr.filename)}:{fr.lineno} ({fr.name})"
    return "?"


_IN_CPP = [False]


class Tracer(TorchDispatchMode):
    """Records allocations, device work and host syncs of every op below it."""

    def __init__(self, backend_ops: Optional[Dict[Any, Callable]] = None):
        super().__init__()
        self.backend_ops = backend_ops or {}
        self.phase = "fwd"
        self.ops: List[OpRecord] = []
        self.syncs: List[SyncRecord] = []
        self.live: Dict[int, tuple] = {}     # storage key -> (weakref, bytes)
        self.cur = 0
        self.peak = 0
        self.host = {ph: {"aten_kernel_ops": 0, "aten_meta_ops": 0, "triton_launches": 0,
                          "cuda_launches": 0, "custom_ops": 0} for ph in ("fwd", "bwd")}
        self.triton_launches: List[dict] = []

    # -- memory ------------------------------------------------------------------------
    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.cur -= self.live.pop(k)[1]

    def _key(self, t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def track(self, t: torch.Tensor) -> None:
        """Count t's storage as an allocation if it is new."""
        from torch.multiprocessing.reductions import StorageWeakRef
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self._sweep()
        n = _round(st.nbytes())
        self.live[key] = (StorageWeakRef(st), n)
        self.cur += n
        self.peak = max(self.peak, self.cur)

    def known(self, t: torch.Tensor) -> bool:
        return self._key(t) in self.live

    def adopt(self, tensors) -> None:
        """Storages that lived before the step (inputs): never counted."""
        from torch.multiprocessing.reductions import StorageWeakRef
        for t in _tensors(tensors):
            st = t.untyped_storage()
            self.live.setdefault(st._cdata, (StorageWeakRef(st), 0))

    # -- syncs -------------------------------------------------------------------------
    def sync(self, what: str) -> None:
        where = _caller()
        if _IN_CPP[0]:
            where = f"C++ host code of the op called at {where}"
        self.syncs.append(SyncRecord(self.phase, what, where))

    # -- dispatch ----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.backend_ops.get(func)
        if impl is not None:
            self.host[self.phase]["custom_ops"] += 1
            with self:
                out = impl(self, *args, **kwargs)
            for t in _tensors(out):
                self.track(t)
            return out
        if func.namespace not in ("aten", "prim"):
            # another custom op (e.g. the label check): run its device-generic
            # implementation, so that what it does is seen; an op with only device
            # kernels counts as one launch of its own
            self.host[self.phase]["custom_ops"] += 1
            if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(),
                                                              "CompositeExplicitAutograd"):
                with self:
                    return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd,
                                       *args, **kwargs)
            out = func(*args, **kwargs)
            for t in _tensors(out):
                self.track(t)
            self.ops.append(OpRecord(self.phase, "aten", func.name(),
                                     bytes=sum(_nbytes(t) for t in _tensors(args) +
                                               _tensors(out))))
            return out
        if func in SYNC_OPS:
            if any(t.device.type != "cpu" for t in _tensors(args)):
                self.sync(SYNC_OPS[func])
            return _stand_in(func, args)
        if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"):
            # an op that is only a composition (.to, .float, .contiguous, reshape, ...):
            # it reaches this mode whole inside the backends' implementations (below
            # autograd); run its parts here so that copies and syncs among them are seen
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        name = func._schema.name.split("::")[-1]
        if name in ("_to_copy", "copy_", "copy") and _crosses_devices(func, args, kwargs):
            self.sync(f"{name} between the CPU and the GPU")
        try:
            out = func(*args, **kwargs)
        except Exception as e:   # a data-dependent op the fake mode cannot shape
            from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                                       DynamicOutputShapeException)
            if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
                self.sync(name)
                raise RuntimeError(f"static trace: {name} has a data-dependent result "
                                   f"(a host sync) at {_caller()}; the tracer cannot "
                                   "continue past it") from e
            raise
        self._account(func, name, args, kwargs, out)
        return out

    def _account(self, func, name, args, kwargs, out) -> None:
        outs = _tensors(out)
        new = [t for t in outs if not self.known(t)]
        for t in new:
            self.track(t)
        if func.namespace == "prim" or name.startswith("sym_"):
            return   # metadata queries: they reach the dispatcher only under a mode
        if name in NO_KERNEL or func.is_view:
            self.host[self.phase]["aten_meta_ops"] += 1
            return
        self.host[self.phase]["aten_kernel_ops"] += 1
        # an out= variant's destination is its result: counted once, as written
        ins = _tensors(args) + _tensors({k: v for k, v in kwargs.items() if k != "out"})
        rec = OpRecord(self.phase, "aten", name, bytes=_op_bytes(name, args, ins, outs),
                       dtype=str(outs[0].dtype).replace("torch.", "") if outs else "")
        if name in MM_OPS or name.startswith("mm") or name.startswith("addmm"):
            rec.flops = _mm_flops(name, args)
            ops = _mm_operands(name, args)
            if ops:   # the operands' dtype sets the rate (not an fp32 out_dtype / bias)
                rec.dtype = str(ops[0].dtype).replace("torch.", "")
        self.ops.append(rec)

    def launch(self, kind: str, name: str, detail: dict) -> None:
        self.host[self.phase]["triton_launches" if kind == "triton" else "cuda_launches"] += 1
        self.ops.append(OpRecord(self.phase, kind, name, dtype=detail.get("dtype", ""),
                                 detail=detail))


def _op_bytes(name: str, args, ins, outs) -> int:
    """Bytes an op moves: its operands and results, except for the indexed ones, which
    touch only the indexed rows (index_select: read and write the result; index_add_:
    read the source, read and write as many rows of the destination)."""
    if name in ("index_select",) and outs:
        return 2 * _nbytes(outs[0]) + sum(_nbytes(t) for t in ins[1:2])
    if name in ("index_add_", "index_add", "index_copy_", "index_copy") and len(ins) >= 3:
        return 3 * _nbytes(ins[2]) + _nbytes(ins[1])
    return sum(_nbytes(t) for t in ins + outs)


def _stand_in(func, args):
    rt = str(func._schema.returns[0].type) if func._schema.returns else ""
    if func in (aten.nonzero.default,):
        x = args[0]
        return x.new_empty((0, x.dim()), dtype=torch.long)
    if func is aten.masked_select.default:
        return args[0].new_empty((0,))
    if rt == "bool":
        return False
    if rt == "float":
        return 0.0
    return 0


def _crosses_devices(func, args, kwargs) -> bool:
    ts = _tensors(args)
    devs = {t.device.type for t in ts}
    if "device" in kwargs and kwargs["device"] is not None:
        devs.add(torch.device(kwargs["device"]).type)
    return "cpu" in devs and len(devs) > 1


def _mm_operands(name: str, args) -> Optional[tuple]:
    """The two matrix operands of a GEMM-like op: (mat1, mat2) of addmm / baddbmm (after
    the added tensor), the first two tensors otherwise; any of its overloads (e.g.
    ``addmm.dtype_out`` / ``mm.dtype_out``: 16-bit operands, a float32 result) and any
    strides (a strided view such as the backward's G, leading dimension ldg)."""
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    if name.startswith("addmm") or name.startswith("baddbmm"):
        ts = ts[1:]
    return (ts[0], ts[1]) if len(ts) >= 2 else None


def _mm_flops(name: str, args) -> float:
    """2 M N K (times the batch) of a GEMM-like op."""
    ops = _mm_operands(name, args)
    if ops is None:
        return 0.0
    a, b = ops
    batch = a.shape[0] if a.dim() == 3 else 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    return 2.0 * batch * m * n * k


# ----------------------------------------------------------------------------- backward
def run_backward(root: torch.Tensor) -> None:
    """loss.backward() without the autograd engine (which cannot run on fake CUDA tensors
    with a CPU build of torch): the graph's nodes run under no_grad in the engine's order
    (the ready node with the highest sequence number first), each once all its incoming
    gradients are summed; each gradient is cast to its input's dtype and summed to its
    shape as the engine does, and leaves get ``.grad``. Unlike the engine, saved tensors
    are not released node by node (in a loss step they are O(N) vectors)."""
    import heapq
    if root.grad_fn is None:   # nothing requires a gradient
        return
    deps: Dict[Any, int] = {}
    stack, seen = [root.grad_fn], {root.grad_fn}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            deps[nxt] = deps.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    buffers: Dict[Any, list] = {root.grad_fn: [torch.ones_like(root)]}
    ready = [(-root.grad_fn._sequence_nr(), 0, root.grad_fn)]
    tick = 1
    with torch.no_grad():
        while ready:
            node = heapq.heappop(ready)[2]
            grads = buffers.pop(node)
            if node.name().endswith("AccumulateGrad"):
                v, g = node.variable, grads[0]
                if g is not None:
                    v.grad = g if v.grad is None else v.grad + g
                continue
            outs = node(*grads) if callable(node) else node.apply(*grads)
            del grads
            if not isinstance(outs, tuple):
                outs = (outs,)
            for (nxt, nr), g in zip(node.next_functions, outs):
                if nxt is None:
                    continue
                meta = nxt._input_metadata
                buf = buffers.setdefault(nxt, [None] * len(meta))
                if g is not None:
                    want = meta[nr]
                    if g.dtype != want.dtype:
                        g = g.to(want.dtype)
                    if tuple(g.shape) != tuple(want.shape):
                        g = g.sum_to_size(want.shape)
                    buf[nr] = g if buf[nr] is None else buf[nr] + g
                deps[nxt] -= 1
                if deps[nxt] == 0:
                    heapq.heappush(ready, (-nxt._sequence_nr(), tick, nxt))
                    tick += 1
            del outs


# ----------------------------------------------------------------------- the fake GPU
_FAKE_GUARD_SRC = r"""
#include <Python.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
static PyObject* install(PyObject*, PyObject*) {
  if (c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) Py_RETURN_FALSE;
  static c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> impl;
  c10::impl::registerDeviceGuard(c10::DeviceType::CUDA, &impl);
  Py_RETURN_TRUE;
}
static PyMethodDef methods[] = {{"install", install, METH_NOARGS, nullptr},
                                {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, "ak_fake_cuda_guard", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_ak_fake_cuda_guard() { return PyModule_Create(&def); }
"""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "arcface-kernels", "static")
    os.makedirs(path, exist_ok=True)
    return path


def install_fake_cuda_guard() -> None:
    """With a CPU build of torch, autograd refuses to record CUDA tensors (fake ones
    included) because no CUDA device guard is registered. Register c10's own
    FakeGuardImpl for CUDA in this process (a tiny module built once with g++ against
    torch's c10 headers). A no-op when torch has CUDA."""
    if torch.cuda.is_available() or torch.version.cuda is not None:
        return
    import importlib.util
    tag = torch.__version__.replace("+", "_")
    so = os.path.join(cache_dir(), f"ak_fake_cuda_guard_{tag}{sysconfig.get_config_var('EXT_SUFFIX')}")
    if not os.path.exists(so):
        src = so + ".cpp"
        with open(src, "w") as f:
            f.write(_FAKE_GUARD_SRC)
        tdir = os.path.dirname(torch.__file__)
        cmd = ["g++", "-O1", "-shared", "-fPIC", "-std=c++17",
               "-I" + os.path.join(tdir, "include"), "-I" + sysconfig.get_paths()["include"],
               src, "-L" + os.path.join(tdir, "lib"), "-lc10",
               "-Wl,-rpath," + os.path.join(tdir, "lib"), "-o", so + ".tmp"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(so + ".tmp", so)
    spec = importlib.util.spec_from_file_location("ak_fake_cuda_guard", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.install()


_ACTIVE: List["Tracer"] = []   # the tracer of the step being traced


def _synchronize(*args, **kwargs) -> None:
    """torch.cuda.synchronize in a traced step: a host sync."""
    if _ACTIVE:
        _ACTIVE[-1].sync("torch.cuda.synchronize")


class _Props:
    def __init__(self, gpu: hw.Gpu):
        self.multi_processor_count = gpu.sms
        self.name = gpu.name
        self.major, self.minor = divmod(gpu.capability, 10)
        self.total_memory = 141 << 30


@contextlib.contextmanager
def fake_gpu(gpu: hw.Gpu = hw.H200):
    """The environment of a traced step: the modelled GPU's properties, no stream
    capture, Triton not interpreted, torch.cuda.synchronize counted as a host sync."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    saved = {k: getattr(torch.cuda, k) for k in
             ("get_device_properties", "is_current_stream_capturing", "synchronize")}
    torch.cuda.get_device_properties = lambda *a, **k: _Props(gpu)
    torch.cuda.is_current_stream_capturing = lambda *a, **k: False
    torch.cuda.synchronize = _synchronize
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


# -------------------------------------------------------------- the backends' host paths
def _triton_ops() -> Dict[Any, Callable]:
    """Triton: the registered launchers themselves, with the launch module's ``_launch``
    recording (kernel, grid, args, meta) and the eager (not traced) code paths taken."""
    import arcface_kernels._triton as treg
    from arcface_kernels.triton_kernels import launch as tlaunch

    def run(fn):
        def impl(tracer, *args, **kwargs):
            saved = tlaunch._launch, tlaunch._traced

            def record(kernel, grid, *kargs, **meta):
                name = getattr(kernel, "__name__", None) or kernel.fn.__name__
                args = tuple(TensorArg.of(a) if isinstance(a, torch.Tensor) else a
                             for a in kargs)   # no references: the tensors die as usual
                launch = dict(kernel=kernel, name=name, grid=tuple(grid), args=args,
                              meta=dict(meta), phase=tracer.phase,
                              dtype=str(kargs[0].dtype).replace("torch.", ""))
                tracer.triton_launches.append(launch)
                tracer.launch("triton", name, launch)
            tlaunch._launch, tlaunch._traced = record, (lambda *t: False)
            try:
                return fn(*args, **kwargs)
            finally:
                tlaunch._launch, tlaunch._traced = saved
        return impl

    return {treg.FWD_OP: run(treg.triton_fwd._init_fn),
            treg.BWD_OP: run(treg.triton_bwd._init_fn)}


def _cpp_ops(gpu: hw.Gpu) -> Dict[Any, Callable]:
    """cpp: the CUDA host code (host.cpp) in the extension's dry run, on a device of the
    modelled GPU's SM count and compute capability (which picks the kernels: the fused
    sm_90a ones at 90, the sm_80 ones at 80..89; below 80 the host code refuses)."""
    from arcface_kernels import _C, _cpp

    def run(dry):
        def impl(tracer, *args, **kwargs):
            _IN_CPP[0] = True
            try:
                out, launches = dry(*args, gpu.sms, capability=gpu.capability)
            finally:
                _IN_CPP[0] = False
            for rec in launches:
                tracer.launch("cuda", rec["kernel"], dict(rec))
            return tuple(out)
        return impl

    return {_cpp.FWD_OP: run(_C.cuda_dry_run_fwd), _cpp.BWD_OP: run(_C.cuda_dry_run_bwd)}


@contextlib.contextmanager
def cuda_build_of(backend: str):
    """Let ``backend`` resolve for CUDA tensors while tracing: the cpp extension of a CPU
    build has no CUDA kernels, but its dry run runs the CUDA host code."""
    from arcface_kernels import backends
    be = backends.resolve_backend(backend, torch.device("cpu")) if backend == "cpp" else None
    if be is None or "cuda" in be.devices:
        yield
        return
    backends._LOADED[backend] = dataclasses.replace(be, devices=be.devices + ("cuda",))
    try:
        yield
    finally:
        backends._LOADED[backend] = be


def backend_ops(backend: str, gpu: hw.Gpu) -> Dict[Any, Callable]:
    if backend == "triton":
        return _triton_ops()
    if backend == "cpp":
        return _cpp_ops(gpu)
    return {}


def trace_step(step: Callable[[], torch.Tensor], backend: str, inputs: Callable[[], tuple],
               gpu: hw.Gpu = hw.H200, warmup: bool = True) -> Trace:
    """Trace one training step on fake CUDA tensors.

    ``inputs()`` makes the step's input tensors (called under the fake mode); ``step(*t)``
    runs the forward and returns the loss, whose backward is then run. One untraced
    warm-up step first (caches that a real run fills on its first step), then the traced
    one; its phases are "fwd" (the step call) and "bwd" (the backward)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    install_fake_cuda_guard()
    with fake_gpu(gpu), cuda_build_of(backend):
        ops = backend_ops(backend, gpu)
        with FakeTensorMode(allow_non_fake_inputs=True):
            tensors = inputs()
            if warmup:
                warm = Tracer(ops)
                with warm:
                    run_backward(step(*tensors))
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        t.grad = None
                del warm
            tracer = Tracer(ops)
            tracer.adopt(list(tensors))
            t0 = time.perf_counter()
            _ACTIVE.append(tracer)
            try:
                with tracer:
                    tracer.phase = "fwd"
                    loss = step(*tensors)
                    tracer.phase = "bwd"
                    run_backward(loss)
                    tracer._sweep()
            finally:
                _ACTIVE.pop()
            wall = time.perf_counter() - t0
            grads = [t.grad for t in tensors if isinstance(t, torch.Tensor)
                     and t.grad is not None]
            grad_bytes = sum(_round(g.untyped_storage().nbytes()) for g in grads)
            out_bytes = _round(loss.untyped_storage().nbytes())
    return Trace(ops=tracer.ops, syncs=tracer.syncs, peak_bytes=tracer.peak,
                 end_bytes=tracer.cur, grad_bytes=grad_bytes,
                 host_events={k: dict(v) for k, v in tracer.host.items()},
                 triton_launches=tracer.triton_launches, wall_s=wall, out_bytes=out_bytes)


def trace_arcface(backend: str, n: int, c: int, d: int, dtype: torch.dtype,
                  gpu: hw.Gpu = hw.H200, **loss_kwargs) -> Trace:
    """The step ``arcface_loss(x, w, y, backend=backend, **loss_kwargs).backward()`` at
    x [n, d], w [c * sub_centers, d] of ``dtype`` (both requiring gradients), labels [n]
    int64, on ``gpu`` (its SM count and, for the cpp backend, its compute capability)."""
    import arcface_kernels as ak
    rows = c * int(loss_kwargs.get("sub_centers", 1))

    def inputs():
        x = torch.empty(n, d, device="cuda", dtype=dtype).requires_grad_()
        w = torch.empty(rows, d, device="cuda", dtype=dtype).requires_grad_()
        y = torch.empty(n, device="cuda", dtype=torch.int64)
        return x, w, y

    def step(x, w, y):
        return ak.arcface_loss(x, w, y, backend=backend, **loss_kwargs)

    return trace_step(step, backend, inputs, gpu)


if __name__ == "__main__":  # a quick look: python -m bench.static.trace triton 8192 262144 512
    b, n, c, d = sys.argv[1], *map(int, sys.argv[2:5])
    tr = trace_arcface(b, n, c, d, torch.bfloat16)
    print(f"launches {tr.launches()} (fwd {tr.launches('fwd')}), syncs {len(tr.syncs)}: "
          f"{[(s.what, s.where) for s in tr.syncs]}, extra {tr.extra_bytes / 2**20:.1f} MiB, "
          f"host {tr.host_events}, wall {tr.wall_s:.2f}s")
