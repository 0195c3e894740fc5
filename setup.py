"""Build script. The package is pure Python plus an optional C++/CUDA extension,
arcface_kernels._C (csrc/): the C++ CPU kernel is always built; the CUDA kernel too when

* FORCE_CUDA=1, or
* a GPU is visible to torch and nvcc is found,

and the CUTLASS / CuTe headers are found (the CUDA kernel is built on them; headers only,
nothing is linked). They are looked for in this order:

1. $CUTLASS_PATH: a CUTLASS checkout (the folder holding include/) or its include folder
   itself (the one holding cute/ and cutlass/);
2. third_party/cutlass/include in this checkout (git-ignored; `make cutlass-include`
   copies it there, to carry to a machine without a package registry);
3. the installed Python package nvidia-cutlass (module cutlass_library, located without
   importing it), which ships the headers in cutlass_library/source/include; install it
   with `pip install --no-deps "nvidia-cutlass>=4.2,<4.3"`: its Python dependencies
   (cuda-python, scipy, networkx, ...) are not needed for the headers.

The first one found must be a tested release, CUTLASS_RANGE (>= 4.2, < 4.3, from
cutlass/version.h), else the build stops with the version and the path found. Without
headers, a build that only wanted CUDA because a GPU is visible builds the CPU kernel
alone and says why; FORCE_CUDA=1 without headers is an error.

Switches (environment):
  FORCE_CUDA=1            build the CUDA kernel even without a visible GPU (an error when
                          the toolkit or the CUTLASS headers are missing)
  ARCFACE_NO_EXTENSION=1  build nothing native (pure-Python install)
  CUDA_HOME               the CUDA toolkit (otherwise found from nvcc: a wrapper script on
                          PATH is resolved through `nvcc --dryrun`'s TOP= line)
  CUTLASS_PATH            the CUTLASS headers (see above)
  TORCH_CUDA_ARCH_LIST    target GPUs (torch's syntax, e.g. "8.0;9.0a" or "7.5"). Unset (or
                          "native"): "8.0+PTX;9.0a" without a visible GPU; with GPUs, each
                          visible capability ("9.0a" for 9.0, else "X.Y") and "8.0+PTX".
                          The PTX of compute_80 is JIT-compiled for newer GPUs (sm_100, ...),
                          which a 9.0a PTX could not serve. A given "9.0" is rewritten to
                          "9.0a" (wgmma exists only in sm_90a), with a log line; "9.0+PTX"
                          becomes "9.0a" plus "8.0+PTX" for the newer GPUs. Named
                          architectures ("Hopper", ...) pass to torch unchanged.
                          Architectures below sm_80 are kept (the kernel source guards them).
  MAX_JOBS                parallel compile jobs (ninja)

With a CPU-only build of torch, FORCE_CUDA=1 still compiles every CUDA source (the CI
compile check) but the module cannot be linked against torch's CUDA libraries, which
that torch lacks; it is then built under the name arcface_kernels._C_cuda_check, which
nothing imports.

The functions above `extensions()` are pure (no torch, no compiler) and are tested in
tests/test_build_config.py, which loads this file without running setup() (the build
itself runs only when the file is executed as __main__, as pip and `python setup.py` do).
"""
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))

# The CUTLASS releases the CUDA kernel is tested with: >= CUTLASS_RANGE[0], < CUTLASS_RANGE[1]
# (major, minor). CMakeLists.txt, the Makefile and README.md name the same range
# (tests/test_build_config.py checks that they agree).
CUTLASS_RANGE = ((4, 2), (4, 3))
CUTLASS_PIP_SPEC = "nvidia-cutlass>={}.{},<{}.{}".format(*CUTLASS_RANGE[0], *CUTLASS_RANGE[1])
# the repo-local copy of the headers (git-ignored; `make cutlass-include`)
CUTLASS_LOCAL = os.path.join("third_party", "cutlass", "include")
# TORCH_CUDA_ARCH_LIST when unset and no GPU is visible: SASS for sm_80 and sm_90a, and the
# PTX of compute_80, which the driver JIT-compiles for any newer GPU
DEFAULT_ARCHS = "8.0+PTX;9.0a"
PORTABLE_PTX = "8.0+PTX"


