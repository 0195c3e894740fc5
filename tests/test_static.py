"""Tests of the static kernel report (bench/static): that it measures truly.

* the memory tracer reports a known allocation pattern exactly, and the launches of it;
* a launch path with a planted .item() (or bool(), .cpu(), nonzero) is reported as
  syncing, at the right line, and a clean one is not;
* a tiny Triton kernel built to spill is reported as spilling, one built for 128-bit
  loads has them and a gather has narrow ones (compiled for sm_90a in a process without
  the interpreter);
* the SASS reader finds loops, the main loop and the tensor-core FLOPs of a listing;
* the occupancy rules and the cost model's formulas on hand-computed cases;
* the cpp backend's dry run records the launches its host code makes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.static import hardware as hw
from bench.static import kernels as K
from bench.static import model as M
from bench.static import sass
from bench.static import trace as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def fake_guard():
    T.install_fake_cuda_guard()


def _fake_step(step, make_inputs, warmup=False):
    return T.trace_step(step, "none", make_inputs, warmup=warmup)


# ----------------------------------------------------------------------- memory tracer
def test_memory_tracer_known_pattern_exactly():
    """1000 B (-> 1024: the allocator's 512-byte blocks), 3 MiB, free the first, 2 MiB:
    the peak is 5 MiB exactly; zeros launch a fill each, empty launches nothing."""
    def run():
        with FakeTensorMode():
            tr = T.Tracer()
            with tr:
                a = torch.empty(250, device="cuda", dtype=torch.float32)      # 1000 B
                b = torch.zeros(3 * MiB, device="cuda", dtype=torch.uint8)    # fill
                assert tr.cur == 1024 + 3 * MiB
                del a
                c = torch.zeros(MiB // 2, device="cuda", dtype=torch.float32)  # 2 MiB
                assert tr.peak == 5 * MiB
                del b
                d = torch.empty(MiB, device="cuda", dtype=torch.uint8)
                tr._sweep()
                assert tr.cur == 3 * MiB
                assert tr.peak == 5 * MiB
            return tr, (c, d)
    tr, _ = run()
    assert [o.name for o in tr.ops] == ["zeros", "zeros"]   # empty launches nothing
    assert tr.ops[0].bytes == 3 * MiB


def test_memory_tracer_views_and_inplace_allocate_nothing():
    with FakeTensorMode():
        tr = T.Tracer()
        x = torch.empty(1024, 1024, device="cuda")
        tr.adopt([x])
        with tr:
            v = x.view(-1)[:10].t() if x.dim() == 1 else x.view(-1)[:10]
            x.mul_(2)
            y = x.narrow(0, 0, 5)
        assert tr.peak == 0
        assert [o.name for o in tr.ops] == ["mul_"]
        del v, y


def test_trace_step_extra_memory_excludes_gradients():
    """A step whose backward makes one 4 MiB temporary besides the gradients: the extra
    memory is that temporary (and the loss's 512 bytes are not counted)."""
    def inputs():
        x = torch.empty(1024, 1024, device="cuda").requires_grad_()
        return (x,)

    def step(x):
        return (x * x).sum()          # saves x; backward: 2 * x * grad -> temporaries

    tr = _fake_step(step, inputs)
    assert tr.grad_bytes == 4 * MiB
    assert tr.launches("fwd") == 2            # mul, sum
    assert tr.launches("bwd") >= 2
    # forward: the product (4 MiB) lives until sum; backward: expand (view), mul(s)
    assert 4 * MiB <= tr.peak_bytes - tr.grad_bytes <= 12 * MiB + 4096


# --------------------------------------------------------------------------- host syncs
def _sync_inputs():
    return (torch.empty(64, 32, device="cuda"),)


@pytest.mark.parametrize("planted, what", [
    (lambda x: x.sum().item(), {"item"}),
    # bool() reaches the dispatcher as is_nonzero or as .item(), by the tensor's path
    (lambda x: bool((x > 0).any()), {"bool(tensor)", "item"}),
    (lambda x: x.cpu(), {"_to_copy between the CPU and the GPU"}),
    (lambda x: x.sum().tolist(), {"item"}),
])
def test_planted_sync_is_reported(planted, what):
    def step(x):
        y = x * 2
        planted(y)          # the planted sync (this line is reported)
        return y.sum()

    tr = _fake_step(step, _sync_inputs)
    assert len(tr.syncs) == 1, tr.syncs
    assert tr.syncs[0].what in what
    assert tr.syncs[0].where.startswith("test_static.py:")   # the planted line
    assert tr.syncs[0].phase == "fwd"


def test_nonzero_is_a_sync_and_clean_path_is_not():
    def clean(x):
        return torch.where(x > 0, x, 0).sum()

    assert _fake_step(clean, _sync_inputs).syncs == []

    def step(x):
        x.nonzero()
        return x.sum()
    tr = _fake_step(step, _sync_inputs)
    assert [s.what for s in tr.syncs] == ["nonzero"]


def test_sync_in_the_backward_is_attributed_to_it():
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            g.max().item()      # planted in the backward
            return g

    def inputs():
        return (torch.empty(8, 8, device="cuda").requires_grad_(),)

    tr = _fake_step(lambda x: F.apply(x).sum(), inputs)
    assert [(s.phase, s.what) for s in tr.syncs] == [("bwd", "item")]


def test_synchronize_is_a_sync_and_cpu_item_is_not():
    def step(x):
        torch.cuda.synchronize()
        torch.ones(3).sum().item()          # a CPU tensor: no device to wait for
        return x.sum()
    tr = _fake_step(step, _sync_inputs)
    assert [s.what for s in tr.syncs] == ["torch.cuda.synchronize"]


_LIB = torch.library.Library("static_test", "FRAGMENT")
_LIB.define("halves(Tensor x) -> Tensor")
_LIB.impl("halves", lambda x: x.float().contiguous() * 0.5, "CompositeExplicitAutograd")
torch.library.register_fake("static_test::halves")(lambda x: x.new_empty(x.shape,
                                                                         dtype=torch.float32))


def test_compositions_inside_an_op_are_decomposed_and_counted():
    """Inside an op's implementation (below autograd) .float() reaches the tracer whole:
    it is decomposed, so its copy is a counted kernel with its 8 MiB result."""
    def inputs():
        return (torch.empty(1024, 1024, device="cuda", dtype=torch.bfloat16),)

    tr = _fake_step(lambda x: torch.ops.static_test.halves(x).sum(), inputs)
    assert [o.name for o in tr.ops] == ["_to_copy", "mul", "sum"]
    # the fp32 copy and the product; the copy is freed before the sum's 512 bytes
    assert tr.peak_bytes == 2 * 4 * MiB


def test_backward_walk_matches_the_engine():
    """Gradients are cast to their input's dtype and summed over uses; the gradients
    themselves are plain tensors (no graph: run under no_grad)."""
    def inputs():
        return (torch.empty(64, device="cuda", dtype=torch.float32).requires_grad_(),)

    def step(x):
        return (x.double() * 2).sum() + (x * 3).sum()

    def run():
        with FakeTensorMode():
            T.install_fake_cuda_guard()
            (x,) = inputs()
            loss = step(x)
            T.run_backward(loss)
            return x
    x = run()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert not x.grad.requires_grad and x.grad.grad_fn is None


# -------------------------------------------------------------------- backends traced
def test_triton_step_plan_at_a_headline_shape():
    """The Triton backend at N=8192, C=262144, D=512 bf16: one forward tile launch, three
    backward launches per 16 MiB chunk of gradient tiles (1024 classes at N = 8192: the
    tiles, both products, the dW rows), a handful of ATen kernels, no host sync, and
    the memory goal of 64 MiB beyond inputs and gradients."""
    pytest.importorskip("triton")
    tr = T.trace_arcface("triton", 8192, 262144, 512, torch.bfloat16)
    names = [o.name for o in tr.ops if o.kind == "triton"]
    chunks = 262144 // 1024
    assert names.count("fwd_kernel") == 1
    assert names.count("grad_kernel") == chunks and names.count("bwd_mm_kernel") == chunks
    assert names.count("proj_rows_kernel") == chunks + 1
    # 3 per chunk, plus a fixed few: norms, target, dx, the argument checks (device
    # asserts), the reduction's backward
    assert len([o for o in tr.ops if o.phase == "bwd"]) <= 3 * chunks + 24
    fwd = next(o for o in tr.ops if o.name == "fwd_kernel")
    bn = fwd.detail["meta"]["BLOCK_N"]
    assert fwd.detail["grid"][0] == 8192 // bn
    assert tr.syncs == []    # the label check is a device-side assert on CUDA
    assert "_assert_async" in [o.name for o in tr.ops if o.phase == "fwd"]
    assert tr.grad_bytes == (8192 + 262144) * 512 * 2
    assert 0 < tr.extra_bytes <= 64 * MiB


def _cpp_ext():
    try:
        from arcface_kernels import _C
    except ImportError:
        pytest.skip("the C++ extension is not built")
    if not hasattr(_C, "cuda_dry_run_fwd"):
        pytest.skip("the extension has no dry run")
    return _C


def _cuda_names(tr, phase=None):
    return [(o.phase, o.name) for o in tr.ops
            if o.kind == "cuda" and (phase is None or o.phase == phase)]


def _plan(fwd_main: str, grad_main: str, fold_b: bool = False) -> list:
    """The cpp backend's kernel launches of one step at the small case below (one
    backward chunk), with its main forward and G kernels; with fold_b (G written as G b)
    the products take w's own rows: no W_hat chunk."""
    wh = [] if fold_b else [("bwd", "scaled_rows_kernel")]
    return [("fwd", "inv_norm_kernel"), ("fwd", "inv_norm_kernel"), ("fwd", fwd_main),
            ("fwd", "fwd_combine_kernel"),
            ("bwd", "inv_norm_kernel"), ("bwd", "inv_norm_kernel"),
            ("bwd", "scaled_rows_kernel"), ("bwd", grad_main), *wh,
            ("bwd", "dw_chunk_finish_kernel"), ("bwd", "dx_finish_kernel")]


@pytest.mark.parametrize("dtype, gpu, kwargs, fwd_main, grad_main", [
    # float16 / bfloat16, K = 1, no terms: the fused CuTe kernels of the device's generation
    # (sm_90a: the operand tiles by TMA, the rows of w being contiguous)
    (torch.bfloat16, hw.H200, {}, "fwd_sm90_tma_kernel", "grad_sm90_tma_kernel"),
    (torch.float16, hw.H200, {}, "fwd_sm90_tma_kernel", "grad_sm90_tma_kernel"),
    (torch.bfloat16, hw.A100, {}, "fwd_sm80_kernel", "grad_sm80_kernel"),
    (torch.float16, hw.A100, {}, "fwd_sm80_kernel", "grad_sm80_kernel"),
    # the general kernels otherwise: float32, sub-centers, an optional per-logit term
    (torch.float32, hw.H200, {}, "fwd_kernel", "grad_chunk_kernel"),
    (torch.float32, hw.A100, {}, "fwd_kernel", "grad_chunk_kernel"),
    (torch.bfloat16, hw.H200, dict(sub_centers=3), "fwd_kernel", "grad_chunk_kernel"),
    (torch.bfloat16, hw.H200, dict(interclass_filtering_threshold=0.2), "fwd_terms_kernel",
     "grad_chunk_terms_kernel"),
], ids=["bf16-sm90", "fp16-sm90", "bf16-sm80", "fp16-sm80", "fp32-sm90", "fp32-sm80",
        "K3-sm90", "terms-sm90"])
def test_cpp_dry_run_records_the_host_codes_launches(dtype, gpu, kwargs, fwd_main,
                                                     grad_main):
    """N=100, C=300, D=64: the host code's launches in order, on a device of the given
    compute capability (90: H200, 80: A100), each with a SPECS entry."""
    _cpp_ext()
    n, c, d = 100, 300, 64
    k = kwargs.get("sub_centers", 1)
    tr = T.trace_arcface("cpp", n, c, d, dtype, gpu=gpu, **kwargs)
    # bfloat16 in the fused kernels (no index): G is written as G b
    fold_b = dtype == torch.bfloat16 and fwd_main.startswith(("fwd_sm90", "fwd_sm80"))
    assert _cuda_names(tr) == _plan(fwd_main, grad_main, fold_b)
    recs = {o.name: o.detail for o in tr.ops if o.kind == "cuda"}
    assert recs["dw_chunk_finish_kernel"]["sizes"]["prescaled"] == int(fold_b)
    if "fold_b" in recs[grad_main]["sizes"]:
        assert recs[grad_main]["sizes"]["fold_b"] == int(fold_b)
    want_dtype = {torch.bfloat16: "BFloat16", torch.float16: "Half",
                  torch.float32: "Float"}[dtype]
    assert recs[fwd_main]["dtype"] == recs[grad_main]["dtype"] == want_dtype
    for name, rec in recs.items():
        K.spec_of("cpp", name).work(rec)      # every launch has a spec that can cost it
    fwd, grad = recs[fwd_main], recs[grad_main]
    if fwd_main.endswith(("sm90_kernel", "sm90_tma_kernel", "sm80_kernel")):
        kind = "sm90" if gpu.capability == 90 else "sm80"
        cfg = K.CUDA_FUSED[kind]
        for rec in (fwd, grad):
            sz = rec["sizes"]
            assert {key: sz[key] for key in ("bm", "bn", "bk")} == \
                {key: cfg[key] for key in ("bm", "bn", "bk")}
            assert rec["threads"] == cfg["threads"]
            # the operand stages and the tiles' column norms (a few KiB), 2 CTAs per SM
            pipe = K.fused_pipeline_bytes(kind)
            assert pipe <= sz["smem"] <= pipe + 4096
            assert 2 * (sz["smem"] + 1024 + gpu.smem_reserved_per_block) <= gpu.smem_per_sm
            assert (sz["n"], sz["d"], sz["j_begin"], sz["j_end"]) == (n, d, 0, c)
            assert sz["indexed"] == 0
            assert sz["tma"] == (kind == "sm90")
            tiles = -(-c // cfg["bn"])
            assert sz["tiles"] == tiles
            # grid (row tiles, splits): every split a run of whole class tiles
            splits = rec["grid"][1]
            assert rec["grid"][0] == -(-n // cfg["bm"])
            assert splits == -(-tiles // sz["tiles_per_split"])
        # the forward fills one round of 2 CTAs per SM at most, the G kernel two
        assert fwd["grid"][0] * fwd["grid"][1] <= 2 * gpu.sms * 1
        assert grad["grid"][0] * grad["grid"][1] <= 2 * gpu.sms * 2
        assert fwd["sizes"]["ldg"] == 0
        assert grad["sizes"]["ldg"] == 304        # C rounded up to 8 (16-byte rows of G)
        # the combine reads the fused forward's splits
        assert recs["fwd_combine_kernel"]["sizes"]["splits"] == fwd["grid"][1]
        # the work: tile FLOPs and every tile of the launch counted once
        for rec in (fwd, grad):
            w = K.spec_of("cpp", rec["kernel"]).work(rec)
            assert w.tile_flops == 2 * cfg["bm"] * cfg["bn"] * 64
            assert w.programs * w.tiles == pytest.approx(
                rec["grid"][0] * rec["sizes"]["tiles"])
        w = K.spec_of("cpp", grad["kernel"]).work(grad)
        assert w.bytes >= (n + c) * d * 2 + n * c * 2   # x, w, G
    else:
        assert fwd["sizes"]["k"] == k and fwd["threads"] == 128
        # 2 row tiles of 64; class tiles of 64 rows of w, split to fill 4 waves of SMs
        assert fwd["grid"][0] == 2
        assert fwd["sizes"]["tiles_per_split"] * fwd["grid"][1] >= fwd["sizes"]["ntiles"]
    # the backward's two cuBLAS products per chunk through ATen, counted as GEMMs at the
    # operands' rate: dX_acc += G W_hat (addmm), dW_c = G^T X_hat (mm), 2 N (C K) D each
    # (float32: addmm_ / mm in place of the out_dtype overloads)
    gemms = [(o.name.rstrip("_"), o.flops, o.dtype) for o in tr.ops
             if o.phase == "bwd" and o.flops]
    dt = str(dtype).replace("torch.", "")
    assert gemms == [("addmm", 2.0 * n * c * k * d, dt), ("mm", 2.0 * n * c * k * d, dt)]
    # labels checked on the device in both ops (ops.cpp check_values): asserts, no sync
    assert tr.syncs == []
    for phase in ("fwd", "bwd"):
        assert "_assert_async" in [o.name for o in tr.ops if o.phase == phase], phase


def test_cpp_dry_run_index_copies_by_cp_async_on_sm90():
    """With a Partial FC index the rows of w of a class tile are gathered, which no TMA
    box is: on sm_90a the fused kernels then copy by cp.async (fwd_sm90_kernel,
    grad_sm90_kernel, tma = 0), and G is not scaled by b (the products need a gathered
    W_hat anyway); without an index they take the TMA kernels and G b."""
    _cpp_ext()
    from arcface_kernels import _cpp
    from arcface_kernels._config import MarginConfig
    n, c, d, rows = 100, 300, 64, 1000
    args = MarginConfig().op_args() + (0.0, 0)

    def traced(indexed):
        def inputs():
            x = torch.empty(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
            w = torch.empty(rows, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
            y = torch.empty(n, device="cuda", dtype=torch.int64)
            idx = torch.empty(c if indexed else 0, device="cuda", dtype=torch.int64)
            return x, w, y, idx

        def step(x, w, y, idx):
            wr = w if indexed else w[:c]
            return _cpp.FWD_OP(x, wr, y, idx if indexed else None, None, *args)[0].sum()
        return T.trace_step(step, "cpp", inputs, gpu=hw.H200)

    for indexed, fwd, grad in ((True, "fwd_sm90_kernel", "grad_sm90_kernel"),
                               (False, "fwd_sm90_tma_kernel", "grad_sm90_tma_kernel")):
        tr = traced(indexed)
        recs = {o.name: o.detail for o in tr.ops if o.kind == "cuda"}
        assert fwd in recs and grad in recs, sorted(recs)
        for name in (fwd, grad):
            assert recs[name]["sizes"]["indexed"] == int(indexed)
            assert recs[name]["sizes"]["tma"] == int(not indexed)
            K.spec_of("cpp", name).work(recs[name])
        # G carries the inverse norms only where the products can take w's own rows
        assert recs[grad]["sizes"]["fold_b"] == int(not indexed)
        assert recs["dw_chunk_finish_kernel"]["sizes"]["prescaled"] == int(not indexed)


def test_cpp_fused_launches_fill_the_device_and_cover_the_classes():
    """N=1000, C=50000, D=64 bf16 on the H200 (132 SMs): the fused forward is one launch
    of at most 2 CTAs per SM (8 row tiles x 33 splits = 264), the G kernel one launch per
    backward chunk (at most 2 rounds of 2 CTAs per SM), the chunks contiguous and
    covering the classes, G's leading dimension a multiple of 8 that holds every chunk,
    one addmm and one mm per chunk."""
    _cpp_ext()
    n, c, d = 1000, 50000, 64
    gpu = hw.H200
    tr = T.trace_arcface("cpp", n, c, d, torch.bfloat16, gpu=gpu)
    fwd = [o.detail for o in tr.ops if o.name == "fwd_sm90_tma_kernel"]
    grads = [o.detail for o in tr.ops if o.name == "grad_sm90_tma_kernel"]
    assert len(fwd) == 1 and fwd[0]["grid"] == (8, 33)
    assert fwd[0]["sizes"]["tiles"] == -(-c // 128)
    assert 8 * 33 <= 2 * gpu.sms
    assert [o.name for o in tr.ops if o.kind == "cuda"].count("grad_chunk_kernel") == 0
    j = 0
    ldg = grads[0]["sizes"]["ldg"]
    assert ldg % 8 == 0
    for g in grads:
        sz = g["sizes"]
        assert sz["j_begin"] == j and sz["j_end"] > j
        assert sz["j_end"] - sz["j_begin"] <= ldg and sz["ldg"] == ldg
        assert g["grid"][0] * g["grid"][1] <= 2 * 2 * gpu.sms
        assert sz["tiles"] == -(-(sz["j_end"] - sz["j_begin"]) // 128)
        j = sz["j_end"]
    assert j == c and len(grads) > 1
    names = [o.name for o in tr.ops if o.phase == "bwd" and o.flops]
    assert names == ["addmm", "mm"] * len(grads)
    assert sum(o.flops for o in tr.ops if o.flops) == pytest.approx(2 * 2.0 * n * c * d)
    # the model's tensor work of the fused kernels covers every logit once per pass
    for rec in fwd + grads:
        w = K.spec_of("cpp", rec["kernel"]).work(rec)
        cols = rec["sizes"]["j_end"] - rec["sizes"]["j_begin"]
        assert w.programs * w.tiles * w.tile_flops >= 2.0 * n * cols * d


def test_cpp_dry_run_refuses_devices_below_sm80():
    _cpp_ext()
    sm75 = dataclasses.replace(hw.H200, name="sm_75 device", arch="sm_75")
    assert sm75.capability == 75
    with pytest.raises(RuntimeError, match=r"compute capability 8\.0"):
        T.trace_arcface("cpp", 100, 300, 64, torch.bfloat16, gpu=sm75)


def test_gemm_with_an_fp32_out_dtype_is_counted_at_the_operands_rate():
    """addmm.dtype_out (beta = 1: the fp32 accumulator read and written) and mm.dtype_out
    of bf16 operands, one of them a strided view (leading dimension 136 > 130 columns):
    2 M N K FLOPs each, the bf16 rate, each operand's bytes once and the result's once."""
    if not hasattr(torch.ops.aten.mm, "dtype_out"):
        pytest.skip("this torch has no mm / addmm with an out_dtype")
    n, r, ld, d = 64, 130, 136, 32
    with FakeTensorMode():
        ws = torch.empty(n * ld, device="cuda", dtype=torch.bfloat16)
        wh = torch.empty(r, d, device="cuda", dtype=torch.bfloat16)
        xh = torch.empty(n, d, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(n, d, device="cuda", dtype=torch.float32)
        dwc = torch.empty(r, d, device="cuda", dtype=torch.float32)
        tr = T.Tracer()
        tr.adopt([ws, wh, xh, acc, dwc])
        with tr:
            g = ws.view(n, ld).narrow(1, 0, r)
            torch.ops.aten.addmm.dtype_out(acc, g, wh, torch.float32, out=acc)
            torch.ops.aten.mm.dtype_out(g.t(), xh, torch.float32, out=dwc)
    ops = [(o.name, o.flops, o.dtype, o.bytes) for o in tr.ops]
    assert ops == [("addmm", 2.0 * n * r * d, "bfloat16", 2 * n * d * 4 + n * r * 2 + r * d * 2),
                   ("mm", 2.0 * r * n * d, "bfloat16", n * r * 2 + n * d * 2 + r * d * 4)]
    assert tr.peak == 0


# ----------------------------------------------------------------- compiled kernels
def _compile_in_subprocess(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_COMPILE = r"""
import json, torch
import static_kernels as S
from bench.static import kernels as K, sass
from bench.static.trace import TensorArg
def arg(dtype):
    return TensorArg(dtype, (1 << 20,), (1,), 0)
out = {}
for name, fn, args, meta in [
    ("vector", S.vector_copy, (arg(torch.float32), arg(torch.float32), 1 << 20),
     dict(BLOCK=1024, num_warps=4)),
    ("gather", S.gather_copy, (arg(torch.float32), arg(torch.int32), arg(torch.float32),
                               1 << 20), dict(BLOCK=1024, num_warps=4)),
    ("spill", S.must_spill, (arg(torch.float32), arg(torch.float32), 64),
     dict(BLOCK=128, num_warps=1)),
]:
    cubin, md = K.compile_triton(dict(kernel=fn, name=name, args=args, meta=meta), "sm_90a")
    code = next(iter(sass.analyze_cubin(cubin, "sm_90a").values()))
    out[name] = dict(access=code.access, spill=code.spill_store_bytes + code.spill_load_bytes,
                     stl=code.access["stl"], regs=code.regs, stack=code.stack)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    try:
        sass.tool("cuobjdump")
        sass.tool("nvdisasm")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return _compile_in_subprocess(_COMPILE)


def test_128_bit_loads_are_counted_as_such(compiled):
    v = compiled["vector"]["access"]
    assert v["ldg_128"] >= 1 and v["ldg_narrow"] == 0
    assert v["stg_128"] >= 1 and v["stg_narrow"] == 0


def test_scalar_gather_loads_are_counted_as_narrow(compiled):
    g = compiled["gather"]["access"]
    assert g["ldg_narrow"] >= 4          # the gathered loads, one float each
    assert compiled["gather"]["spill"] == 0


def test_kernel_built_to_spill_is_reported_as_spilling(compiled):
    s = compiled["spill"]
    assert s["spill"] > 1024 and s["stl"] > 0 and s["stack"] > 0
    assert compiled["vector"]["spill"] == 0


# ------------------------------------------------------------------------ SASS reader
LISTING = """
        .text.k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/                   MUFU.EX2 R5, R5 ;
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R5 ;
        /*0080*/               @P1 BRA 0x10 ;
        /*0090*/                   STL.64 [R1], R4 ;
        /*00a0*/                   LDL.128 R8, [R1] ;
        /*00b0*/                   EXIT ;
"""


def test_sass_reader_loops_regions_and_counts():
    funcs = sass.parse_listing(LISTING)
    code = sass.analyze_instrs("k", "sm_90a", funcs["k"], {"REG": 168})
    assert code.size == 12
    assert [(lp.head, lp.tail, lp.depth) for lp in code.loops] == [(0x10, 0x80, 0), (0x20, 0x50, 1)]
    assert (code.main_loop.head, code.tile_loop.head) == (0x20, 0x10)
    assert code.main.size == 4 and code.main.mma_flops_per_warp == 2 * 2 * 64 * 128 * 16 / 4
    assert code.epilogue.size == 4 and code.epilogue.ex2 == 1     # LDG, MUFU, STG, BRA
    assert code.rest.size == 4                                      # MOV, STL, LDL, EXIT
    assert code.access["ldg_128"] == 1 and code.access["stg_narrow"] == 1
    assert (code.spill_store_bytes, code.spill_load_bytes) == (8, 16)


def test_out_of_line_block_of_a_loop_body_is_part_of_it():
    """The compiler may place a block of the main loop's body (the cp.async loads taken
    while tiles are left) before the loop's head: the loop branches back to it and it
    branches forward into the loop again. That block belongs to the main loop (counted
    per iteration), not to a loop of its own; a block that is also entered from outside
    (here: fallen into) is left alone."""
    def listing(pre):
        return "\n".join([
            "        .text.k:",
            "        /*0000*/                   MOV R1, R2 ;",
            "        /*0010*/                   FADD R1, R2, R3 ;",          # tile loop head
            f"        /*0020*/               {pre} BRA 0x60 ;",              # over the block
            "        /*0030*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R2.64] ;",
            "        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;",
            "        /*0050*/                   BRA 0x80 ;",                 # back into it
            "        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;",   # main head
            "        /*0070*/               @P2 BRA 0x30 ;",                 # to the block
            "        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;",
            "        /*0090*/               @P0 BRA 0x60 ;",                 # main loop
            "        /*00a0*/                   MUFU.EX2 R5, R5 ;",
            "        /*00b0*/               @P1 BRA 0x10 ;",                 # tile loop
            "        /*00c0*/                   EXIT ;"])
    code = sass.analyze_instrs("k", "sm_90a", sass.parse_listing(listing(""))["k"], {})
    assert sass.parse_listing(listing("@P3"))["k"][2].pred == "@P3"
    assert [(lp.head, lp.tail) for lp in code.loops] == [(0x10, 0xb0), (0x30, 0x90)]
    assert (code.main_loop.head, code.tile_loop.head) == (0x30, 0x10)
    assert code.main.size == 7 and code.main.counts["LDGSTS.E.BYPASS.128"] == 1
    # the branch over the block is conditional: the block is also fallen into
    code = sass.analyze_instrs("k", "sm_90a", sass.parse_listing(listing("@P3"))["k"], {})
    assert [(lp.head, lp.tail) for lp in code.loops] == [(0x10, 0xb0), (0x30, 0x70),
                                                          (0x60, 0x90)]


def test_mma_flops_of_each_shape():
    assert sass.mma_flops_per_warp("HGMMA.64x256x16.F32.BF16") == 2 * 64 * 256 * 16 / 4
    assert sass.mma_flops_per_warp("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert sass.mma_flops_per_warp("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert sass.mma_flops_per_warp("FFMA") == 0
    assert sass.access_width("LDG.E.128.CONSTANT") == 16
    assert sass.access_width("LDG.E.U16") == 2 and sass.access_width("STG.E") == 4


def test_occupancy_rules():
    assert sass.blocks_per_sm(hw.H200, 255, 256, 99328) == (1, "registers")
    assert sass.blocks_per_sm(hw.H200, 128, 256, 0) == (2, "registers")
    assert sass.blocks_per_sm(hw.H200, 32, 128, 0) == (16, "threads")
    assert sass.blocks_per_sm(hw.H200, 64, 128, 100 * 1024)[0] == 2   # shared memory
    assert sass.blocks_per_sm(hw.H200, 32, 32, 0) == (32, "blocks")
    assert sass.blocks_per_sm(hw.A100, 32, 128, 100 * 1024) == (1, "shared memory")


def test_cuda_function_finds_the_instance_of_each_dtype():
    """The general kernels are instantiated on CUDA's types, the fused CuTe ones on
    CUTLASS's: both are found by the launch record's c10 dtype."""
    names = {
        "a": "void arcface::cuda::fused::fwd_sm90_kernel<cutlass::bfloat16_t>("
             "arcface::cuda::fused::FusedArgs, arcface::cuda::FusedParams)",
        "b": "void arcface::cuda::fused::fwd_sm90_kernel<cutlass::half_t>("
             "arcface::cuda::fused::FusedArgs, arcface::cuda::FusedParams)",
        "c": "void arcface::cuda::(anonymous namespace)::fwd_kernel<__nv_bfloat16>(int)",
        "d": "void arcface::cuda::(anonymous namespace)::fwd_kernel<float>(int)",
        "e": "void arcface::cuda::(anonymous namespace)::fwd_combine_kernel(float const*)",
    }
    codes = {k: k for k in names}
    assert K.cuda_function(codes, names, "fwd_sm90_kernel", "BFloat16") == "a"
    assert K.cuda_function(codes, names, "fwd_sm90_kernel", "Half") == "b"
    assert K.cuda_function(codes, names, "fwd_sm90_kernel", "Float") is None
    assert K.cuda_function(codes, names, "fwd_kernel", "BFloat16") == "c"
    assert K.cuda_function(codes, names, "fwd_kernel", "Float") == "d"
    assert K.cuda_function(codes, names, "fwd_combine_kernel", "Float") == "e"
    assert K.cuda_function(codes, names, "fwd_sm80_kernel", "BFloat16") is None


@pytest.mark.parametrize("arch, kind", [("sm_90a", "sm90"), ("sm_80", "sm80")])
def test_fused_kernels_occupancy_counts_their_dynamic_shared_memory(arch, kind):
    """A fused launch's dynamic shared memory (its record's sizes["smem"]) is added to the
    cubin's static shared memory: 2 CTAs per SM, as the kernels are designed (128
    registers at 256 threads on sm_90a; on sm_80 shared memory is the limit)."""
    from bench.static import report as R
    cfg = K.CUDA_FUSED[kind]
    smem = K.fused_pipeline_bytes(kind) + 2 * cfg["bn"] * 8   # host.h FUSED*_SMEM
    code = _code()
    code.static_smem = 16
    rep = R.Report(["cpp"], [arch], ["bf16"], "unused")
    rep.cuda_codes[arch] = {"f": code}
    rep.cuda_names[arch] = {"f": f"void arcface::cuda::fused::fwd_{kind}_kernel"
                                 "<cutlass::bfloat16_t>(arcface::cuda::fused::FusedArgs)"}
    rec = dict(kernel=f"fwd_{kind}_kernel", dtype="BFloat16", threads=cfg["threads"],
               grid=(64, 4), sizes=dict(smem=smem))
    comp = rep.compiled_cuda(rec, arch)
    assert comp.smem == 16 + smem
    assert comp.blocks_per_sm == 2
    if arch == "sm_80":
        assert comp.limiter == "shared memory"
        # without the dynamic shared memory it would have been the registers' 4
        assert sass.blocks_per_sm(hw.A100, 128, 128, 16)[0] == 4


def test_fused_work_restates_the_tiling():
    """fwd_sm90_kernel at N=8192, C=262144, D=512 (the host code's launch): 64 row tiles
    x 4 splits of 512 class tiles of 128 x 128 x (8 k tiles of 64); bytes: x, w, their
    norms, labels, target and 24 B of partials per row and split."""
    rec = dict(kernel="fwd_sm90_kernel", dtype="BFloat16", threads=256, grid=(64, 4),
               sizes=dict(n=8192, d=512, j_begin=0, j_end=262144, tiles=2048,
                          tiles_per_split=512, ldg=0, indexed=0, bm=128, bn=128, bk=64,
                          smem=99328))
    w = K.spec_of("cpp", "fwd_sm90_kernel").work(rec)
    assert (w.programs, w.threads, w.tiles) == (256, 256, 512)
    assert w.tile_flops == 2 * 128 * 128 * 512
    assert w.programs * w.tiles * w.tile_flops == 2.0 * 8192 * 262144 * 512
    assert w.bytes == (8192 + 262144) * 512 * 2 + 4 * (8192 + 262144) + 8 * 8192 \
        + 4 * 8192 + 24 * 8192 * 4
    g = dict(rec, kernel="grad_sm90_kernel", grid=(64, 8),
             sizes=dict(rec["sizes"], j_begin=1024, j_end=2048, tiles=8,
                        tiles_per_split=1, ldg=1024))
    wg = K.spec_of("cpp", "grad_sm90_kernel").work(g)
    assert (wg.programs, wg.tiles) == (512, 1)
    assert wg.bytes == (8192 + 1024) * 512 * 2 + 4 * (8192 + 1024) + 8 * 8192 \
        + 16 * 8192 + 8192 * 1024 * 2
    # padded k tiles: D = 100 is two k tiles of 64
    odd = dict(rec, sizes=dict(rec["sizes"], d=100))
    assert K.spec_of("cpp", "fwd_sm90_kernel").work(odd).tile_flops == 2 * 128 * 128 * 128


def test_cuda_objects_older_than_a_header_are_rebuilt(tmp_path):
    """torch's ninja file has no nvcc depfile with a CPU build of torch: an object older
    than any csrc header is removed before the build (so ninja rebuilds it), a newer one
    is kept."""
    obj = tmp_path / "tmp" / "csrc" / "cuda" / "arcface_cuda.o"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"")
    os.utime(obj, (1, 1))
    assert K._drop_stale_cuda_objects(str(tmp_path)) == [str(obj)]
    assert not obj.exists()
    obj.write_bytes(b"")
    future = max(os.path.getmtime(os.path.join(REPO, "csrc", "cuda", f))
                 for f in os.listdir(os.path.join(REPO, "csrc", "cuda"))) + 3600
    os.utime(obj, (future, future))
    assert K._drop_stale_cuda_objects(str(tmp_path)) == [] and obj.exists()


# ---------------------------------------------------------------------- cost model
def _code(main_size=100, epi=1000, rest=50):
    """Machine code of a kernel with a tile loop around a main loop: ``rest`` instructions
    outside the tile loop, ``epi`` in it outside the main loop, ``main_size`` in the main
    loop, one HGMMA.64x128x16 (65536 FLOPs per warp) among them."""
    lines, pc = [], 0

    def emit(text):
        nonlocal pc
        lines.append(f"        /*{pc:04x}*/                   {text} ;")
        pc += 16
    lines.insert(0, "        .text.k:")
    for _ in range(rest - 1):
        emit("MOV R1, R2")
    tile_head = pc
    for _ in range(epi - 1):
        emit("FADD R1, R2, R3")
    main_head = pc
    emit("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24")
    for _ in range(main_size - 2):
        emit("IADD3 R0, R0, 0x1, RZ")
    emit(f"@P0 BRA 0x{main_head:x}")
    emit(f"@P1 BRA 0x{tile_head:x}")
    lines.append("        /*ffff*/                   EXIT ;")
    code = sass.analyze_instrs("k", "sm_90a", sass.parse_listing("\n".join(lines))["k"],
                               {"REG": 128})
    assert (code.main.size, code.epilogue.size, code.rest.size) == (main_size, epi, rest)
    assert code.main.mma_flops_per_warp == 65536.0
    return code


def test_loop_annotations_weight_instruction_counts(tmp_path):
    """An annotated loop in the epilogue counts its trips; one nested in the main loop
    multiplies the main loop's body."""
    src = tmp_path / "k.cu"
    src.write_text("for (int jj = 0; jj < tc; ++jj) {  // @trips[tc / 2]\n"
                   "for (int e = 0; e < 4; ++e) {  // @trips[4]\n")
    f = str(src)
    listing = "\n".join([
        "        .text.k:",
        "        /*0000*/                   MOV R1, R2 ;",
        "        /*0010*/                   FADD R1, R2, R3 ;",        # tile loop head
        "        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;",
        f'\t//## File "{f}", line 2',
        "        /*0030*/                   LDG.E R4, desc[UR4][R2.64] ;",   # inner loop
        "        /*0040*/               @P2 BRA 0x30 ;",
        "        /*0050*/               @P0 BRA 0x20 ;",                    # main loop
        "        /*0060*/                   MUFU.EX2 R5, R5 ;",            # epilogue loop
        "        /*0070*/                   FADD R6, R5, R6 ;",
        f'\t//## File "{f}", line 1',
        "        /*0080*/               @P3 BRA 0x60 ;",
        "        /*0090*/               @P1 BRA 0x10 ;",                    # tile loop
        "        /*00a0*/                   EXIT ;"])
    code = sass.analyze_instrs("k", "sm_90a", sass.parse_listing(listing)["k"], {})
    assert (code.main_loop.head, code.tile_loop.head) == (0x20, 0x10)
    n = M.instruction_counts(code, {"tc": 64})
    assert n.main == 1 + 4 * 2 + 1          # HGMMA, 4 x (LDG, BRA), BRA
    assert n.epilogue == 1 + 32 * 3 + 1     # FADD, 32 x (MUFU, FADD, BRA), BRA
    assert n.rest == 2                      # MOV, EXIT


def test_per_tile_call_sites_move_main_loop_code_to_the_epilogue(tmp_path):
    """``nvdisasm -gi`` chains: an instruction inlined (through any depth) at a
    ``@per_tile`` line counts once per tile with the epilogue, not once per main-loop
    iteration; the @trips of a loop nested in the main loop still weight it."""
    src = tmp_path / "k.cu"
    src.write_text("acc = mma(acc);\n"                              # 1
                   "if (kt + 2 == kt_count) stage(tile);  // @per_tile\n"   # 2
                   "for (int c = t; c < 64; c += 256) {  // @trips[1]\n"     # 3
                   "  cols[c] = norm[j0 + c];\n"                              # 4
                   "load(kt);\n")                                              # 5
    f = str(src)

    def at(line, *sites):
        chain = [(line, sites[0] if sites else None)] + [
            (a, b) for a, b in zip(sites, list(sites[1:]) + [None])]
        return "\n".join(f'\t//## File "{f}", line {a}' +
                         (f' inlined at "{f}", line {b}' if b else "") for a, b in chain)
    listing = "\n".join([
        "        .text.k:",
        "        /*0000*/                   MOV R1, R2 ;",
        "        /*0010*/                   FADD R1, R2, R3 ;",        # tile loop head
        at(1),
        "        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;",
        at(5),
        "        /*0030*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R2.64] ;",
        at(4, 3, 2),                                                   # inlined at 3, at 2
        "        /*0040*/                   LDG.E R4, desc[UR4][R2.64] ;",
        "        /*0050*/                   STS [R5], R4 ;",
        at(3, 2),
        "        /*0060*/               @P2 BRA 0x40 ;",                # the @trips[1] loop
        at(1),
        "        /*0070*/               @P0 BRA 0x20 ;",                # main loop
        "        /*0080*/                   MUFU.EX2 R5, R5 ;",
        "        /*0090*/               @P1 BRA 0x10 ;",                # tile loop
        "        /*00a0*/                   EXIT ;"])
    ins = sass.parse_listing(listing)["k"]
    by_pc = {i.pc: i for i in ins}
    assert by_pc[0x40].line == (f, 4) and by_pc[0x40].sites == ((f, 3), (f, 2))
    assert by_pc[0x50].sites == ((f, 3), (f, 2))    # same chain until the next comment
    assert by_pc[0x60].line == (f, 3) and by_pc[0x60].sites == ((f, 2),)
    assert by_pc[0x70].sites == ()
    code = sass.analyze_instrs("k", "sm_90a", ins, {})
    assert (code.main_loop.head, code.tile_loop.head) == (0x20, 0x10)
    assert [K.per_tile(by_pc[pc]) for pc in (0x20, 0x30, 0x40, 0x50, 0x60, 0x70)] == \
        [False, False, True, True, True, False]
    n = M.instruction_counts(code, {})
    assert n.main == 3                      # HGMMA, LDGSTS, BRA
    assert n.epilogue == 1 + 3 + 2          # FADD, the per-tile loop's 3, MUFU, BRA
    assert n.rest == 2


def test_cold_lines_and_subroutines_count_nothing(tmp_path):
    """An aux kernel's instructions from a ``@cold`` line (or inlined at one) count 0, as
    do those of a ``@cold[EXPR]`` line where EXPR holds over the launch's sizes, and
    those of subroutines (code after a ``$name:`` label, reached by CALL: the CUDA
    library's slow paths, __noinline__ functions); the call itself still counts."""
    src = tmp_path / "k.cu"
    src.write_text("float ss = sum(row);\n"                               # 1
                   "if (ss == INFINITY) rescale(row);  // @cold (overflow)\n"  # 2
                   "  mx = max(mx, row[t]);\n"                            # 3
                   "return w_row_sub(idx, p, K);  // @cold[k == 1]\n"     # 4
                   "out[row] = 1 / sqrt(ss);\n")                          # 5
    f = str(src)
    listing = "\n".join([
        "        .text.k:",
        f'\t//## File "{f}", line 1',
        "        /*0000*/                   FFMA R1, R2, R2, R1 ;",
        f'\t//## File "{f}", line 3 inlined at "{f}", line 2',
        "        /*0010*/                   FMNMX R3, R3, R4, !PT ;",
        "        /*0020*/                   SHFL.BFLY PT, R4, R3, 0x10, 0x1f ;",
        f'\t//## File "{f}", line 4',
        "        /*0030*/                   IMAD R5, R6, R7, RZ ;",
        f'\t//## File "{f}", line 5',
        "        /*0040*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_sqrt_rn_f32_slowpath) ;",
        "        /*0050*/                   STG.E [R8.64], R1 ;",
        "        /*0060*/                   EXIT ;",
        "$__internal_0_$__cuda_sm20_sqrt_rn_f32_slowpath:",
        "        /*0070*/                   MUFU.RSQ R9, R1 ;",
        "        /*0080*/                   FMUL R9, R9, R1 ;",
        "        /*0090*/                   RET.REL.NODEC R10 0x0 ;"])
    ins = sass.parse_listing(listing)["k"]
    assert [i.subroutine for i in ins].count("$__internal_0_$__cuda_sm20_sqrt_rn_f32_slowpath") == 3
    code = sass.analyze_instrs("k", "sm_90a", ins, {})
    assert code.main is None and code.size == 10
    # k == 1: lines 2 (and 3, inlined there) and 4 cold, the subroutine too
    assert M.aux_instruction_count(code, {"k": 1}) == 4      # FFMA, CALL, STG, EXIT
    assert M.aux_instruction_count(code, {"k": 3}) == 5      # + the K > 1 line
    by_pc = {i.pc: i for i in ins}
    assert K.cold(by_pc[0x10], {"k": 3}) and not K.cold(by_pc[0x0], {"k": 1})
    assert K.cold(by_pc[0x30], {"k": 1}) and not K.cold(by_pc[0x30], {"k": 2})


def test_model_serial_when_one_block_fits_and_overlapped_otherwise():
    gpu = hw.H200
    work = K.Work(programs=gpu.sms, threads=256, tiles=10, tile_flops=2 * 128 * 128 * 512,
                  bytes=0)
    code = _code(main_size=10)
    iters = (work.tile_flops / 8) / 65536.0
    one = M.kernel_time(gpu, M.Compiled(code, 256, 0, 1, "registers"), work, {})
    two = M.kernel_time(gpu, M.Compiled(code, 256, 0, 2, "registers"), work, {})
    per_sm_issue = gpu.issue_rate / gpu.sms
    tensor = 10 * work.tile_flops / (gpu.matmul_flops / gpu.sms)
    main_issue = 8 * (50 + 10 * iters * 10) / per_sm_issue
    assert tensor > main_issue
    epi_issue = 8 * 10 * 1000 / per_sm_issue
    assert one.iterations_per_tile == pytest.approx(iters)
    assert one.tensor_s == pytest.approx(tensor)
    assert one.time_s == pytest.approx(max(tensor, main_issue) + epi_issue
                                       + hw.DEVICE_LAUNCH_GAP_S)
    assert two.time_s == pytest.approx(max(tensor, main_issue + epi_issue)
                                       + hw.DEVICE_LAUNCH_GAP_S)
    assert two.time_s < one.time_s


def test_model_memory_bound_and_waves():
    gpu = hw.H200
    code = _code()
    work = K.Work(programs=gpu.sms + 1, threads=256, tiles=1, tile_flops=0.0, bytes=48e9)
    kt = M.kernel_time(gpu, M.Compiled(code, 256, 0, 4, "registers"), work, {})
    assert kt.bound == "memory"
    assert kt.time_s == pytest.approx(48e9 / gpu.hbm_bytes + hw.DEVICE_LAUNCH_GAP_S)
    # one block more than the SMs: the busiest SM runs two blocks
    w2 = K.Work(programs=gpu.sms + 1, threads=256, tiles=1, tile_flops=1e9)
    kt2 = M.kernel_time(gpu, M.Compiled(code, 256, 0, 1, "registers"), w2, {})
    assert kt2.tensor_s == pytest.approx(2 * 1e9 / (gpu.matmul_flops / gpu.sms))


def test_host_sync_serializes_the_phase():
    tr = T.Trace(ops=[T.OpRecord("fwd", "aten", "add", bytes=int(4.8e9))], syncs=[],
                 peak_bytes=0, end_bytes=0, grad_bytes=0,
                 host_events={"fwd": {"aten_kernel_ops": 1000}, "bwd": {}},
                 triton_launches=[], wall_s=0.0)
    free = M.predict(tr, None)["predicted_ms"]["fwd"]
    dev = 1e3 * (4.8e9 / hw.H200.hbm_bytes + hw.DEVICE_LAUNCH_GAP_S)
    host = 1000 * hw.HOST_ATEN_KERNEL_OP_S * 1e3
    assert host > dev
    assert free == pytest.approx(host)        # the host runs ahead: the larger
    tr.syncs = [T.SyncRecord("fwd", "item", "here")]
    assert M.predict(tr, None)["predicted_ms"]["fwd"] == pytest.approx(dev + host)


# ------------------------------------------------------------------- committed report
COMMITTED = os.path.join(REPO, "bench", "results", "static_sm90a.json")


@pytest.fixture(scope="module")
def committed():
    with open(COMMITTED) as f:
        return json.load(f)


def test_committed_report_is_from_the_current_sources(committed):
    from bench.static.report import sources_sha
    assert committed["meta"]["sources_sha"] == sources_sha(), (
        "bench/results/static_sm90a.json is stale (the kernels, their launch paths or the "
        "model changed): rerun `python -m bench static --out bench/results --tag "
        "static_sm90a` and commit it")


def test_committed_report_is_complete(committed):
    from bench.static.report import SCHEMA, SHAPES
    assert committed["schema"] == SCHEMA and committed["meta"]["prediction"] is True
    shapes = {(s["backend"], s["N"], s["C"], s["D"], s["loss"]) for s in committed["shapes"]}
    for b in ("triton", "cpp"):
        for n, c, d, loss in SHAPES:
            assert (b, n, c, d, loss) in shapes
    kernels = {(k["backend"], k["role"], k["arch"], k["dtype"]) for k in committed["kernels"]}
    for b in ("triton", "cpp"):
        for role in ("fwd_main", "bwd_main"):
            for arch in ("sm_90a", "sm_80"):
                for dt in ("bf16", "fp16", "fp32"):
                    assert (b, role, arch, dt) in kernels, (b, role, arch, dt)
    # the cpp backend's fused kernels, each on the arch whose device launches it (the
    # other arch's instance is a trap), with its dynamic shared memory counted
    names = {(k["backend"], k["name"], k["arch"], k["dtype"]) for k in committed["kernels"]}
    # (the headline shapes have no index: on sm_90a the TMA kernels)
    for arch, kind in (("sm_90a", "sm90_tma"), ("sm_80", "sm80")):
        other = "sm80" if kind == "sm90_tma" else "sm90_tma"
        for dt in ("bf16", "fp16"):
            for name in ("fwd", "grad"):
                assert ("cpp", f"{name}_{kind}_kernel", arch, dt) in names, (name, arch, dt)
                assert ("cpp", f"{name}_{other}_kernel", arch, dt) not in names
    for k in committed["kernels"]:
        if k["backend"] == "cpp" and k["name"].endswith(("_sm90_kernel", "_sm90_tma_kernel",
                                                         "_sm80_kernel")):
            kind = k["name"].split("_")[1]
            assert k["smem_dynamic_bytes"] >= K.fused_pipeline_bytes(kind)
            assert k["threads"] == K.CUDA_FUSED[kind]["threads"]
            assert k["blocks_per_sm"] == K.CUDA_FUSED_CTAS_PER_SM, k
            assert k["tensor_core"]["hgmma" if "sm90" in k["name"] else "hmma"] > 0
    for k in committed["kernels"]:
        for field in ("regs", "spill_bytes", "smem_bytes", "threads", "blocks_per_sm",
                      "opcodes", "tensor_core", "ldsm", "global_access"):
            assert field in k
    for s in committed["shapes"]:
        assert set(s["predicted_ms"]) == {"fwd", "bwd", "total"}
        assert 0 < s["predicted_peak_fraction"] < 1.5


def test_markdown_shows_measured_beside_predicted(committed):
    from bench.static.report import to_markdown
    rep = json.loads(json.dumps(committed))
    s = rep["shapes"][0]
    s["measured"] = dict(measured_ms=dict(fwd=1.0, bwd=2.0, total=3.0), extra_bytes=5 * MiB,
                         host_syncs=2, kernels=[dict(name=s["kernels"][0]["name"] + "_x",
                                                     launches=1, ms=0.123)])
    md = to_markdown(rep)
    assert "measured ms fwd / bwd / total" in md
    assert "1.00 / 2.00 / **3.00** | 5.0 | 2 |" in md
    assert f"{3.0 / s['predicted_ms']['total']:.2f}" in md
    if not s["kernels"][0]["name"].startswith("aten."):
        assert "0.123" in md
