// Python bindings of the pack op's CUDA kernels (kernels/csrc/pack_tokens.cu); argument checks
// live here, the launch logic in the .cu file. Built by kernels/cuda_pack.py.
//
// `pack_tokens` is the whole op as one C++ autograd function (allocation, launch, the autograd
// node, and in backward the plan -- the index sorted by source row -- and the gradient kernels),
// so that a call costs no Python beyond the caller's. Same maths as kernels/reference.py's
// PackTokensFunction with CudaBackend, which stays available for comparison.
#include <torch/extension.h>

#include <limits>
#include <tuple>
#include <vector>

void pack_forward_cuda(at::Tensor out, const at::Tensor& text, const at::Tensor& visual,
                       const at::Tensor& special, const at::Tensor& index);
void gather_rows_cuda(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                      const at::Tensor& offsets, int64_t row_base);
void special_grad_cuda(at::Tensor grad_sp, const at::Tensor& grad_out, const at::Tensor& order,
                       const at::Tensor& offsets, int64_t sp_base, int64_t chunk);

namespace {

#ifdef PACK_TOKENS_CPU_REFERENCE
constexpr bool kCpuAllowed = true;  // test build: CPU stand-ins (pack_tokens_cpu.cpp)
#else
constexpr bool kCpuAllowed = false;
#endif

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() || kCpuAllowed, name, " must be a CUDA tensor");
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
  TORCH_CHECK((t.is_cuda() || kCpuAllowed) && t.device() == like.device(), name,
              " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous int64 vector");
}

void check_dtype(const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16,
              "pack_tokens CUDA kernels take float32, float16 or bfloat16, got ", d);
}

// The sources and the index, checked against `like` (the output, or text).
void check_sources(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& special,
                   const at::Tensor& index, const at::Tensor& like) {
  check_dtype(like);
  check_rows(text, "text", like);
  check_rows(visual, "visual", like);
  check_rows(special, "special", like);
  check_int(index, "index", like);
}

void forward_into(at::Tensor out, const at::Tensor& text, const at::Tensor& visual,
                  const at::Tensor& special, const at::Tensor& index) {
  check_rows(out, "out", out);
  check_sources(text, visual, special, index, out);
  TORCH_CHECK(index.numel() == out.size(0), "index has ", index.numel(), " entries but out has ",
              out.size(0), " rows");
  pack_forward_cuda(out, text, visual, special, index);
}

// The arguments of a gradient gather into `grad` (`name`) of the rows [base, base + rows).
void check_gather(const at::Tensor& grad, const char* name, const at::Tensor& grad_out,
                  const at::Tensor& order, const at::Tensor& offsets, int64_t base) {
  check_dtype(grad_out);
  check_rows(grad_out, "grad_out", grad_out);
  check_rows(grad, name, grad_out);
  check_int(order, "order", grad_out);
  check_int(offsets, "offsets", grad_out);
  TORCH_CHECK(order.numel() == grad_out.size(0), "order must have one entry per output row");
  TORCH_CHECK(base >= 0 && base + grad.size(0) < offsets.numel(), "offsets too short for ",
              name, " rows [", base, ", ", base + grad.size(0), ")");
}

void gather_rows(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                 const at::Tensor& offsets, int64_t row_base) {
  check_gather(grad_src, "grad_src", grad_out, order, offsets, row_base);
  gather_rows_cuda(grad_src, grad_out, order, offsets, row_base);
}

void special_grad(at::Tensor grad_sp, const at::Tensor& grad_out, const at::Tensor& order,
                  const at::Tensor& offsets, int64_t sp_base, int64_t chunk) {
  check_gather(grad_sp, "grad_special", grad_out, order, offsets, sp_base);
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  special_grad_cuda(grad_sp, grad_out, order, offsets, sp_base, chunk);
}

// [rows, like.size(1)] in like's dtype and device; NaN-filled when `poison` (debug mode: an
// unwritten position then shows).
at::Tensor alloc_rows(int64_t rows, const at::Tensor& like, bool poison) {
  at::Tensor t = at::empty({rows, like.size(1)}, like.options());
  if (poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

class PackTokensFn : public torch::autograd::Function<PackTokensFn> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& text,
                            const at::Tensor& visual, const at::Tensor& special,
                            const at::Tensor& index, int64_t chunk, bool poison) {
    at::Tensor out = alloc_rows(index.numel(), text, poison);  // [N, h]
    forward_into(out, text, visual, special, index);
    ctx->save_for_backward({index});
    ctx->saved_data["sizes"] = std::vector<int64_t>{text.size(0), visual.size(0),
                                                    special.size(0)};
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["poison"] = poison;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "pack_tokens: trying to differentiate twice a function that was marked with "
                "@once_differentiable (its backward is not differentiable)");
    const at::Tensor index = ctx->get_saved_variables()[0];
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const bool poison = ctx->saved_data["poison"].toBool();
    const int64_t t = sizes[0], r = sizes[1], k = sizes[2];
    const at::Tensor grad_out = grads[0].contiguous();  // [N, h]
    // The plan: positions sorted by source row (stable), and where each row's run starts.
    at::Tensor rows_sorted, order;
    std::tie(rows_sorted, order) = at::sort(index, /*stable=*/true, /*dim=*/0,
                                            /*descending=*/false);
    const at::Tensor offsets = at::searchsorted(rows_sorted, at::arange(t + r + k + 1,
                                                                        index.options()));
    at::Tensor g_text, g_vis, g_sp;
    if (ctx->needs_input_grad(0)) {
      g_text = alloc_rows(t, grad_out, poison);
      gather_rows(g_text, grad_out, order, offsets, 0);
    }
    if (ctx->needs_input_grad(1)) {
      g_vis = alloc_rows(r, grad_out, poison);
      gather_rows(g_vis, grad_out, order, offsets, t);
    }
    if (ctx->needs_input_grad(2)) {
      g_sp = alloc_rows(k, grad_out, poison);
      special_grad(g_sp, grad_out, order, offsets, t + r, chunk);
    }
    return {g_text, g_vis, g_sp, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor pack_tokens(const at::Tensor& text, const at::Tensor& visual,
                       const at::Tensor& special, const at::Tensor& index, int64_t chunk,
                       bool poison) {
  // Bad input is refused here, before the autograd function: an error thrown inside its
  // forward crashed the process with torch 2.11 (H100 image), where torch 2.14 raised it.
  check_sources(text, visual, special, index, text);
  return PackTokensFn::apply(text, visual, special, index, chunk, poison);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_sphinx pack_tokens CUDA kernels";
  m.def("pack_tokens", &pack_tokens,
        "the op with its autograd node: [text; visual; special][index], gradients in backward",
        py::arg("text"), py::arg("visual"), py::arg("special"), py::arg("index"),
        py::arg("chunk"), py::arg("poison"));
  m.def("forward", &forward_into, "out[i] = [text; visual; special][index[i]] (zeros for -1)",
        py::arg("out"), py::arg("text"), py::arg("visual"), py::arg("special"), py::arg("index"));
  m.def("gather_rows", &gather_rows, "grad_src[r] = sum of grad_out over row r's positions",
        py::arg("grad_src"), py::arg("grad_out"), py::arg("order"), py::arg("offsets"),
        py::arg("row_base"));
  m.def("special_grad", &special_grad, "grad_special[j] = deterministic chunked sum over row j",
        py::arg("grad_special"), py::arg("grad_out"), py::arg("order"), py::arg("offsets"),
        py::arg("sp_base"), py::arg("chunk"));
}
