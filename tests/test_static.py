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


def test_cpp_dry_run_records_the_host_codes_launches():
    _C = _cpp_ext()
    tr = T.trace_arcface("cpp", 100, 300, 64, torch.bfloat16)
    cuda = [(o.phase, o.name) for o in tr.ops if o.kind == "cuda"]
    assert cuda == [("fwd", "inv_norm_kernel"), ("fwd", "inv_norm_kernel"),
                    ("fwd", "fwd_kernel"), ("fwd", "fwd_combine_kernel"),
                    ("bwd", "inv_norm_kernel"), ("bwd", "inv_norm_kernel"),
                    ("bwd", "scaled_rows_kernel"), ("bwd", "grad_chunk_kernel"),
                    ("bwd", "scaled_rows_kernel"), ("bwd", "dw_chunk_finish_kernel"),
                    ("bwd", "dx_finish_kernel")]
    fwd = next(o for o in tr.ops if o.name == "fwd_kernel").detail
    # 2 row tiles of 64; 5 class tiles of 64, split 5 ways (4 waves over 132 SMs wanted)
    assert fwd["grid"] == (2, 5) and fwd["threads"] == 128
    assert fwd["sizes"]["tiles_per_split"] == 1 and fwd["dtype"] == "BFloat16"
    # labels checked on the device in both ops (ops.cpp check_values): asserts, no sync
    assert tr.syncs == []
    for phase in ("fwd", "bwd"):
        assert "_assert_async" in [o.name for o in tr.ops if o.phase == phase], phase
    del _C


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
