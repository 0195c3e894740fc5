// The op schemas (declared once, here) and the argument checks shared by the CPU and the
// CUDA implementations (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError). The schema strings are identical to
// arcface_kernels/_ops.py FWD_SCHEMA / BWD_SCHEMA (tests/test_cpp.py compares them).
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace arcface {

Dims check_fwd_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                    const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& bias, double s, double m1, double m2,
                    double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
                    int64_t sub_centers, double softcap, double interclass,
                    double grad_filter, int64_t block) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, "w must be 2-D [C*K, D], got shape ", w.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1, "labels must be 1-D [N], got shape ", labels.sizes());
  auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "x must be float16/bfloat16/float32/float64, got ", dt);
  TORCH_CHECK_TYPE(w.scalar_type() == dt, "w dtype must match x dtype ", dt, ", got ",
              w.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK_VALUE(labels.size(0) == x.size(0), "labels has ", labels.size(0),
              " rows but x has ", x.size(0));
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "w has D=", w.size(1), " but x has D=", x.size(1));
  TORCH_CHECK_VALUE(x.device() == w.device() && x.device() == labels.device(),
              "x, w and labels must be on one device, got ", x.device(), ", ", w.device(),
              ", ", labels.device());
  TORCH_CHECK_VALUE(sub_centers >= 1, "sub_centers must be >= 1, got ", sub_centers);
  TORCH_CHECK_VALUE(w.size(0) % sub_centers == 0, "w has ", w.size(0),
              " rows, not a multiple of sub_centers=", sub_centers);
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "s must be finite and > 0, got ", s);
  TORCH_CHECK_VALUE(std::isfinite(m1) && m1 > 0, "m1 must be finite and > 0, got ", m1);
  TORCH_CHECK_VALUE(m2 >= 0 && m2 < PI, "m2 must be in [0, pi), got ", m2);
  TORCH_CHECK_VALUE(std::isfinite(m3), "m3 must be finite, got ", m3);
  TORCH_CHECK_VALUE(wrap_mode == WRAP_FALLBACK || wrap_mode == WRAP_EASY || wrap_mode == WRAP_NONE,
              "wrap_mode must be 0 (fallback), 1 (easy) or 2 (none), got ", wrap_mode);
  TORCH_CHECK_VALUE(grad_mode == GRAD_EXACT || grad_mode == GRAD_STRAIGHT_THROUGH,
              "grad_mode must be 0 (exact) or 1 (straight_through), got ", grad_mode);
  TORCH_CHECK_VALUE(normalize || (m1 == 1.0 && m2 == 0.0),
              "normalize=False needs m1 == 1 and m2 == 0 (angular margins are undefined on "
              "unbounded logits), got m1=", m1, ", m2=", m2);
  TORCH_CHECK_VALUE(block >= 0, "block must be >= 0 (0 = default), got ", block);
  TORCH_CHECK_VALUE(std::isfinite(grad_filter) && grad_filter >= 0 && grad_filter < 1,
                    "grad_filter must be in [0, 1) (0 = exact gradient), got ", grad_filter);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0,
                    "softcap must be finite and >= 0 (0 = off), got ", softcap);
  TORCH_CHECK_VALUE(std::isfinite(interclass) && interclass >= 0,
                    "interclass must be finite and >= 0 (0 = off), got ", interclass);
  Dims dims{x.size(0), x.size(1), w.size(0), sub_centers, w.size(0) / sub_centers};
  if (index.has_value()) {
    const auto& idx = *index;
    TORCH_CHECK_VALUE(idx.dim() == 1, "index must be 1-D [C_shard], got shape ", idx.sizes());
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "index must be int64, got ",
                idx.scalar_type());
    TORCH_CHECK_VALUE(idx.device() == x.device(), "index must be on x's device ", x.device(),
                ", got ", idx.device());
    dims.c = idx.size(0);
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    const int64_t classes = w.size(0) / sub_centers;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == classes, "bias must have shape [",
                      classes, "] (one value per class of w: ", w.size(0), " rows / sub_centers=",
                      sub_centers, "), got shape ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == w.scalar_type(), "bias dtype must match w dtype ",
                     w.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), "bias must be on x's device ", x.device(),
                      ", got ", b.device());
  }
  return dims;
}

