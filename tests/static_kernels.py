"""Small Triton kernels with known machine-code properties, compiled (never run) by
tests/test_static.py to check what the static report reads: 128-bit against scalar
global loads, and a kernel that must spill. Imported only in a process without
TRITON_INTERPRET (the tests start one)."""
import triton
import triton.language as tl


@triton.jit
def vector_copy(src, dst, n, BLOCK: tl.constexpr):
    """Contiguous, aligned fp32 copy: 4 consecutive floats per thread, 16-byte accesses."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def gather_copy(src, idx, dst, n, BLOCK: tl.constexpr):
    """A gather through an index: one 4-byte load per element."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    j = tl.load(idx + offs, mask=mask, other=0)
    tl.store(dst + offs, tl.load(src + j, mask=mask), mask=mask)


@triton.jit
def must_spill(src, dst, n, BLOCK: tl.constexpr):
    """A [BLOCK, BLOCK] fp32 state updated in a loop and reduced at the end: with one
    warp and BLOCK = 128 each thread holds 512 live floats, twice the 255 registers
    a thread can have."""
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for i in range(0, n):
        v = tl.load(src + i * BLOCK + r)
        w = tl.load(src + (i + 1) * BLOCK + r)
        acc = acc * 0.5 + v[:, None] * w[None, :]
    tl.store(dst + r, tl.sum(acc, axis=1))
