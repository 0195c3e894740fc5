"""The ceilings the static cost model divides by: one documented place, with sources.

Every figure of the model is a prediction computed from these numbers and from what the
compiled kernels and the traced launch path say (bench/static/model.py); a GPU run
(``bench/gpu_check.sh``) measures the same quantities and is the calibration.

Sources
-------
* NVIDIA H100 Tensor Core GPU datasheet (SXM5) and the Hopper architecture whitepaper:
  132 SMs; 989.4 TFLOP/s dense BF16/FP16 tensor (= 132 SMs x 4096 FLOP/clock x 1.83 GHz
  boost); 494.7 TF32; 66.9 FP32 non-tensor; HBM3 3.35 TB/s; 50 MB L2; 228 KB shared
  memory and 64K 32-bit registers per SM; 2048 threads, 32 blocks per SM; 4 warp
  schedulers per SM, each issuing one warp instruction per clock.
* NVIDIA H200 datasheet (SXM): the same GH100 compute (989 TFLOP/s dense BF16), HBM3e
  4.8 TB/s, 141 GB.
* The measured rate (an earlier H200 measurement of this project): about 790 TFLOP/s for a
  cuBLAS bf16 8192^3 matmul and about 4.3 TB/s for a device copy. The model uses the
  measured matmul rate as the tensor-core ceiling until a GPU run of this project
  measures it again (``bench/gpu_check.sh`` does); the clock it implies (790e12 / (132 x
  4096) = 1.46 GHz, the datasheet's 1.83 GHz throttled under load) sets the instruction
  issue rate and the FP32 rate, so that all ceilings describe the same clock.
* mma.sync (HMMA) on Hopper: "can only reach about 2/3 of the peak throughput of the
  H100", against wgmma (HGMMA) -- Shah et al., FlashAttention-3 (2024), section 2.2.
* A100 SXM (sm_80) for the occupancy of the sm_80 build: 108 SMs, 164 KB shared memory
  per SM (163 KB per block), 64K registers, 2048 threads, 32 blocks per SM.
* Host costs of a launch path (CPU time to enqueue, not GPU time), rough figures used
  until a GPU run measures the step's enqueue time: a Triton JIT launch about 9 us
  (vllm-project/vllm pull 34838, "Triton JIT dispatch: 8.68 us/call", 2026); an eager
  ATen op on CUDA tensors, dispatch plus launch, about 4 us (this project's own estimate
  of the Triton backward's host loop: about 23 ops in about 75 us); a view or an
  allocation without a kernel about 1 us; a cudaLaunchKernel from C++ about 2.5 us; a
  torch.library custom-op call from Python with its autograd wrapper about 10 us; a
  device-side gap between two dependent kernels about 2 us.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Ceilings of one GPU for the cost model (all rates in units per second)."""
    name: str
    arch: str                 # the SASS architecture of the report (sm_90a, sm_80)
    sms: int
    matmul_flops: float       # bf16/fp16 dense tensor-core rate the model divides by
    datasheet_flops: float    # the datasheet's dense bf16 rate (for reference only)
    hbm_bytes: float          # HBM bandwidth
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024   # the driver's reservation per resident block
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    schedulers_per_sm: int = 4             # warp instructions issued per clock per SM
    tensor_flops_per_clock_per_sm: int = 4096   # dense bf16
    hmma_fraction: float = 2.0 / 3.0       # mma.sync against wgmma on Hopper (FA3)

    @property
    def capability(self) -> int:
        """Compute capability as 10 * major + minor (sm_90a -> 90, sm_80 -> 80): what the
        cpp backend's dry run is told its device is (it picks the kernels by it)."""
        m = re.match(r"sm_(\d+)", self.arch)
        return int(m.group(1)) if m else 0

    @property
    def clock_hz(self) -> float:
        """The clock implied by the measured matmul rate."""
        return self.matmul_flops / (self.sms * self.tensor_flops_per_clock_per_sm)

    @property
    def issue_rate(self) -> float:
        """Warp instructions issued per second, whole GPU."""
        return self.sms * self.schedulers_per_sm * self.clock_hz

    @property
    def fp32_flops(self) -> float:
        """FP32 FMA rate (128 lanes x 2 FLOP per SM per clock)."""
        return self.sms * 128 * 2 * self.clock_hz

    def tensor_flops(self, kind: str) -> float:
        """Tensor-core rate for instructions of ``kind``: "hgmma" (wgmma, sm_90a),
        "hmma" (mma.sync), "hmma_tf32", "none" (FMA pipes: counted as instructions)."""
        if kind == "hgmma":
            return self.matmul_flops
        if kind == "hmma":
            return self.matmul_flops * (self.hmma_fraction if self.arch.startswith("sm_90")
                                        else 1.0)
        if kind == "hmma_tf32":
            return self.tensor_flops("hmma") / 2
        raise ValueError(f"no tensor-core rate for {kind!r}")


#: The model's GPU: an H200 SXM (H100 SXM: the same compute, HBM 3.35 TB/s).
H200 = Gpu(name="H200 SXM (modelled)", arch="sm_90a", sms=132, matmul_flops=790e12,
           datasheet_flops=989.4e12, hbm_bytes=4.8e12)
H100 = dataclasses.replace(H200, name="H100 SXM (modelled)", hbm_bytes=3.35e12)
#: For the occupancy of the sm_80 build only (the cost model is for sm_90a).
A100 = Gpu(name="A100 SXM (occupancy only)", arch="sm_80", sms=108, matmul_flops=312e12,
           datasheet_flops=312e12, hbm_bytes=2.0e12, smem_per_sm=164 * 1024,
           smem_per_block=163 * 1024, tensor_flops_per_clock_per_sm=2048)

BY_ARCH: Dict[str, Gpu] = {"sm_90a": H200, "sm_80": A100}

# Host costs of a launch path, seconds (see the module docstring for the sources).
HOST_TRITON_LAUNCH_S = 9e-6
HOST_ATEN_KERNEL_OP_S = 4e-6
HOST_ATEN_META_OP_S = 1e-6
HOST_CUDA_LAUNCH_S = 2.5e-6
HOST_CUSTOM_OP_S = 10e-6
DEVICE_LAUNCH_GAP_S = 2e-6

#: The CUDA caching allocator rounds every block up to this many bytes; its
#: max_memory_allocated counts the rounded sizes, and so does the memory tracer.
ALLOC_ROUND_BYTES = 512

#: Liger-Kernel's published CuTe SM90 fused linear cross-entropy at N=8192, C=131072,
#: D=4096 on an H100: 50.4 ms, 698 TFLOP/s counting 8 N C D (the strongest peer figure).
PEER_LLM_HEAD = dict(name="Liger CuTe SM90 (H100, published)", ms=50.4, tflops=698.0)
