"""The build logic of setup.py, without building anything: the CUDA architecture list,
the CUTLASS header discovery and its version range, and the decision to build the CUDA
kernel. setup.py is loaded as a module (its setup() runs only as __main__)."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    spec = importlib.util.spec_from_file_location("arcface_setup",
                                                  os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load_setup()


def fake_include(path, version=(4, 2, 0), with_cute=True):
    """A CUTLASS include folder with cutlass/version.h of that version; returns it."""
    os.makedirs(os.path.join(path, "cutlass"), exist_ok=True)
    if with_cute:
        os.makedirs(os.path.join(path, "cute"), exist_ok=True)
        with open(os.path.join(path, "cute", "tensor.hpp"), "w") as f:
            f.write("#pragma once\n")
    major, minor, patch = version
    with open(os.path.join(path, "cutlass", "version.h"), "w") as f:
        f.write(f"#pragma once\n#define CUTLASS_MAJOR {major}\n#define CUTLASS_MINOR {minor}\n"
                f"#define CUTLASS_PATCH {patch} \n#define CUTLASS_BUILD 0\n")
    return str(path)


def _find(env, root, package=None):
    return S.find_cutlass(environ=env, root=str(root), package_include=lambda: package)


# ------------------------------------------------------------------ architectures
def _portable_ptx(archs):
    return [a for a in archs.split(";") if a.endswith("+PTX") and not a[:-4].endswith("a")]


@pytest.mark.parametrize("requested", [None, "", "native", "  "])
def test_default_without_gpu_has_ptx_and_90a(requested):
    archs, notes = S.cuda_arch_list(requested, ())
    assert archs == "8.0+PTX;9.0a" == S.DEFAULT_ARCHS
    assert notes == []


@pytest.mark.parametrize("caps, want", [
    ([(9, 0)], "8.0+PTX;9.0a"),
    ([(8, 0)], "8.0+PTX"),
    ([(8, 0), (9, 0), (9, 0)], "8.0+PTX;9.0a"),
    ([(7, 5)], "7.5;8.0+PTX"),
    ([(8, 6)], "8.0+PTX;8.6"),
    ([(10, 0)], "8.0+PTX;10.0"),
])
def test_default_with_gpus(caps, want):
    archs, _ = S.cuda_arch_list(None, caps)
    assert archs == want
    assert _portable_ptx(archs) == ["8.0+PTX"]
    assert ("9.0a" in archs.split(";")) == ((9, 0) in caps)
    assert "9.0" not in archs.split(";")


@pytest.mark.parametrize("requested, want", [
    ("9.0", "9.0a"),
    ("8.0;9.0", "8.0;9.0a"),
    ("8.0 9.0", "8.0;9.0a"),
    ("9.0+PTX", "8.0+PTX;9.0a"),
    ("8.0;9.0+PTX", "8.0+PTX;9.0a"),
    ("9.0+PTX;8.6+PTX", "9.0a;8.6+PTX"),
])
def test_plain_90_is_rewritten_to_90a(requested, want):
    archs, notes = S.cuda_arch_list(requested, [(9, 0)])
    assert archs == want
    assert notes and all("9.0a" in n for n in notes)


@pytest.mark.parametrize("requested", ["8.0;9.0a", "7.5", "9.0a", "8.0+PTX;9.0a", "Hopper",
                                       "9.0a+PTX", "7.5;8.0;8.6;8.9;9.0a;10.0"])
def test_other_lists_pass_unchanged(requested):
    # below sm_80 (7.5) included: the kernel source guards itself
    assert S.cuda_arch_list(requested, ()) == (requested, [])


@pytest.mark.parametrize("requested", [None, "8.0;9.0", "9.0+PTX", "7.5"])
def test_torch_accepts_the_lists(monkeypatch, requested):
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    get_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if get_flags is None:
        pytest.skip("this torch has no _get_cuda_arch_flags")
    archs, _ = S.cuda_arch_list(requested, ())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    flags = " ".join(get_flags())
    if requested != "7.5":
        assert "arch=compute_90a,code=sm_90a" in flags
        assert "code=sm_90," not in flags and not flags.endswith("code=sm_90")
    if requested in (None, "9.0+PTX"):
        assert "arch=compute_80,code=compute_80" in flags      # the PTX newer GPUs JIT
    if requested == "7.5":
        assert flags == "-gencode=arch=compute_75,code=sm_75"


# ------------------------------------------------------------------ CUTLASS discovery
def test_cutlass_path_checkout_root_wins(tmp_path):
    checkout = tmp_path / "cutlass"
    fake_include(checkout / "include", (4, 2, 1))
    fake_include(tmp_path / S.CUTLASS_LOCAL)
    pkg = fake_include(tmp_path / "pkg")
    got = _find({"CUTLASS_PATH": str(checkout)}, tmp_path, pkg)
    assert got.include == os.path.realpath(checkout / "include")
    assert got.version == (4, 2, 1)
    assert "CUTLASS_PATH" in got.source


def test_cutlass_path_may_be_the_include_folder(tmp_path):
    inc = fake_include(tmp_path / "somewhere" / "include")
    got = _find({"CUTLASS_PATH": inc}, tmp_path)
    assert got.include == os.path.realpath(inc)


def test_cutlass_path_without_headers_is_an_error(tmp_path):
    fake_include(tmp_path / S.CUTLASS_LOCAL)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match=re.escape(f"CUTLASS_PATH={empty}")):
        _find({"CUTLASS_PATH": str(empty)}, tmp_path)


def test_local_copy_before_package(tmp_path):
    local = fake_include(tmp_path / S.CUTLASS_LOCAL)
    pkg = fake_include(tmp_path / "pkg")
    got = _find({}, tmp_path, pkg)
    assert got.include == os.path.realpath(local)
    assert got.source == S.CUTLASS_LOCAL
    # local=False (make cutlass-include: the local copy is the destination)
    got = S.find_cutlass({}, str(tmp_path), lambda: pkg, local=False)
    assert got.include == os.path.realpath(pkg)


def test_package_last(tmp_path):
    pkg = fake_include(tmp_path / "site-packages" / "cutlass_library" / "source" / "include")
    got = _find({"CUTLASS_PATH": ""}, tmp_path, pkg)
    assert got.include == os.path.realpath(pkg)
    assert "nvidia-cutlass" in got.source


def test_nothing_found(tmp_path):
    assert _find({}, tmp_path, None) is None
    assert _find({}, tmp_path, str(tmp_path / "missing")) is None


@pytest.mark.parametrize("version", [(4, 3, 0), (4, 1, 9), (3, 9, 0), (5, 0, 0)])
def test_out_of_range_version_is_an_error(tmp_path, version):
    inc = fake_include(tmp_path / "inc", version)
    text = ".".join(map(str, version))
    with pytest.raises(RuntimeError) as e:
        _find({"CUTLASS_PATH": inc}, tmp_path)
    msg = str(e.value)
    assert f"CUTLASS {text} found at {os.path.realpath(inc)}" in msg or \
        f"CUTLASS {text} found at {inc}" in msg
    assert ">=4.2,<4.3" in msg and S.CUTLASS_PIP_SPEC in msg


def test_out_of_range_first_source_does_not_fall_through(tmp_path):
    fake_include(tmp_path / S.CUTLASS_LOCAL, (4, 3, 0))
    pkg = fake_include(tmp_path / "pkg", (4, 2, 0))
    with pytest.raises(RuntimeError, match=re.escape(S.CUTLASS_LOCAL)):
        _find({}, tmp_path, pkg)


@pytest.mark.parametrize("version", [(4, 2, 0), (4, 2, 7)])
def test_in_range_versions(tmp_path, version):
    assert _find({}, tmp_path, fake_include(tmp_path / "p", version)).version == version


def test_unreadable_version_header(tmp_path):
    inc = tmp_path / "inc"
    (inc / "cutlass").mkdir(parents=True)
    (inc / "cutlass" / "version.h").write_text("#pragma once\n")
    with pytest.raises(RuntimeError, match="CUTLASS_MAJOR"):
        _find({"CUTLASS_PATH": str(inc)}, tmp_path)


def test_range_constants_agree():
    assert S.CUTLASS_RANGE == ((4, 2), (4, 3))
    assert S.CUTLASS_PIP_SPEC == "nvidia-cutlass>=4.2,<4.3"


# ------------------------------------------------------------------ the CUDA decision
def test_missing_headers_message():
    msg = S.missing_cutlass_message()
    for part in (f'pip install --no-deps "{S.CUTLASS_PIP_SPEC}"', "CUTLASS_PATH",
                 "make cutlass-include", S.CUTLASS_LOCAL, ">=4.2,<4.3"):
        assert part in msg


def test_forced_without_headers_raises():
    with pytest.raises(RuntimeError, match=r"FORCE_CUDA=1: .*nvidia-cutlass>=4\.2,<4\.3"):
        S.cuda_plan(True, False, "/usr/local/cuda", find=lambda: None)


def test_forced_without_toolkit_raises():
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        S.cuda_plan(True, False, None, find=lambda: None)


def test_gpu_visible_without_headers_builds_cpu_only(capsys):
    assert S.cuda_plan(False, True, "/usr/local/cuda", find=lambda: None) == (False, None)
    err = capsys.readouterr().err
    assert "CUDA kernel is skipped" in err and "pip install --no-deps" in err


def test_no_gpu_no_force_looks_for_nothing():
    def find():
        raise AssertionError("not asked for")
    assert S.cuda_plan(False, False, "/usr/local/cuda", find=find) == (False, None)
    assert S.cuda_plan(False, True, None, find=find) == (False, None)


def test_headers_found():
    hdr = S.CutlassHeaders("/x", (4, 2, 0), "test")
    assert S.cuda_plan(True, False, "/cuda", find=lambda: hdr) == (True, hdr)
    assert S.cuda_plan(False, True, "/cuda", find=lambda: hdr) == (True, hdr)


def test_toolkit_older_than_cuda_12():
    """TMA and __grid_constant__ need CUDA 12: forced, an older toolkit is an error that
    says so; unforced, the CPU kernel alone, with the reason."""
    hdr = S.CutlassHeaders("/x", (4, 2, 0), "test")
    with pytest.raises(RuntimeError, match=r"FORCE_CUDA=1: .*CUDA 12\.0 or newer.*11\.8"):
        S.cuda_plan(True, False, "/cuda", find=lambda: hdr, toolkit_version=(11, 8))
    assert S.cuda_plan(False, True, "/cuda", find=lambda: hdr,
                       toolkit_version=(11, 8)) == (False, None)
    assert S.cuda_plan(True, False, "/cuda", find=lambda: hdr,
                       toolkit_version=(12, 0)) == (True, hdr)


def test_toolkit_version_from_cuda_h(tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("#pragma once\n#define CUDA_VERSION 12080\n")
    assert S.cuda_toolkit_version(str(tmp_path)) == (12, 8)
    assert S.cuda_toolkit_version(str(tmp_path / "none")) is None
    home = S.find_cuda_home()
    if home is not None and os.path.exists(os.path.join(home, "include", "cuda.h")):
        assert S.cuda_toolkit_version(home) >= (12, 0)  # this machine's toolkit


# ------------------------------------------------------------------ make cutlass-include
def test_copy_cutlass_include(tmp_path, capsys, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    src = fake_include(tmp_path / "cutlass" / "include", (4, 2, 0))
    dest = root / S.CUTLASS_LOCAL
    env = {"CUTLASS_PATH": str(tmp_path / "cutlass")}
    assert S.copy_cutlass_include(str(root), env) == str(dest)
    assert (dest / "cute" / "tensor.hpp").is_file()
    assert S.cutlass_version(str(dest)) == (4, 2, 0)
    # a refresh replaces the copy (a file gone from the source is gone from the copy)
    (dest / "stale.h").write_text("")
    fake_include(src, (4, 2, 1))
    S.copy_cutlass_include(str(root), env)
    assert S.cutlass_version(str(dest)) == (4, 2, 1) and not (dest / "stale.h").exists()
    assert "copied CUTLASS 4.2.1" in capsys.readouterr().out
    # no other source: the copy is kept
    monkeypatch.setattr(S, "_cutlass_package_include", lambda: None)
    assert S.copy_cutlass_include(str(root), {}) == str(dest)
    assert "4.2.1 is already there" in capsys.readouterr().out
    assert S.cutlass_version(str(dest)) == (4, 2, 1)


def test_copy_without_any_source_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_cutlass_package_include", lambda: None)
    with pytest.raises(SystemExit, match="make cutlass-include: .*pip install --no-deps"):
        S.copy_cutlass_include(str(tmp_path), {})


# ------------------------------------------------------------------ the other build files
def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_build_files_name_the_same_range():
    (lo_maj, lo_min), (hi_maj, hi_min) = S.CUTLASS_RANGE
    assert S.CUTLASS_PIP_SPEC in _read("Makefile")
    assert S.CUTLASS_PIP_SPEC in _read("README.md")
    cmake = _read("CMakeLists.txt")
    assert re.search(rf"ARCFACE_CUTLASS_MIN\s+{lo_maj}\.{lo_min}\b", cmake)
    assert re.search(rf"ARCFACE_CUTLASS_BELOW\s+{hi_maj}\.{hi_min}\b", cmake)
    assert "80-real;90a-real;80-virtual" in cmake
    assert "/third_party/" in _read(".gitignore").split()
    assert "8.0;9.0a" in _read("bench/gpu_check.sh")


def test_installed_package_headers_in_range():
    inc = S._cutlass_package_include()
    if inc is None:
        pytest.skip("nvidia-cutlass is not installed")
    version = S.cutlass_version(inc)
    S.check_cutlass_version(version, inc)
    assert os.path.isfile(os.path.join(inc, "cute", "tensor.hpp"))