namespace {
void check_row_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be 1-D of length N=", n,
              ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating, got ",
              t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(),
              ", got ", t.device());
}
}  // namespace

Dims check_bwd_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                    const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                    const at::Tensor& g_p, const at::Tensor& g_t, const at::Tensor& g_s,
                    double s, double m1, double m2, double m3, int64_t wrap_mode,
                    int64_t grad_mode, bool normalize, int64_t sub_centers, double softcap,
                    double interclass, double grad_filter, int64_t block) {
  Dims dm = check_fwd_args(x, w, labels, index, bias, s, m1, m2, m3, wrap_mode, grad_mode,
                           normalize, sub_centers, softcap, interclass, grad_filter, block);
  TORCH_CHECK_NOT_IMPLEMENTED(grad_filter == 0,
                              "the cpp backend computes the exact gradient: it has no "
                              "gradient filter (grad_filter_eps must be None), got ",
                              grad_filter);
  check_row_vector(lse, "lse", dm.n, x);
  check_row_vector(g_p, "g_p", dm.n, x);
  check_row_vector(g_t, "g_t", dm.n, x);
  check_row_vector(g_s, "g_s", dm.n, x);
  return dm;
}

namespace {
// Every value of t in [lo, hi). On the CPU an error with the values found; on a device a
// device-side assert (no host sync: a step stays capturable in a CUDA graph), which stops
// the process with ``what``.
void check_range(const at::Tensor& t, int64_t lo, int64_t hi, const std::string& what) {
  if (t.numel() == 0) return;
  if (!t.device().is_cpu()) {
    at::_assert_async(at::logical_and(t.ge(lo), t.lt(hi)).all(), what);
    return;
  }
  auto mm = at::aminmax(t);
  const int64_t tlo = std::get<0>(mm).item<int64_t>(), thi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_VALUE(tlo >= lo && thi < hi, what, ", got values in [", tlo, ", ", thi, "]");
}
}  // namespace

void check_values(const at::Tensor& labels, const std::optional<at::Tensor>& index,
                  const Dims& dims) {
  check_range(labels, -1, dims.c,
              "labels must be in [-1, " + std::to_string(dims.c) +
                  ") (positions in the shard, -1 = no target)");
  if (index.has_value()) {
    const int64_t num = dims.r / dims.k;
    check_range(*index, 0, num,
                "index must hold class ids in [0, " + std::to_string(num) + ") (w has " +
                    std::to_string(dims.r) + " rows, sub_centers=" +
                    std::to_string(dims.k) + ")");
  }
}

ContiguousInputs make_contiguous(const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& labels,
                                 const std::optional<at::Tensor>& index,
                                 const std::optional<at::Tensor>& bias) {
  ContiguousInputs in{x.contiguous(), w.contiguous(), labels.contiguous(), std::nullopt,
                      std::nullopt};
  if (index.has_value()) in.index = index->contiguous();
  if (bias.has_value()) in.bias = bias->contiguous();
  return in;
}

bool compiled_with_cuda() {
#ifdef ARCFACE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace arcface

TORCH_LIBRARY_FRAGMENT(arcface_kernels, m) {
  m.def(
      "cpp_fwd(Tensor x, Tensor w, Tensor labels, Tensor? index, Tensor? bias, float s, "
      "float m1, float m2, float m3, int wrap_mode, int grad_mode, bool normalize, "
      "int sub_centers, float softcap, float interclass, float grad_filter, int block) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_bwd(Tensor x, Tensor w, Tensor labels, Tensor? index, Tensor? bias, Tensor lse, "
      "Tensor g_p, Tensor g_t, Tensor g_s, float s, float m1, float m2, float m3, "
      "int wrap_mode, int grad_mode, bool normalize, int sub_centers, float softcap, "
      "float interclass, float grad_filter, int block) -> (Tensor, Tensor, Tensor)");
}
