// Python bindings of the pack op's CUDA kernels (kernels/csrc/pack_tokens.cu); argument checks
// live here, the launch logic in the .cu file. Built by kernels/cuda_pack.py.
#include <torch/extension.h>

void pack_forward_cuda(at::Tensor out, const at::Tensor& text, const at::Tensor& visual,
                       const at::Tensor& special, const at::Tensor& index);
void gather_rows_cuda(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                      const at::Tensor& offsets, int64_t row_base);
void special_grad_cuda(at::Tensor grad_sp, const at::Tensor& grad_out, const at::Tensor& order,
                       const at::Tensor& offsets, int64_t sp_base, int64_t chunk);

namespace {

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ",
              like.device());
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous [rows, hidden] "
              "tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.size(1) == like.size(1), name, " has hidden size ", t.size(1), ", expected ",
              like.size(1));
}

void check_int(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous int64 vector");
}

void check_dtype(const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16,
              "pack_tokens CUDA kernels take float32, float16 or bfloat16, got ", d);
}

void forward(at::Tensor out, const at::Tensor& text, const at::Tensor& visual,
             const at::Tensor& special, const at::Tensor& index) {
  check_dtype(out);
  check_rows(out, "out", out);
  check_rows(text, "text", out);
  check_rows(visual, "visual", out);
  check_rows(special, "special", out);
  check_int(index, "index", out);
  TORCH_CHECK(index.numel() == out.size(0), "index has ", index.numel(), " entries but out has ",
              out.size(0), " rows");
  pack_forward_cuda(out, text, visual, special, index);
}

void gather_rows(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                 const at::Tensor& offsets, int64_t row_base) {
  check_dtype(grad_out);
  check_rows(grad_out, "grad_out", grad_out);
  check_rows(grad_src, "grad_src", grad_out);
  check_int(order, "order", grad_out);
  check_int(offsets, "offsets", grad_out);
  TORCH_CHECK(order.numel() == grad_out.size(0), "order must have one entry per output row");
  TORCH_CHECK(row_base >= 0 && row_base + grad_src.size(0) < offsets.numel(),
              "offsets too short for rows [", row_base, ", ", row_base + grad_src.size(0), ")");
  gather_rows_cuda(grad_src, grad_out, order, offsets, row_base);
}

void special_grad(at::Tensor grad_sp, const at::Tensor& grad_out, const at::Tensor& order,
                  const at::Tensor& offsets, int64_t sp_base, int64_t chunk) {
  check_dtype(grad_out);
  check_rows(grad_out, "grad_out", grad_out);
  check_rows(grad_sp, "grad_special", grad_out);
  check_int(order, "order", grad_out);
  check_int(offsets, "offsets", grad_out);
  TORCH_CHECK(order.numel() == grad_out.size(0), "order must have one entry per output row");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  TORCH_CHECK(sp_base >= 0 && sp_base + grad_sp.size(0) < offsets.numel(),
              "offsets too short for the special rows");
  special_grad_cuda(grad_sp, grad_out, order, offsets, sp_base, chunk);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_sphinx pack_tokens CUDA kernels";
  m.def("forward", &forward, "out[i] = [text; visual; special][index[i]] (zeros for -1)",
        py::arg("out"), py::arg("text"), py::arg("visual"), py::arg("special"), py::arg("index"));
  m.def("gather_rows", &gather_rows, "grad_src[r] = sum of grad_out over row r's positions",
        py::arg("grad_src"), py::arg("grad_out"), py::arg("order"), py::arg("offsets"),
        py::arg("row_base"));
  m.def("special_grad", &special_grad, "grad_special[j] = deterministic chunked sum over row j",
        py::arg("grad_special"), py::arg("grad_out"), py::arg("order"), py::arg("offsets"),
        py::arg("sp_base"), py::arg("chunk"));
}