def _log(msg):
    print(f"[arcface-kernels setup] {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------- CUTLASS
class CutlassHeaders(NamedTuple):
    include: str      # the folder holding cute/ and cutlass/
    version: tuple    # (major, minor, patch) from cutlass/version.h
    source: str       # where it was found, for the log


def _range_text():
    (lo_maj, lo_min), (hi_maj, hi_min) = CUTLASS_RANGE
    return f">={lo_maj}.{lo_min},<{hi_maj}.{hi_min}"


def cutlass_version(include):
    """(major, minor, patch) from <include>/cutlass/version.h."""
    path = os.path.join(include, "cutlass", "version.h")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise RuntimeError(f"cannot read the CUTLASS version from {path}: {e}") from None
    parts = []
    for name in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"^\s*#\s*define\s+CUTLASS_{name}\s+(\d+)", text, re.M)
        if m is None:
            raise RuntimeError(f"{path} defines no CUTLASS_{name}: not a CUTLASS version.h")
        parts.append(int(m.group(1)))
    return tuple(parts)


def _cutlass_package_include():
    """cutlass_library/source/include of the installed nvidia-cutlass package, found
    without importing cutlass_library (its import may need packages installed with
    --no-deps left out); None when it is not installed."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        inc = os.path.join(loc, "source", "include")
        if os.path.isdir(inc):
            return inc
    return None


def _is_include(path):
    return os.path.isfile(os.path.join(path, "cutlass", "version.h"))


def find_cutlass(environ=None, root=HERE, package_include=None, local=True):
    """The CUTLASS headers to build with: $CUTLASS_PATH, else ROOT/third_party/cutlass/
    include (unless local=False), else the nvidia-cutlass package (package_include(),
    default _cutlass_package_include()).
    Returns CutlassHeaders, or None when none is found. Raises RuntimeError when
    CUTLASS_PATH is set but holds no headers, or when the first headers found are not a
    release in CUTLASS_RANGE."""
    environ = os.environ if environ is None else environ
    package_include = package_include or _cutlass_package_include
    found = None
    given = environ.get("CUTLASS_PATH", "")
    if given:
        given = os.path.abspath(os.path.expanduser(given))
        for cand in (os.path.join(given, "include"), given):
            if _is_include(cand):
                found = (cand, f"CUTLASS_PATH={given}")
                break
        else:
            raise RuntimeError(
                f"CUTLASS_PATH={given} holds no CUTLASS headers: expected a CUTLASS checkout "
                f"(with include/cutlass/version.h) or its include folder (with "
                f"cutlass/version.h)")
    if found is None and local:
        cand = os.path.join(root, CUTLASS_LOCAL)
        if _is_include(cand):
            found = (cand, CUTLASS_LOCAL)
    if found is None:
        cand = package_include()
        if cand and _is_include(cand):
            found = (cand, "the installed nvidia-cutlass package")
    if found is None:
        return None
    include, source = found
    version = cutlass_version(include)
    check_cutlass_version(version, include, source)
    return CutlassHeaders(os.path.realpath(include), version, source)


def check_cutlass_version(version, include="?", source="?"):
    lo, hi = CUTLASS_RANGE
    if not lo <= tuple(version[:2]) < hi:
        found = ".".join(map(str, version))
        raise RuntimeError(
            f"CUTLASS {found} found at {include} (from {source}), but the CUDA kernel is "
            f"tested with CUTLASS {_range_text()}: install a tested release with "
            f"`pip install --no-deps \"{CUTLASS_PIP_SPEC}\"` or point CUTLASS_PATH at one "
            f"(a checkout or its include folder)")


def missing_cutlass_message(root=HERE):
    return (
        f"the CUDA kernel needs the CUTLASS/CuTe headers (tested: CUTLASS {_range_text()}) "
        f"and none were found (looked at $CUTLASS_PATH, "
        f"{os.path.join(root, CUTLASS_LOCAL)} and the Python package nvidia-cutlass). "
        f"Install them into the Python that builds: `pip install --no-deps "
        f"\"{CUTLASS_PIP_SPEC}\"` (--no-deps: only the headers are needed), or set "
        f"CUTLASS_PATH to a CUTLASS checkout or its include folder "
        f"(`make cutlass-include` copies them to {CUTLASS_LOCAL} for a machine "
        f"without a package registry)")


def copy_cutlass_include(root=HERE, environ=None):
    """`make cutlass-include`: copy the headers found ($CUTLASS_PATH, else the installed
    package) to ROOT/third_party/cutlass/include, replacing an older copy."""
    dest = os.path.join(root, CUTLASS_LOCAL)
    found = find_cutlass(environ, root, local=False)
    if found is None:
        if _is_include(dest):
            version = cutlass_version(dest)
            check_cutlass_version(version, dest, CUTLASS_LOCAL)
            print(f"{CUTLASS_LOCAL}: CUTLASS {'.'.join(map(str, version))} is already "
                  f"there (no other source found to refresh it from)")
            return dest
        raise SystemExit("make cutlass-include: " + missing_cutlass_message(root))
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(found.include, tmp, symlinks=False)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    print(f"copied CUTLASS {'.'.join(map(str, found.version))} headers from {found.include} "
          f"({found.source}) to {CUTLASS_LOCAL} ({size / 2**20:.0f} MiB)")
    return dest


# ----------------------------------------------------------------------------- architectures
def _arch_key(arch):
    m = re.match(r"(\d+)\.(\d+)", arch)
    return (int(m.group(1)), int(m.group(2))) if m else (999, 0)


def cuda_arch_list(requested, capabilities=()):
    """TORCH_CUDA_ARCH_LIST for the CUDA kernel. requested: the user's value (None or ""
    or "native": not set); capabilities: the (major, minor) of each visible GPU.
    Returns (arch list, notes to log)."""
    notes = []
    requested = (requested or "").strip()
    if requested and requested != "native":
        given = [a for a in re.split(r"[;\s]+", requested) if a]
        portable = any(a.endswith("+PTX") and not a[:-4].endswith("a") and a != "9.0+PTX"
                       for a in given)
        archs = []
        for arch in given:
            if arch == "9.0":
                notes.append("TORCH_CUDA_ARCH_LIST: 9.0 -> 9.0a (wgmma exists only in sm_90a)")
                arch = "9.0a"
            elif arch == "9.0+PTX":
                if portable:
                    notes.append("TORCH_CUDA_ARCH_LIST: 9.0+PTX -> 9.0a (wgmma exists only "
                                 "in sm_90a; the list's other +PTX serves newer GPUs)")
                else:
                    notes.append(f"TORCH_CUDA_ARCH_LIST: 9.0+PTX -> {PORTABLE_PTX};9.0a "
                                 f"(wgmma exists only in sm_90a, whose PTX cannot be JIT-"
                                 f"compiled for newer GPUs; compute_80's PTX can)")
                    archs.append(PORTABLE_PTX)
                arch = "9.0a"
            if arch not in archs:
                archs.append(arch)
        if PORTABLE_PTX in archs and PORTABLE_PTX[:-4] in archs:
            archs.remove(PORTABLE_PTX[:-4])     # "8.0+PTX" holds sm_80's SASS too
        return ";".join(archs), notes
    if not capabilities:
        return DEFAULT_ARCHS, notes
    archs = []
    for major, minor in sorted(set((int(a), int(b)) for a, b in capabilities)):
        arch = "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"
        archs.append(PORTABLE_PTX if arch == PORTABLE_PTX[:-4] else arch)
    if PORTABLE_PTX not in archs:
        archs.append(PORTABLE_PTX)
    archs.sort(key=_arch_key)
    return ";".join(archs), notes


def _visible_capabilities(torch):
    """(major, minor) of each visible GPU, clamped (as torch does) to the newest
    architecture this torch was built for."""
    if not torch.cuda.is_available():
        return []
    built = [tuple(divmod(int(re.sub(r"\D", "", a.split("_")[1])), 10))
             for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    newest = max(built) if built else None
    caps = []
    for i in range(torch.cuda.device_count()):
        cap = tuple(torch.cuda.get_device_capability(i))
        caps.append(min(cap, newest) if newest else cap)
    return caps


# ----------------------------------------------------------------------------- toolkit
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


MIN_CUDA = (12, 0)  # TMA tensor maps and __grid_constant__ kernel arguments


def cuda_toolkit_version(cuda_home):
    """(major, minor) of the toolkit at cuda_home from its cuda.h (CUDA_VERSION), or None
    when it cannot be read."""
    if cuda_home is None:
        return None
    try:
        with open(os.path.join(cuda_home, "include", "cuda.h")) as f:
            m = re.search(r"^#define\s+CUDA_VERSION\s+(\d+)", f.read(), re.M)
    except OSError:
        return None
    if m is None:
        return None
    v = int(m.group(1))
    return v // 1000, (v % 1000) // 10


def cuda_plan(forced, gpu_visible, cuda_home, find=find_cutlass, toolkit_version=None):
    """Whether to build the CUDA kernel: (True, CutlassHeaders) or (False, None).
    forced: FORCE_CUDA=1; gpu_visible: torch sees a GPU; toolkit_version: (major, minor)
    of the toolkit, None when unknown. Forced without a toolkit, with one older than
    MIN_CUDA or without CUTLASS headers: RuntimeError. Unforced (a GPU visible) in those
    cases: the CPU kernel only, and a log line saying why and how to fix it."""
    if forced:
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
    elif cuda_home is None or not gpu_visible:
        return False, None
    if toolkit_version is not None and tuple(toolkit_version) < MIN_CUDA:
        why = (f"the CUDA kernels need CUDA {MIN_CUDA[0]}.{MIN_CUDA[1]} or newer (TMA, "
               f"__grid_constant__); the toolkit at {cuda_home} is "
               f"{toolkit_version[0]}.{toolkit_version[1]}: set CUDA_HOME to a newer one")
        if forced:
            raise RuntimeError("FORCE_CUDA=1: " + why)
        _log("a GPU is visible, but the CUDA kernel is skipped (CPU kernel only): " + why)
        return False, None
    cutlass = find()
    if cutlass is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1: " + missing_cutlass_message())
        _log("a GPU is visible, but the CUDA kernel is skipped (CPU kernel only): "
             + missing_cutlass_message())
        return False, None
    return True, cutlass


def extensions():
    if os.environ.get("ARCFACE_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch

    cuda_home = find_cuda_home()
    with_cuda, cutlass = cuda_plan(os.environ.get("FORCE_CUDA", "0") == "1",
                                   torch.cuda.is_available(), cuda_home,
                                   toolkit_version=cuda_toolkit_version(cuda_home))
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported
        os.environ["CUDA_HOME"] = cuda_home
        archs, notes = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"),
                                      _visible_capabilities(torch))
        for note in notes:
            _log(note)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
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
    # CuTe needs C++17 at least and --expt-relaxed-constexpr
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
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, CUTLASS "
         f"{'.'.join(map(str, cutlass.version))} at {cutlass.include} from {cutlass.source})")
    include_dirs = [cutlass.include]
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


if __name__ == "__main__":   # pip (setuptools.build_meta) and `python setup.py` run it so
    from setuptools import setup

    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
