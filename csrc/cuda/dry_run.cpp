// Dry run of the CUDA backend's host code (host.cpp) for the static kernel report
// (bench/static): the same checks, buffers, ATen calls and launch order as a real call,
// with a runner that records each kernel launch instead of making it. Compiled into every
// build, GPU or not.
//
//   arcface_kernels._C.cuda_dry_run_fwd(x, w, labels, index, bias, s, m1, m2, m3,
//       wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass, grad_filter,
//       block, num_sms) -> (outputs, launches)
//   arcface_kernels._C.cuda_dry_run_bwd(x, w, labels, index, bias, lse, g_p, g_t, g_s, s,
//       ..., block, num_sms) -> (outputs, launches)
// (the op's arguments, as its schema in ops.cpp orders them, then num_sms)
//
// The tensors are CUDA tensors of a torch FakeTensorMode (or real ones: nothing is read or
// launched); the ATen calls of the host code then go through the caller's dispatch modes,
// which see its allocations, ops and host syncs. `launches` is a list of dicts: kernel,
// grid [x, y], threads, dtype and the sizes the kernel's cost depends on.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "host.h"

namespace arcface::cuda {
namespace {

class RecordingRunner final : public KernelRunner {
 public:
  RecordingRunner(int sms, int capability) : sms_(sms), cap_(capability) {}
  int num_sms(const at::Tensor&) override { return sms_; }
  int capability(const at::Tensor&) override { return cap_; }
  // the build the report reads has sm_90a code (bench/static compiles 8.0 and 9.0a)
  Fused fused_kind(const at::Tensor&) override {
    return cap_ >= 90 && cap_ < 100 ? Fused::kSm90 : cap_ >= 80 ? Fused::kSm80 : Fused::kNone;
  }
  bool aligned16(const at::Tensor&) override { return true; }  // fresh allocations are

  void fused_fwd(Fused kind, const Launch& l, const at::Tensor& x, const at::Tensor&,
                 const at::Tensor&, const at::Tensor* idx, const at::Tensor&,
                 const at::Tensor&, const at::Tensor&, const FusedParams& p, at::Tensor&,
                 at::Tensor&, at::Tensor&) override {
    add(fused_name("fwd", kind, p), l, x, fused_sizes(kind, p, idx));
  }
  void fused_grad(Fused kind, const Launch& l, const at::Tensor& x, const at::Tensor&,
                  const at::Tensor&, const at::Tensor* idx, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const FusedParams& p,
                  at::Tensor&) override {
    add(fused_name("grad", kind, p), l, x, fused_sizes(kind, p, idx));
  }

  void inv_norm(const Launch& l, const at::Tensor& v, const at::Tensor* idx, int64_t rows,
                int64_t k, int64_t d, bool normalize, at::Tensor&, at::Tensor*) override {
    add("inv_norm_kernel", l, v, {{"rows", rows}, {"k", k}, {"d", d},
                                  {"indexed", idx != nullptr}, {"normalize", normalize}});
  }
  void fwd(const Launch& l, const at::Tensor& x, const at::Tensor&, const at::Tensor&,
           const at::Tensor* idx, bool terms, const at::Tensor* bias, const at::Tensor&,
           const at::Tensor&, const at::Tensor&, const Params& p, at::Tensor&, at::Tensor&,
           at::Tensor&) override {
    add(terms ? "fwd_terms_kernel" : "fwd_kernel", l, x, params(p, idx, bias));
  }
  void fwd_combine(const Launch& l, const at::Tensor& part, const at::Tensor&, int64_t n,
                   int64_t splits, const Margin<float>&, bool, at::Tensor&, at::Tensor&,
                   at::Tensor&, at::Tensor&) override {
    add("fwd_combine_kernel", l, part, {{"n", n}, {"splits", splits}});
  }
  void scaled_rows(const Launch& l, const at::Tensor& v, const at::Tensor* idx, int64_t row0,
                   int64_t rows, int64_t k, int64_t d, const at::Tensor&,
                   at::Tensor&) override {
    add("scaled_rows_kernel", l, v, {{"row0", row0}, {"rows", rows}, {"k", k}, {"d", d},
                                     {"indexed", idx != nullptr}});
  }
  void grad_chunk(const Launch& l, const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                  const at::Tensor* idx, bool terms, const at::Tensor* bias,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const Params& p, int64_t j0, int64_t jn, at::Tensor&,
                  at::Tensor*) override {
    auto v = params(p, idx, bias);
    v.push_back({"j0", j0});
    v.push_back({"jn", jn});
    add(terms ? "grad_chunk_terms_kernel" : "grad_chunk_kernel", l, x, v);
  }
  void dw_chunk_finish(const Launch& l, const at::Tensor& w, const at::Tensor* idx,
                       const at::Tensor&, int64_t row0, int64_t rows, int64_t k, int64_t d,
                       bool normalize, const at::Tensor&, at::Tensor&, bool direct,
                       bool prescaled) override {
    add("dw_chunk_finish_kernel", l, w, {{"row0", row0}, {"rows", rows}, {"k", k}, {"d", d},
                                         {"indexed", idx != nullptr},
                                         {"normalize", normalize}, {"direct", direct},
                                         {"prescaled", prescaled}});
  }
  void dx_finish(const Launch& l, const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                 int64_t n, int64_t d, bool normalize, at::Tensor&) override {
    add("dx_finish_kernel", l, x, {{"n", n}, {"d", d}, {"normalize", normalize}});
  }

  py::list launches() const { return launches_; }

 private:
  using Sizes = std::vector<std::pair<std::string, int64_t>>;

