// oneDNN matmul on strided fp32 CPU tensors, for the GEMMs whose operands arrive transposed.
//
// Why: PyTorch's fp32 `mm` / `bmm` go to MKL, whose AVX2 path (the one it takes on AMD CPUs) runs at about half of
// what oneDNN reaches on the same shapes (benchmarks/RESULTS.md, fifth session), and the oneDNN entry Python can
// reach (`mkldnn::_linear_pointwise`) copies a transposed input first. `at::native::mkldnn_matmul` reads a
// contiguous or transposed (last two dims swapped) operand in place. It is exported by libtorch_cpu but has no
// operator, so it is declared here and wrapped as `cpm2::onednn_matmul` / `cpm2::onednn_addmatmul_`.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace at {
namespace native {
// result = beta * result + alpha * (mat1 @ mat2); mat1 and mat2 both 2-D or both 3-D (ATen/native/mkldnn/Matmul.h).
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace native
}  // namespace at

namespace {

void check_operands(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "cpm2::onednn_matmul: CPU tensors only");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "cpm2::onednn_matmul: float32 only, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK((a.dim() == 2 && b.dim() == 2) || (a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0)),
              "cpm2::onednn_matmul: both operands 2-D, or both 3-D with the same batch, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(-1) == b.size(-2), "cpm2::onednn_matmul: inner sizes differ: ", a.sizes(), " @ ", b.sizes());
}

at::Tensor onednn_matmul(const at::Tensor& a, const at::Tensor& b) {
  check_operands(a, b);
  at::Tensor out = a.dim() == 2 ? at::empty({a.size(0), b.size(1)}, a.options())
                                : at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  if (a.numel() == 0 || b.numel() == 0) {
    return out.zero_();
  }
  at::native::mkldnn_matmul(a, b, out, /*beta=*/0.0f, /*alpha=*/1.0f);
  return out;
}

at::Tensor& onednn_addmatmul_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  check_operands(a, b);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == a.dim() &&
                  out.size(-2) == a.size(-2) && out.size(-1) == b.size(-1) && out.size(0) == a.size(0),
              "cpm2::onednn_addmatmul_: out must be a contiguous float32 tensor of the product's shape");
  if (a.numel() == 0 || b.numel() == 0) {
    return out;
  }
  at::native::mkldnn_matmul(a, b, out, /*beta=*/1.0f, /*alpha=*/1.0f);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpm2, m) {  // a fragment: mpu/fast_linear.py defines cpm2::onednn_linear too
  m.def("onednn_matmul(Tensor a, Tensor b) -> Tensor");
  m.def("onednn_addmatmul_(Tensor(a!) out, Tensor a, Tensor b) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(cpm2, CPU, m) {
  m.impl("onednn_matmul", onednn_matmul);
  m.impl("onednn_addmatmul_", onednn_addmatmul_);
}
