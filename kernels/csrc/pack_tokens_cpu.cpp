// CPU stand-ins for the three CUDA launchers of pack_tokens.cu, with the same contract (see
// kernels/reference.py). Built only by the tests, together with pack_tokens.cpp compiled with
// -DPACK_TOKENS_CPU_REFERENCE, so that the extension's C++ autograd function (allocation, plan,
// gradient dispatch) is checked on machines without a GPU. Plain ATen ops, no speed intended.
#include <torch/extension.h>

namespace {

// grad_src[r] = sum over k in [offsets[base + r], offsets[base + r + 1]) of grad_out[order[k]],
// accumulated in float32 (float64 for float64) in position order; zeros for unnamed rows.
void gather_sum(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                const at::Tensor& offsets, int64_t base) {
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto off = offsets.accessor<int64_t, 1>();
  for (int64_t r = 0; r < grad_src.size(0); ++r) {
    const int64_t lo = off[base + r], hi = off[base + r + 1];
    at::Tensor sum = at::zeros({grad_out.size(1)}, grad_out.options().dtype(acc));
    for (int64_t k = lo; k < hi; ++k) sum += grad_out[order[k].item<int64_t>()].to(acc);
    grad_src[r].copy_(sum);
  }
}

}  // namespace

void pack_forward_cuda(at::Tensor out, const at::Tensor& text, const at::Tensor& visual,
                       const at::Tensor& special, const at::Tensor& index) {
  const int64_t t = text.size(0), r = visual.size(0), k = special.size(0);
  const at::Tensor zero = at::zeros({1, text.size(1)}, text.options());
  const at::Tensor table = at::cat({text, visual, special, zero});
  const at::Tensor valid = index.ge(0).logical_and(index.lt(t + r + k));
  out.copy_(table.index_select(0, at::where(valid, index, t + r + k)));
}

void gather_rows_cuda(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                      const at::Tensor& offsets, int64_t row_base) {
  gather_sum(grad_src, grad_out, order, offsets, row_base);
}

void special_grad_cuda(at::Tensor grad_sp, const at::Tensor& grad_out, const at::Tensor& order,
                       const at::Tensor& offsets, int64_t sp_base, int64_t /*chunk*/) {
  gather_sum(grad_sp, grad_out, order, offsets, sp_base);
}