  // the kernel CudaRunner launches: fwd / grad, sm90 (by TMA: _tma) or sm80
  static std::string fused_name(const char* role, Fused kind, const FusedParams& p) {
    const char* arch = kind != Fused::kSm90 ? "_sm80" : p.tma ? "_sm90_tma" : "_sm90";
    return std::string(role) + arch + "_kernel";
  }

  // bm / bn / bk: the CTA tile; smem: dynamic shared memory bytes per CTA; tma: the
  // operand tiles by TMA
  static Sizes fused_sizes(Fused kind, const FusedParams& p, const at::Tensor* idx) {
    return {{"n", p.n}, {"d", p.d}, {"j_begin", p.j_begin}, {"j_end", p.j_end},
            {"tiles", p.tiles}, {"tiles_per_split", p.tiles_per_split}, {"ldg", p.ldg},
            {"indexed", idx != nullptr}, {"bm", fused_bm(kind)}, {"bn", fused_bn(kind)},
            {"bk", 64}, {"tma", p.tma}, {"fold_b", p.fold_b},
            {"smem", kind == Fused::kSm90 ? FUSED90_SMEM : FUSED80_SMEM}};
  }

  static Sizes params(const Params& p, const at::Tensor* idx, const at::Tensor* bias) {
    return {{"n", p.n}, {"d", p.d}, {"r", p.r}, {"k", p.k}, {"c", p.c}, {"tc", p.tc},
            {"ntiles", p.ntiles}, {"tiles_per_split", p.tiles_per_split},
            {"indexed", idx != nullptr}, {"bias", bias != nullptr},
            {"softcap", p.mp.capped}, {"interclass", p.mp.filter}};
  }

  // `typed`: the tensor whose dtype selects the kernel's template instance.
  void add(const std::string& kernel, const Launch& l, const at::Tensor& typed,
           const Sizes& sizes) {
    py::dict rec;
    rec["kernel"] = kernel;
    rec["grid"] = py::make_tuple(l.grid_x, l.grid_y);
    rec["threads"] = l.threads;
    rec["dtype"] = std::string(c10::toString(typed.scalar_type()));
    py::dict s;
    for (const auto& [name, value] : sizes) s[py::str(name)] = value;
    rec["sizes"] = s;
    launches_.append(rec);
  }

  int sms_, cap_;
  py::list launches_;
};

py::tuple dry_run_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                      const std::optional<at::Tensor>& index,
                      const std::optional<at::Tensor>& bias, double s, double m1, double m2,
                      double m3, int64_t wrap_mode, int64_t grad_mode, bool normalize,
                      int64_t sub_centers, double softcap, double interclass,
                      double grad_filter, int64_t block, int num_sms, int capability) {
  RecordingRunner run(num_sms, capability);
  auto out = fwd_host(run, x, w, labels, index, bias, s, m1, m2, m3, wrap_mode, grad_mode,
                      normalize, sub_centers, softcap, interclass, grad_filter, block);
  return py::make_tuple(out, run.launches());
}

py::tuple dry_run_bwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                      const std::optional<at::Tensor>& index,
                      const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                      const at::Tensor& g_p, const at::Tensor& g_t, const at::Tensor& g_s,
                      double s, double m1, double m2, double m3, int64_t wrap_mode,
                      int64_t grad_mode, bool normalize, int64_t sub_centers, double softcap,
                      double interclass, double grad_filter, int64_t block, int num_sms,
                      int capability) {
  RecordingRunner run(num_sms, capability);
  auto out = bwd_host(run, x, w, labels, index, bias, lse, g_p, g_t, g_s, s, m1, m2, m3,
                      wrap_mode, grad_mode, normalize, sub_centers, softcap, interclass,
                      grad_filter, block);
  return py::make_tuple(out, run.launches());
}

}  // namespace

bool add_dry_run_functions(PyObject* module) {
  try {
    py::module_ m = py::reinterpret_borrow<py::module_>(module);
    // the op's arguments positionally, then num_sms and capability (10 * major + minor of
    // the modelled GPU, default 90: an H100 / H200 with the sm_90a kernels)
    m.def("cuda_dry_run_fwd", &dry_run_fwd,
          "Host path of the CUDA forward with launches recorded, not made "
          "(-> (outputs, launches))",
          py::arg("x"), py::arg("w"), py::arg("labels"), py::arg("index"), py::arg("bias"),
          py::arg("s"), py::arg("m1"), py::arg("m2"), py::arg("m3"), py::arg("wrap_mode"),
          py::arg("grad_mode"), py::arg("normalize"), py::arg("sub_centers"),
          py::arg("softcap"), py::arg("interclass"), py::arg("grad_filter"),
          py::arg("block"), py::arg("num_sms"), py::arg("capability") = 90);
    m.def("cuda_dry_run_bwd", &dry_run_bwd,
          "Host path of the CUDA backward with launches recorded, not made "
          "(-> (outputs, launches))",
          py::arg("x"), py::arg("w"), py::arg("labels"), py::arg("index"), py::arg("bias"),
          py::arg("lse"), py::arg("g_p"), py::arg("g_t"), py::arg("g_s"), py::arg("s"),
          py::arg("m1"), py::arg("m2"), py::arg("m3"), py::arg("wrap_mode"),
          py::arg("grad_mode"), py::arg("normalize"), py::arg("sub_centers"),
          py::arg("softcap"), py::arg("interclass"), py::arg("grad_filter"),
          py::arg("block"), py::arg("num_sms"), py::arg("capability") = 90);
    return true;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return false;
  }
}

}  // namespace arcface::cuda
