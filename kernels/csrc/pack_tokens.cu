// CUDA kernels of the pack op (see kernels/reference.py for the contract and the plan).
//
// forward:        out[i] = table[index[i]] (zeros for padding). One warp per output row; the row
//                 is moved as raw bytes with the widest vector type (16-byte uint4 when the row
//                 size and every base pointer allow it), UNROLL loads in flight per lane. The copy
//                 is dtype-agnostic, so bf16 / fp16 / fp32 share one kernel.
// gather_rows:    grad_src[r] = sum of grad_out[order[k]] for k in [offsets[r], offsets[r+1]),
//                 one warp per source row, 16-byte vector loads, fp32 accumulation in position
//                 order: deterministic, no atomics.
// special_grad:   two stages: partial[j][c] = sum over chunk c of special row j's sorted
//                 positions (fp32; only chunks that hold positions run), then grad_special[j] =
//                 sum of row j's partials in chunk order. Deterministic, no atomics.
// Light headers only (no ATen/cuda/CUDAContext.h, which pulls cuSPARSE/cuBLAS headers that a
// minimal CUDA toolkit lacks).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per block
constexpr int kUnroll = 4;

template <typename V>
__global__ void pack_fwd_kernel(char* __restrict__ out, const char* __restrict__ text,
                                const char* __restrict__ visual, const char* __restrict__ special,
                                const int64_t* __restrict__ index, int64_t n, int64_t num_text,
                                int64_t num_vis, int64_t num_sp, int64_t row_vecs) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t i = first; i < n; i += step) {
    const int64_t r = index[i];  // same address for all lanes: one broadcast load
    const V* src = nullptr;
    if (r >= 0 && r < num_text) {
      src = reinterpret_cast<const V*>(text) + r * row_vecs;
    } else if (r >= num_text && r < num_text + num_vis) {
      src = reinterpret_cast<const V*>(visual) + (r - num_text) * row_vecs;
    } else if (r >= num_text + num_vis && r < num_text + num_vis + num_sp) {
      src = reinterpret_cast<const V*>(special) + (r - num_text - num_vis) * row_vecs;
    }
    V* dst = reinterpret_cast<V*>(out) + i * row_vecs;
    if (src == nullptr) {  // padding (or an out-of-range row): zeros
      const V zero{};
      for (int64_t c = lane; c < row_vecs; c += kWarp) dst[c] = zero;
      continue;
    }
    int64_t c = lane;
    for (; c + (kUnroll - 1) * kWarp < row_vecs; c += kUnroll * kWarp) {
      V v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = src[c + u * kWarp];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) dst[c + u * kWarp] = v[u];
    }
    for (; c < row_vecs; c += kWarp) dst[c] = src[c];
  }
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__global__ void gather_rows_kernel(scalar_t* __restrict__ grad_src,
                                   const scalar_t* __restrict__ grad_out,
                                   const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ offsets, int64_t row_base,
                                   int64_t num_src, int64_t hidden) {
  using P = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  const int64_t packs = hidden / VEC;
  for (int64_t r = first; r < num_src; r += step) {
    const int64_t start = offsets[row_base + r];
    const int64_t end = offsets[row_base + r + 1];  // usually start + 1 (or start: unused row)
    P* dst = reinterpret_cast<P*>(grad_src + r * hidden);
    for (int64_t c = lane; c < packs; c += kWarp) {
      float acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
      for (int64_t k = start; k < end; ++k) {
        const P x = reinterpret_cast<const P*>(grad_out + order[k] * hidden)[c];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(x.v[e]);
      }
      P y;
#pragma unroll
      for (int e = 0; e < VEC; ++e) y.v[e] = static_cast<scalar_t>(acc[e]);
      dst[c] = y;
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void special_partial_kernel(float* __restrict__ partial,
                                       const scalar_t* __restrict__ grad_out,
                                       const int64_t* __restrict__ order,
                                       const int64_t* __restrict__ offsets, int64_t sp_base,
                                       int64_t num_chunks, int64_t chunk, int64_t hidden) {
  using P = Pack<scalar_t, VEC>;
  const int64_t c = blockIdx.x;
  const int64_t j = blockIdx.y;
  const int64_t seg_end = offsets[sp_base + j + 1];
  const int64_t lo = offsets[sp_base + j] + c * chunk;
  if (lo >= seg_end) return;  // past this row's positions: not written, never read
  const int64_t hi = lo + chunk < seg_end ? lo + chunk : seg_end;
  const int64_t col = (static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x) * VEC;
  if (col >= hidden) return;
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
  for (int64_t k = lo; k < hi; ++k) {
    const P x = *reinterpret_cast<const P*>(grad_out + order[k] * hidden + col);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] += static_cast<float>(x.v[e]);
  }
  float* dst = partial + (j * num_chunks + c) * hidden + col;
#pragma unroll
  for (int e = 0; e < VEC; ++e) dst[e] = acc[e];
}

// grad_special[j][col] = sum over the written chunks of row j, in chunk order.
template <typename scalar_t>
__global__ void special_sum_kernel(scalar_t* __restrict__ grad_sp,
                                   const float* __restrict__ partial,
                                   const int64_t* __restrict__ offsets, int64_t sp_base,
                                   int64_t num_chunks, int64_t chunk, int64_t hidden) {
  const int64_t j = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= hidden) return;
  const int64_t count = offsets[sp_base + j + 1] - offsets[sp_base + j];
  const int64_t used = (count + chunk - 1) / chunk;
  float acc = 0.f;
  for (int64_t c = 0; c < used; ++c) acc += partial[(j * num_chunks + c) * hidden + col];
  grad_sp[j * hidden + col] = static_cast<scalar_t>(acc);
}

int64_t blocks_for(int64_t rows) {
  const int64_t warps = kThreads / kWarp;
  const int64_t b = (rows + warps - 1) / warps;
  return b < 1 ? 1 : (b > 2147483647 ? 2147483647 : b);
}

uintptr_t addr(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<uintptr_t>(t.data_ptr()) : 0;
}

template <typename V>
void launch_forward(at::Tensor& out, const at::Tensor& text, const at::Tensor& visual,
                    const at::Tensor& special, const at::Tensor& index, int64_t row_bytes) {
  const int64_t n = index.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  pack_fwd_kernel<V><<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<char*>(out.data_ptr()), static_cast<const char*>(text.data_ptr()),
      static_cast<const char*>(visual.data_ptr()), static_cast<const char*>(special.data_ptr()),
      index.data_ptr<int64_t>(), n, text.size(0), visual.size(0), special.size(0),
      row_bytes / static_cast<int64_t>(sizeof(V)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Widest vector (in elements) that divides the row and keeps every pointer aligned.
template <typename scalar_t>
int vec_for(int64_t hidden, std::initializer_list<uintptr_t> ptrs) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(scalar_t));
  for (int v = kMax; v > 1; v /= 2) {
    bool ok = hidden % v == 0;
    for (uintptr_t p : ptrs) ok = ok && (p % (v * sizeof(scalar_t)) == 0);
    if (ok) return v;
  }
  return 1;
}

}  // namespace

