"""Build script. The package is pure Python plus an optional C++/CUDA extension,
arcface_kernels._C (csrc/): the C++ CPU kernel is always built; the CUDA kernel too when

* FORCE_CUDA=1, or
* a GPU is visible to torch and nvcc is found.

Switches (environment):
  FORCE_CUDA=1            build the CUDA kernel even without a visible GPU
  ARCFACE_NO_EXTENSION=1  build nothing native (pure-Python install)
  CUDA_HOME               the CUDA toolkit (otherwise found from nvcc: a wrapper script on
                          PATH is resolved through `nvcc --dryrun`'s TOP= line)
  TORCH_CUDA_ARCH_LIST    target GPUs; default "8.0;9.0" when forced without a GPU
  MAX_JOBS                parallel compile jobs (ninja)

With a CPU-only build of torch, FORCE_CUDA=1 still compiles every CUDA source (the CI
compile check) but the module cannot be linked against torch's CUDA libraries, which
that torch lacks; it is then built under the name arcface_kernels._C_cuda_check, which
nothing imports.
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[arcface-kernels setup] {msg}", file=sys.stderr)


def find_cuda_home():
    """The real CUDA toolkit: $CUDA_HOME / $CUDA_PATH, else where nvcc really lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if not os.path.exists(os.path.join(home, "bin", "nvcc")):
                raise RuntimeError(f"{var}={home!r} has no bin/nvcc")
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:  # nvcc may be a wrapper script: ask the driver where its toolkit is
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            top = os.path.realpath(m.group(1).strip())  # TOP is the toolkit root
            if os.path.exists(os.path.join(top, "bin", "nvcc")):
                return top
    except (OSError, subprocess.SubprocessError):
        pass
    home = os.path.dirname(os.path.dirname(nvcc))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None


def want_cuda(torch, cuda_home):
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
        return True
    return cuda_home is not None and torch.cuda.is_available()


def extensions():
    if os.environ.get("ARCFACE_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch

    cuda_home = find_cuda_home()
    with_cuda = want_cuda(torch, cuda_home)
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    from torch.utils import cpp_extension as ce

    if with_cuda:
        ce.CUDA_HOME = cuda_home
    # -fno-trapping-math / -fno-math-errno (as torch itself is built) let the compiler
    # vectorize the element-wise loops; NaN and inf semantics are unchanged. -fopenmp:
    # at::parallel_for is header code, serial unless compiled with OpenMP (the CPU
    # kernel's parallel regions); libgomp is the one torch already loaded (same soname).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    sources = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/cpu/arcface_cpu.cpp",
               "csrc/cuda/host.cpp", "csrc/cuda/dry_run.cpp"]
    name = "arcface_kernels._C"
    if not with_cuda:
        _log("building the C++ CPU kernel (no CUDA: set FORCE_CUDA=1 to compile it)")
        ext = ce.CppExtension(name, sources, extra_compile_args={"cxx": cxx},
                              extra_link_args=["-fopenmp"])
        return [ext], {"build_ext": ce.BuildExtension}
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
            "-DARCFACE_WITH_CUDA"]
    sources.append("csrc/cuda/arcface_cuda.cu")
    cxx.append("-DARCFACE_WITH_CUDA")
    cpu_torch = torch.version.cuda is None
    if cpu_torch:
        name = "arcface_kernels._C_cuda_check"
        cxx.append("-DARCFACE_CUDA_CHECK_MODULE")
        _log("torch is a CPU build: compiling the CUDA kernel as a compile check only "
             f"(module {name}, not importable); install a CUDA build of torch to use it")
    _log(f"building the C++ CPU and the CUDA kernel (CUDA_HOME={cuda_home}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')})")
    include_dirs = []
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl",
                                       "cuda_cmake_macros.h")):
        include_dirs.append(os.path.join(HERE, "csrc", "cuda", "compat"))
    ext = ce.CUDAExtension(name, sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                           extra_link_args=["-fopenmp"])
    if cpu_torch:  # these libraries exist only in CUDA builds of torch
        ext.libraries = [lib for lib in ext.libraries if lib not in ("c10_cuda", "torch_cuda")]
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
