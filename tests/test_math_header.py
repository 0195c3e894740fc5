"""csrc/arcface_math.h on the host: its online log-sum-exp update (lse_push, which the
CUDA forward runs per logit) compiled with g++ and run here, against the float64 answer.

The case it exists for: a running max and a logit both -inf (a row whose logits so far
are all -inf, possible with normalize=False), where the plain update exp(z - m) is
exp(-inf - -inf) = NaN although the inputs are not NaN.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = r"""
#include <cstdio>
#include <initializer_list>
#include <limits>
#include "arcface_math.h"
using namespace arcface;

template <typename T>
void run(const char* name, std::initializer_list<T> zs) {
  Lse<T> st = lse_empty<T>();
  for (T z : zs) lse_push(st, z);
  // also through lse_merge of one-element states, which the kernels use across threads
  Lse<T> mg = lse_empty<T>();
  for (T z : zs) {
    Lse<T> one = lse_empty<T>();
    lse_push(one, z);
    mg = lse_merge(mg, one);
  }
  std::printf("%s %.17g %.17g\n", name, (double)lse_value(st), (double)lse_value(mg));
}

int main() {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  run<double>("all_ninf", {-inf, -inf, -inf});
  run<double>("ninf_then_finite", {-inf, -inf, 1.5, -inf, 0.25});
  run<double>("finite_then_ninf", {2.0, -inf, -1.0});
  run<double>("nan_sticks", {-inf, nan, 3.0});
  run<double>("ascending", {-3.0, 0.0, 4.0, 10.0});
  run<float>("f32_all_ninf", {-(float)inf, -(float)inf});
  run<float>("f32_ninf_then_finite", {-(float)inf, -(float)inf, 1.5f, 0.25f});
  run<float>("f32_large", {80.f, 100.f, -inf, 90.f});
  return 0;
}
"""


def _want(zs):
    finite = [z for z in zs if z != -math.inf]
    if any(math.isnan(z) for z in zs):
        return math.nan
    if not finite:
        return -math.inf
    m = max(finite)
    return m + math.log(sum(math.exp(z - m) for z in finite))


CASES = {
    "all_ninf": [-math.inf] * 3,
    "ninf_then_finite": [-math.inf, -math.inf, 1.5, -math.inf, 0.25],
    "finite_then_ninf": [2.0, -math.inf, -1.0],
    "nan_sticks": [-math.inf, math.nan, 3.0],
    "ascending": [-3.0, 0.0, 4.0, 10.0],
    "f32_all_ninf": [-math.inf] * 2,
    "f32_ninf_then_finite": [-math.inf, -math.inf, 1.5, 0.25],
    "f32_large": [80.0, 100.0, -math.inf, 90.0],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("math_header")
    src, exe = d / "t.cpp", d / "t"
    src.write_text(PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"), str(src),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: tuple(float(v) for v in line.split()[1:])
            for line in out.splitlines()}


@pytest.mark.parametrize("case", list(CASES))
def test_lse_push(results, case):
    """lse_push (and lse_merge of pushed states) gives the log-sum-exp of the logits:
    -inf for only -inf logits (not NaN), NaN only when a logit is NaN."""
    want = _want(CASES[case])
    tol = 1e-6 if case.startswith("f32") else 1e-15
    for got in results[case]:
        if math.isnan(want):
            assert math.isnan(got), (case, got)
        elif math.isinf(want):
            assert got == want, (case, got)
        else:
            assert abs(got - want) <= tol * max(1.0, abs(want)), (case, got, want)
