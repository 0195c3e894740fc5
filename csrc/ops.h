// Shared declarations of the extension: the argument checks every implementation runs
// (CPU and CUDA) and small helpers. The op schemas themselves live in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>

#include "arcface_math.h"

namespace arcface {

// The workspace bound of the C++ kernels (CPU and CUDA), in bytes: with block = 0 (the
// API's chunk_size=None) the chunk of classes a kernel materializes is chosen so that
// its temporaries stay within it. block > 0 is the number of classes per chunk, honoured
// as given (docs/design.md section 4, "Workspace bounds"). Exposed as
// arcface_kernels._C.WORKSPACE_BYTES.
constexpr int64_t kWorkspaceBytes = int64_t(16) << 20;

// Sizes of one call after its checks: N rows, D features, R rows of w, K sub-centers,
// C classes in the shard (index length, or R / K).
struct Dims {
  int64_t n, d, r, k, c;
};

// Checks of the forward's arguments (shapes, dtypes, devices, scalar ranges); labels and
// index values are checked by check_values. Errors name the argument and its value.
// bias: None or [R / K] (one value per class of w) in w's dtype on x's device; softcap
// and interclass: finite and >= 0 (0 = off).
Dims check_fwd_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                    const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& bias, double s, double m1, double m2,
                    double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
                    int64_t sub_centers, double softcap, double interclass,
                    double grad_filter, int64_t block);

// Checks of the backward's arguments: the forward's, and its per-row vectors lse, g_p,
// g_t, g_s (1-D, N long, floating, on x's device). The C++ backends have no gradient
// filter: grad_filter > 0 raises NotImplementedError.
Dims check_bwd_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                    const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                    const at::Tensor& g_p, const at::Tensor& g_t, const at::Tensor& g_s,
                    double s, double m1, double m2, double m3, int64_t wrap_mode,
                    int64_t grad_mode, bool normalize, int64_t sub_centers, double softcap,
                    double interclass, double grad_filter, int64_t block);

// Value checks: labels in [-1, C), index in [0, R / K): a ValueError with the values
// found on the CPU; a device-side assert on CUDA (no host sync).
void check_values(const at::Tensor& labels, const std::optional<at::Tensor>& index,
                  const Dims& dims);

// The op's tensor inputs made contiguous (copies only where needed), with the index's raw
// pointer (nullptr without an index). Shared by the CPU and CUDA entry points.
struct ContiguousInputs {
  at::Tensor x, w, labels;
  std::optional<at::Tensor> index, bias;
  const int64_t* idx() const {
    return index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  }
};
ContiguousInputs make_contiguous(const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& labels,
                                 const std::optional<at::Tensor>& index,
                                 const std::optional<at::Tensor>& bias);

// Whether the CUDA kernels were compiled into this build.
bool compiled_with_cuda();

}  // namespace arcface
