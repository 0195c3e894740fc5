"""The CuTe layouts of the fused CUDA kernels, checked on the host (no GPU): builds
csrc/cuda/layout_check.cpp with the host C++ compiler against the CUTLASS headers the
extension builds with, runs it, and asserts every configuration passed (accumulator map
covers the tile once, rows in quads, row-column view, shared-memory chunks at the offsets
the copies compute, and on sm90 the TMA boxes' 128-byte swizzle)."""
import os
import shutil
import subprocess

import pytest

from test_build_config import ROOT, _load_setup

CONFIGS = ("sm80 bf16", "sm80 fp16", "sm90 bf16", "sm90 fp16")


@pytest.fixture(scope="module")
def layout_check(tmp_path_factory):
    setup = _load_setup()
    headers = setup.find_cutlass()
    if headers is None:
        pytest.skip("no CUTLASS headers (" + setup.missing_cutlass_message().splitlines()[0]
                    + ")")
    cuda_home = setup.find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit headers (CuTe includes cuda/std)")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    inc = os.path.join(cuda_home, "include")
    exe = str(tmp_path_factory.mktemp("layouts") / "layout_check")
    cmd = [cxx, "-std=c++17", "-O1", "-I", headers.include,
           "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", inc,
           "-I", os.path.join(inc, "cccl"), os.path.join(ROOT, "csrc", "cuda",
                                                          "layout_check.cpp"), "-o", exe]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, "layout_check.cpp did not build:\n" + res.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    return run


def test_layout_check_passes(layout_check):
    assert layout_check.returncode == 0, layout_check.stdout + layout_check.stderr
    assert "FAIL" not in layout_check.stdout


@pytest.mark.parametrize("config", CONFIGS)
def test_every_configuration_checked(layout_check, config):
    lines = [ln for ln in layout_check.stdout.splitlines() if ln.startswith(f"ok {config} ")]
    # the accumulators, the x and the w shared-memory layouts, and on sm90 where TMA puts
    # the x and w boxes
    tma = config.startswith("sm90")
    assert len(lines) == (5 if tma else 3), layout_check.stdout
    assert any("cover" in ln and "once" in ln and "quads" in ln for ln in lines)
    assert sum("TMA box" in ln and "128-byte swizzle" in ln for ln in lines) == (2 if tma else 0)