void pack_forward_cuda(at::Tensor out, const at::Tensor& text, const at::Tensor& visual,
                       const at::Tensor& special, const at::Tensor& index) {
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return;
  const int64_t row_bytes = out.size(1) * out.element_size();
  const uintptr_t a = addr(out) | addr(text) | addr(visual) | addr(special) |
                      static_cast<uintptr_t>(row_bytes);
  if (a % 16 == 0) {
    launch_forward<uint4>(out, text, visual, special, index, row_bytes);
  } else if (a % 8 == 0) {
    launch_forward<uint2>(out, text, visual, special, index, row_bytes);
  } else if (a % 4 == 0) {
    launch_forward<unsigned int>(out, text, visual, special, index, row_bytes);
  } else if (a % 2 == 0) {
    launch_forward<unsigned short>(out, text, visual, special, index, row_bytes);
  } else {
    launch_forward<unsigned char>(out, text, visual, special, index, row_bytes);
  }
}

void gather_rows_cuda(at::Tensor grad_src, const at::Tensor& grad_out, const at::Tensor& order,
                      const at::Tensor& offsets, int64_t row_base) {
  const c10::cuda::CUDAGuard guard(grad_src.device());
  const int64_t num_src = grad_src.size(0), hidden = grad_src.size(1);
  if (grad_src.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_src.scalar_type(), "gather_rows",
                                  [&] {
    const int vec = vec_for<scalar_t>(hidden, {addr(grad_src), addr(grad_out)});
    auto run = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      gather_rows_kernel<scalar_t, V><<<blocks_for(num_src), kThreads, 0, stream>>>(
          grad_src.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), row_base, num_src, hidden);
    };
    if (vec == 8) run(std::integral_constant<int, 8>{});
    else if (vec == 4) run(std::integral_constant<int, 4>{});
    else if (vec == 2) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void special_grad_cuda(at::Tensor grad_sp, const at::Tensor& grad_out, const at::Tensor& order,
                       const at::Tensor& offsets, int64_t sp_base, int64_t chunk) {
  const c10::cuda::CUDAGuard guard(grad_sp.device());
  const int64_t k = grad_sp.size(0), hidden = grad_sp.size(1);
  if (grad_sp.numel() == 0) return;
  const int64_t n = grad_out.size(0);
  const int64_t num_chunks = n > 0 ? (n + chunk - 1) / chunk : 1;  // upper bound, no host sync
  // Only the chunks that hold positions are written and read; the rest stays untouched.
  at::Tensor partial = at::empty({k, num_chunks, hidden}, grad_out.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "special_grad", [&] {
    if (n > 0) {
      const int vec = vec_for<scalar_t>(hidden, {addr(grad_out)});
      auto run = [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        const int64_t col_blocks = (hidden / V + kThreads - 1) / kThreads;
        const dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(k),
                        static_cast<unsigned>(col_blocks));
        special_partial_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
            partial.data_ptr<float>(), grad_out.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
            offsets.data_ptr<int64_t>(), sp_base, num_chunks, chunk, hidden);
      };
      if (vec == 8) run(std::integral_constant<int, 8>{});
      else if (vec == 4) run(std::integral_constant<int, 4>{});
      else if (vec == 2) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const dim3 grid2(static_cast<unsigned>(k),
                     static_cast<unsigned>((hidden + kThreads - 1) / kThreads));
    special_sum_kernel<scalar_t><<<grid2, kThreads, 0, stream>>>(
        grad_sp.data_ptr<scalar_t>(), partial.data_ptr<float>(), offsets.data_ptr<int64_t>(),
        sp_base, num_chunks, chunk, hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
