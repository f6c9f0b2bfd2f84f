// CUDA kernels of the lorafusion_sparse ops (SHiRA's sparse ΔW S [N, K] on a fixed support): the forward
// y = x Sᵀ, the input gradient dx = dy S, the values' gradient sampled at the support, and the in-place
// switch / restore of many jobs' deltas in a base weight. The schemas live in sparse_adapter.cpp
// (TORCH_LIBRARY); this file only registers the CUDA implementations. Why each kernel is laid out the way it
// is: csrc/README.md, "The CUDA kernels".

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

// Torch's operator headers are host-only and nearly all of this file's compile time (they are parsed once per
// pass, and nvcc runs a device pass per architecture): the device passes (__CUDA_ARCH__ defined) skip them and
// the host code below, and compile the kernels the host launches from the explicit instantiations instead.
#if !defined(__CUDA_ARCH__)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#endif

// A named namespace, not an anonymous one: the kernels keep external linkage, so every device pass emits each
// of them under the same symbol the host pass registers.
namespace lorafusion_sparse_cuda {

constexpr int kThreads = 256;  // 8 warps: enough rows (forward) or entries (values' gradient) in flight per block
constexpr int kWarps = kThreads / 32;
constexpr int kEntriesPerThread = 8;  // support entries one thread owns in the values' gradient
constexpr int64_t kEntriesPerBlock = int64_t{kThreads} * kEntriesPerThread;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(c10::Half v) { return static_cast<float>(v); }

// One template argument per element type of the tile's rows, so that the staged copy keeps the activations'
// bytes (half the shared memory of fp32 for bf16/fp16).
template <typename scalar_t>
__device__ void stage_rows(scalar_t* tile, int64_t tile_stride, const scalar_t* __restrict__ src, int64_t ld_src,
                           int rows, int64_t width) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      tile[r * tile_stride + c] = src[r * ld_src + c];
    }
  }
}

// out [T, R] = in [T, C] · Mᵀ for M [R, C] given as CSR (crow [R + 1], cols [nnz], values [nnz]); both the
// forward (M = S) and the input gradient (M = Sᵀ) are this product.
// Block: a tile of `tile_tokens` tokens × a range of rows of M. The tile's rows of `in` are copied once,
// coalesced, into shared memory (when they fit), because M's columns gather scattered elements of each row of
// `in`: served from shared memory those gathers cost no global transactions. Warp: one row r of M at a time;
// lane = (token tt, group lane g): the `group` lanes of a token split the row's entries, then a shuffle
// reduction sums them, so the row's cols/values are read coalesced and shared by the tile's tokens.
// Every out[t, r] has exactly one writer in the grid (tiles and row ranges are disjoint, and a row without entries
// writes its zero): no atomics, and out needs no zero-fill.
template <typename scalar_t, typename value_t>
__global__ void __launch_bounds__(kThreads) csr_rows_kernel(
    const scalar_t* __restrict__ in, int64_t ld_in, const int64_t* __restrict__ crow,
    const int64_t* __restrict__ cols, const value_t* __restrict__ values, scalar_t* __restrict__ out,
    int64_t ld_out, int64_t tokens, int64_t rows, int64_t width, int64_t rows_per_block, int tile_tokens,
    int64_t tile_stride, bool staged) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tile_tokens;
  const int ntok = static_cast<int>(std::min<int64_t>(tile_tokens, tokens - t0));
  const scalar_t* src = in + t0 * ld_in;
  int64_t ld_src = ld_in;
  if (staged) {
    scalar_t* tile = reinterpret_cast<scalar_t*>(shared_bytes);
    stage_rows(tile, tile_stride, src, ld_in, ntok, width);
    __syncthreads();
    src = tile;
    ld_src = tile_stride;
  }
  const int lane = threadIdx.x % 32;
  const int group = 32 / tile_tokens;  // tile_tokens is 1, 2, 4 or 8
  const int tt = lane / group;
  const int g = lane % group;
  const int64_t r_end = std::min(rows, (static_cast<int64_t>(blockIdx.y) + 1) * rows_per_block);
  // r depends on the warp alone, so every lane of a warp reaches the shuffles below together.
  for (int64_t r = blockIdx.y * rows_per_block + threadIdx.x / 32; r < r_end; r += kWarps) {
    float acc = 0.0f;
    if (tt < ntok) {
      const scalar_t* row = src + tt * ld_src;
      const int64_t j_end = crow[r + 1];
      for (int64_t j = crow[r] + g; j < j_end; j += group) {
        const int64_t c = cols[j];
        CUDA_KERNEL_ASSERT(c >= 0 && c < width);
        acc += to_float(values[j]) * to_float(row[c]);
      }
    }
    for (int offset = group / 2; offset > 0; offset /= 2) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (g == 0 && tt < ntok) {
      out[(t0 + tt) * ld_out + r] = static_cast<scalar_t>(acc);
    }
  }
}

// dv_k = Σ_t dy[t, rows_k] · x[t, cols_k] over one slice of the tokens, into partial [slices, nnz].
// Block: kEntriesPerBlock consecutive entries × one token slice; a thread owns kEntriesPerThread entries
// (adjacent threads, adjacent entries: coalesced index reads and writes) with fp32 accumulators in registers.
// The x rows of each token tile are staged in shared memory (cols_k gathers them anywhere in the row); dy is
// read directly: in the support's row-major order a warp's entries share one or two rows, i.e. one address.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sampled_values_kernel(
    const scalar_t* __restrict__ dy, int64_t ld_dy, const scalar_t* __restrict__ x, int64_t ld_x,
    const int64_t* __restrict__ rows, const int64_t* __restrict__ cols, float* __restrict__ partial, int64_t nnz,
    int64_t tokens, int64_t out_features, int64_t in_features, int64_t tokens_per_slice, int tile_tokens,
    int64_t tile_stride, bool staged) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(shared_bytes);
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kEntriesPerBlock + threadIdx.x;
  int row[kEntriesPerThread];
  int col[kEntriesPerThread];
  float acc[kEntriesPerThread];
  int owned = 0;  // entries e0, e0 + kThreads, ... below nnz
#pragma unroll
  for (int i = 0; i < kEntriesPerThread; ++i) {
    const int64_t e = e0 + int64_t{i} * kThreads;
    row[i] = 0;
    col[i] = 0;
    acc[i] = 0.0f;
    if (e < nnz) {
      CUDA_KERNEL_ASSERT(rows[e] >= 0 && rows[e] < out_features && cols[e] >= 0 && cols[e] < in_features);
      row[i] = static_cast<int>(rows[e]);
      col[i] = static_cast<int>(cols[e]);
      owned = i + 1;
    }
  }
  const int64_t slice_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_slice;
  const int64_t slice_end = std::min(tokens, slice_begin + tokens_per_slice);
  for (int64_t t0 = slice_begin; t0 < slice_end; t0 += tile_tokens) {
    const int ntok = static_cast<int>(std::min<int64_t>(tile_tokens, slice_end - t0));
    const scalar_t* xs = x + t0 * ld_x;
    int64_t ld_xs = ld_x;
    if (staged) {
      __syncthreads();  // the previous tile is no longer read
      stage_rows(tile, tile_stride, xs, ld_x, ntok, in_features);
      __syncthreads();
      xs = tile;
      ld_xs = tile_stride;
    }
    for (int tt = 0; tt < ntok; ++tt) {
      const scalar_t* dy_row = dy + (t0 + tt) * ld_dy;
      const scalar_t* x_row = xs + tt * ld_xs;
#pragma unroll
      for (int i = 0; i < kEntriesPerThread; ++i) {
        if (i < owned) {
          acc[i] += to_float(dy_row[row[i]]) * to_float(x_row[col[i]]);
        }
      }
    }
  }
  float* out = partial + static_cast<int64_t>(blockIdx.y) * nnz;
#pragma unroll
  for (int i = 0; i < kEntriesPerThread; ++i) {
    if (i < owned) {
      out[e0 + int64_t{i} * kThreads] = acc[i];
    }
  }
}

// dv [nnz] = Σ_s partial [s, nnz], slices in order: the same bits on every run.
__global__ void sum_slices_kernel(const float* __restrict__ partial, float* __restrict__ dv, int64_t nnz,
                                  int64_t slices) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= nnz) {
    return;
  }
  float sum = partial[e];
  for (int64_t s = 1; s < slices; ++s) {
    sum += partial[s * nnz + e];
  }
  dv[e] = sum;
}

// saved[i] = weight[index[i]] as raw bits (bits_t: an unsigned integer of the element's size).
template <typename bits_t>
__global__ void gather_bits_kernel(const bits_t* __restrict__ weight, const int64_t* __restrict__ index,
                                   bits_t* __restrict__ saved, int64_t count, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    const int64_t p = index[i];
    CUDA_KERNEL_ASSERT(p >= 0 && p < numel);
    saved[i] = weight[p];
  }
}

// weight[index[i]] = saved[i] as raw bits. Duplicated positions all hold the same saved bits (every one was
// read before any add), so their concurrent writes store the same value.
template <typename bits_t>
__global__ void scatter_bits_kernel(bits_t* __restrict__ weight, const int64_t* __restrict__ index,
                                    const bits_t* __restrict__ saved, int64_t count, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) {
    const int64_t p = index[i];
    CUDA_KERNEL_ASSERT(p >= 0 && p < numel);
    weight[p] = saved[i];
  }
}

// weight[p] takes the values at p one after another in the order they were given, each addition in fp32 rounded
// once to the weight's dtype: the CPU kernel's and the torch fallback's result, bit for bit.
// `sorted` is index stably sorted, `order` its permutation: the entries of one position form a segment, and
// only its first thread writes, once: no two threads touch one element, and no bf16/fp16 atomics are needed.
template <typename scalar_t, typename value_t>
__global__ void add_segments_kernel(scalar_t* __restrict__ weight, const int64_t* __restrict__ sorted,
                                    const int64_t* __restrict__ order, const value_t* __restrict__ values,
                                    int64_t count, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count || (i > 0 && sorted[i] == sorted[i - 1])) {
    return;
  }
  const int64_t p = sorted[i];
  CUDA_KERNEL_ASSERT(p >= 0 && p < numel);
  scalar_t w = weight[p];
  for (int64_t j = i; j < count && sorted[j] == p; ++j) {  // the stable sort kept the segment in list order
    w = static_cast<scalar_t>(to_float(w) + to_float(values[order[j]]));
  }
  weight[p] = w;
}

// Every kernel the host code launches: the activations' dtype × the values' (fp32 or the same), the bits of a
// 4- or 2-byte weight element. A launch of a combination missing here would find no device code.
#define LORAFUSION_CSR_ROWS(S, V)                                                                                \
  template __global__ void csr_rows_kernel<S, V>(const S*, int64_t, const int64_t*, const int64_t*, const V*, S*, \
                                                 int64_t, int64_t, int64_t, int64_t, int64_t, int, int64_t, bool);
#define LORAFUSION_ADD_SEGMENTS(S, V) \
  template __global__ void add_segments_kernel<S, V>(S*, const int64_t*, const int64_t*, const V*, int64_t, int64_t);
#define LORAFUSION_WITH_VALUES(M) \
  M(float, float) M(c10::BFloat16, float) M(c10::BFloat16, c10::BFloat16) M(c10::Half, float) M(c10::Half, c10::Half)
LORAFUSION_WITH_VALUES(LORAFUSION_CSR_ROWS)
LORAFUSION_WITH_VALUES(LORAFUSION_ADD_SEGMENTS)
#define LORAFUSION_SAMPLED_VALUES(S)                                                                              \
  template __global__ void sampled_values_kernel<S>(const S*, int64_t, const S*, int64_t, const int64_t*,        \
                                                    const int64_t*, float*, int64_t, int64_t, int64_t, int64_t, \
                                                    int64_t, int, int64_t, bool);
LORAFUSION_SAMPLED_VALUES(float)
LORAFUSION_SAMPLED_VALUES(c10::BFloat16)
LORAFUSION_SAMPLED_VALUES(c10::Half)
#define LORAFUSION_BITS(B)                                                                                            \
  template __global__ void gather_bits_kernel<B>(const B*, const int64_t*, B*, int64_t, int64_t);                     \
  template __global__ void scatter_bits_kernel<B>(B*, const int64_t*, const B*, int64_t, int64_t);
LORAFUSION_BITS(uint32_t)
LORAFUSION_BITS(uint16_t)

}  // namespace lorafusion_sparse_cuda

#if !defined(__CUDA_ARCH__)

// ---------------------------------------------------------------------------------------------------- host

namespace lorafusion_sparse_cuda {

constexpr int kMaxTileTokens = 8;  // tokens of one staged tile in the forward: 4 lanes per token at most
// Shared memory per block for a staged token tile: two such blocks fit an A100's SM (164 KB) and an H100's
// (228 KB), so one block's staging overlaps another's gathers.
constexpr int64_t kTileBudgetBytes = 80 * 1024;
constexpr int64_t kMinRowsPerBlock = 256;  // rows of S per forward block, so that staging a tile is amortised
constexpr int64_t kMaxTokenSlices = 64;    // partial sums of the values' gradient, reduced in a fixed order

// Calls f with a value of the C++ type of `dtype` (fp32, bf16 or fp16), or fails naming the argument.
template <typename F>
void dispatch_float_type(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default:
      TORCH_CHECK(false, name, " has dtype ", dtype, "; the CUDA kernels take float32, bfloat16 or float16");
  }
}

// Calls f with (activation value, values' value): the values are fp32 or the activations' own dtype.
template <typename F>
void dispatch_with_values(at::ScalarType dtype, at::ScalarType values_dtype, const char* name,
                          const char* values_name, F&& f) {
  dispatch_float_type(dtype, name, [&](auto scalar) {
    using scalar_t = decltype(scalar);
    if (values_dtype == at::kFloat) {
      f(scalar, float{});
    } else {
      TORCH_CHECK(values_dtype == dtype, values_name, " has dtype ", values_dtype, "; it must be float32 or ",
                  name, "'s dtype ", dtype);
      f(scalar, scalar_t{});
    }
  });
}

void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move both to the same CUDA device");
}

void check_index(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous 1-D int64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, " has ", t.numel(), " elements; expected ", numel);
}

// A [rows, width] matrix whose rows are contiguous (any row stride, e.g. a slice of a wider tensor).
void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t width) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(rows < 0 || t.size(0) == rows, name, " has ", t.size(0), " rows; expected ", rows);
  TORCH_CHECK(width < 0 || t.size(1) == width, name, " has ", t.size(1), " columns; expected ", width);
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have contiguous rows (stride(1) == 1), got strides ",
              t.strides(), "; pass .contiguous()");
  TORCH_CHECK(t.size(1) < std::numeric_limits<int>::max(), name, " has ", t.size(1), " columns, over int32's range");
}

// An attribute of the current device (the caller's CUDAGuard made it the tensors' device).
int64_t device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

// How many tokens of a row width `width` one block stages, and at what row stride (in elements). The stride
// is an odd number of 4-byte words, so that the tile's rows start in different shared-memory banks and the
// tokens' gathers at one column do not conflict. bytes == 0: a single row does not fit, gather from global.
struct TokenTile {
  int tokens;
  int64_t stride;
  int64_t bytes;
};

TokenTile plan_token_tile(int64_t width, int64_t element_size, int64_t max_tokens, bool power_of_two) {
  const int64_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int64_t budget = std::min(kTileBudgetBytes, optin);
  int64_t words = (width * element_size + 3) / 4;
  words += (words % 2 == 0);
  const int64_t row_bytes = words * 4;
  int64_t tokens = std::max<int64_t>(1, std::min(max_tokens, budget / row_bytes));
  if (power_of_two) {
    while (tokens & (tokens - 1)) {
      tokens &= tokens - 1;  // down to the highest power of two
    }
  }
  if (tokens * row_bytes > budget) {
    return {static_cast<int>(max_tokens), 0, 0};
  }
  return {static_cast<int>(tokens), row_bytes / element_size, tokens * row_bytes};
}

template <typename Kernel>
void allow_shared_bytes(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {  // above the default limit a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// in [T, C] · Mᵀ [T, R] with M CSR [R, C], into a new tensor; the names are the op's arguments, for the error
// messages.
at::Tensor csr_rows_product(const at::Tensor& in, const at::Tensor& crow, const at::Tensor& cols,
                            const at::Tensor& values, const char* const names[4]) {
  TORCH_CHECK(in.is_cuda(), names[0], " must be a CUDA tensor, got one on ", in.device());
  check_on_device(crow, names[1], in, names[0]);
  check_on_device(cols, names[2], in, names[0]);
  check_on_device(values, names[3], in, names[0]);
  check_matrix(in, names[0], -1, -1);
  const int64_t tokens = in.size(0), width = in.size(1);
  check_index(crow, names[1], -1);
  TORCH_CHECK(crow.numel() >= 1, names[1], " is empty; it holds rows + 1 pointers, [0] for no row");
  const int64_t rows = crow.numel() - 1;
  check_index(cols, names[2], -1);
  TORCH_CHECK(values.dim() == 1 && values.numel() == cols.numel() && values.is_contiguous(), names[3],
              " must be contiguous 1-D with as many entries as ", names[2], " (", cols.numel(), "), got shape ",
              values.sizes());
  const c10::cuda::CUDAGuard guard(in.device());
  if (tokens == 0 || rows == 0 || cols.numel() == 0) {
    return at::zeros({tokens, rows}, in.options());
  }
  at::Tensor out = at::empty({tokens, rows}, in.options());
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  dispatch_with_values(in.scalar_type(), values.scalar_type(), names[0], names[3], [&](auto scalar, auto value) {
    using scalar_t = decltype(scalar);
    using value_t = decltype(value);
    const TokenTile tile = plan_token_tile(width, sizeof(scalar_t), kMaxTileTokens, /*power_of_two=*/true);
    const int64_t token_tiles = ceil_div(tokens, tile.tokens);
    // Enough blocks to fill the GPU ~4 times over, each with at least kMinRowsPerBlock rows.
    const int64_t row_blocks = std::clamp<int64_t>(ceil_div(4 * sms, token_tiles), 1,
                                                   std::min<int64_t>(ceil_div(rows, kMinRowsPerBlock), 65535));
    const int64_t rows_per_block = ceil_div(rows, row_blocks);
    const auto kernel = csr_rows_kernel<scalar_t, value_t>;
    allow_shared_bytes(kernel, tile.bytes);
    const dim3 grid(static_cast<unsigned>(token_tiles), static_cast<unsigned>(ceil_div(rows, rows_per_block)));
    kernel<<<grid, kThreads, tile.bytes, c10::cuda::getCurrentCUDAStream()>>>(
        in.const_data_ptr<scalar_t>(), in.stride(0), crow.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
        values.const_data_ptr<value_t>(), out.mutable_data_ptr<scalar_t>(), out.stride(0), tokens, rows, width,
        rows_per_block, tile.tokens, tile.stride, tile.bytes > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sparse_forward(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& cols,
                          const at::Tensor& values) {
  static const char* const names[4] = {"x", "crow", "cols", "values"};
  return csr_rows_product(x, crow, cols, values, names);
}

at::Tensor sparse_backward_input(const at::Tensor& dy, const at::Tensor& t_crow, const at::Tensor& t_cols,
                                 const at::Tensor& t_values) {
  static const char* const names[4] = {"dy", "t_crow", "t_cols", "t_values"};
  return csr_rows_product(dy, t_crow, t_cols, t_values, names);
}

at::Tensor sparse_backward_values(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows,
                                  const at::Tensor& cols) {
  TORCH_CHECK(dy.is_cuda(), "dy must be a CUDA tensor, got one on ", dy.device());
  check_on_device(x, "x", dy, "dy");
  check_on_device(rows, "rows", dy, "dy");
  check_on_device(cols, "cols", dy, "dy");
  check_matrix(dy, "dy", -1, -1);
  check_matrix(x, "x", dy.size(0), -1);
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "x has dtype ", x.scalar_type(), " but dy has ", dy.scalar_type(),
              "; they must match");
  check_index(rows, "rows", -1);
  check_index(cols, "cols", rows.numel());
  const int64_t nnz = rows.numel(), tokens = dy.size(0);
  const c10::cuda::CUDAGuard guard(dy.device());
  if (tokens == 0 || nnz == 0) {
    return at::zeros({nnz}, dy.options().dtype(at::kFloat));
  }
  at::Tensor dv = at::empty({nnz}, dy.options().dtype(at::kFloat));
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  dispatch_float_type(dy.scalar_type(), "dy", [&](auto scalar) {
    using scalar_t = decltype(scalar);
    const TokenTile tile = plan_token_tile(x.size(1), sizeof(scalar_t), 32, /*power_of_two=*/false);
    const int64_t entry_blocks = ceil_div(nnz, kEntriesPerBlock);
    // Slices of the tokens until the GPU is filled twice over; each slice holds whole tiles.
    const int64_t slices_wanted = std::clamp<int64_t>(ceil_div(2 * sms, entry_blocks), 1,
                                                      std::min(kMaxTokenSlices, ceil_div(tokens, tile.tokens)));
    const int64_t tokens_per_slice = ceil_div(ceil_div(tokens, slices_wanted), tile.tokens) * tile.tokens;
    const int64_t slices = ceil_div(tokens, tokens_per_slice);
    at::Tensor partial = slices == 1 ? dv : at::empty({slices, nnz}, dv.options());  // [slices, nnz]
    const auto kernel = sampled_values_kernel<scalar_t>;
    allow_shared_bytes(kernel, tile.bytes);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    kernel<<<dim3(static_cast<unsigned>(entry_blocks), static_cast<unsigned>(slices)), kThreads, tile.bytes,
             stream>>>(dy.const_data_ptr<scalar_t>(), dy.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
                       rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
                       partial.mutable_data_ptr<float>(), nnz, tokens, dy.size(1), x.size(1), tokens_per_slice,
                       tile.tokens, tile.stride, tile.bytes > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (slices > 1) {
      sum_slices_kernel<<<static_cast<unsigned>(ceil_div(nnz, kThreads)), kThreads, 0, stream>>>(
          partial.const_data_ptr<float>(), dv.mutable_data_ptr<float>(), nnz, slices);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return dv;
}

void check_switch_weight(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& saved) {
  TORCH_CHECK(weight.is_cuda(), "weight must be a CUDA tensor, got one on ", weight.device());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous (its flat index is row·K + col), got strides ",
              weight.strides());
  check_on_device(index, "index", weight, "weight");
  check_on_device(saved, "saved", weight, "weight");
  check_index(index, "index", -1);
  TORCH_CHECK(saved.dim() == 1 && saved.numel() == index.numel() && saved.is_contiguous(), "saved must be contiguous "
              "1-D with as many entries as index (", index.numel(), "), got shape ", saved.sizes());
  TORCH_CHECK(saved.scalar_type() == weight.scalar_type(), "saved has dtype ", saved.scalar_type(), " but weight has ",
              weight.scalar_type(), "; they must match (saved holds weight's exact bits)");
  dispatch_float_type(weight.scalar_type(), "weight", [](auto) {});  // fails on another dtype before any launch
}

// Calls f with an unsigned integer of weight's element size, to move elements as raw bits.
template <typename F>
void dispatch_bits(const at::Tensor& weight, F&& f) {
  dispatch_float_type(weight.scalar_type(), "weight", [&](auto scalar) {
    if constexpr (sizeof(scalar) == 4) {
      f(uint32_t{});
    } else {
      f(uint16_t{});
    }
  });
}

void sparse_switch(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& values,
                   const at::Tensor& saved) {
  check_switch_weight(weight, index, saved);
  check_on_device(values, "values", weight, "weight");
  TORCH_CHECK(values.dim() == 1 && values.numel() == index.numel() && values.is_contiguous(), "values must be "
              "contiguous 1-D with as many entries as index (", index.numel(), "), got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == weight.scalar_type(), "values has dtype ",
              values.scalar_type(), "; it must be float32 or weight's dtype ", weight.scalar_type());
  const int64_t count = index.numel(), numel = weight.numel();
  if (count == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(ceil_div(count, kThreads));
  // Every original value is saved before the first add (same stream, earlier launch), duplicates included.
  dispatch_bits(weight, [&](auto bits) {
    using bits_t = decltype(bits);
    gather_bits_kernel<bits_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const bits_t*>(weight.const_data_ptr()), index.const_data_ptr<int64_t>(),
        static_cast<bits_t*>(saved.mutable_data_ptr()), count, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto sorted_and_order = index.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted = std::get<0>(sorted_and_order);  // [count], ascending, ties in the given order
  const at::Tensor& order = std::get<1>(sorted_and_order);   // [count], sorted[i] == index[order[i]]
  dispatch_with_values(weight.scalar_type(), values.scalar_type(), "weight", "values", [&](auto scalar, auto value) {
    using scalar_t = decltype(scalar);
    using value_t = decltype(value);
    add_segments_kernel<scalar_t, value_t><<<blocks, kThreads, 0, stream>>>(
        weight.mutable_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        values.const_data_ptr<value_t>(), count, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sparse_restore(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& saved) {
  check_switch_weight(weight, index, saved);
  const int64_t count = index.numel();
  if (count == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  dispatch_bits(weight, [&](auto bits) {
    using bits_t = decltype(bits);
    scatter_bits_kernel<bits_t><<<static_cast<unsigned>(ceil_div(count, kThreads)), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<bits_t*>(weight.mutable_data_ptr()), index.const_data_ptr<int64_t>(),
        static_cast<const bits_t*>(saved.const_data_ptr()), count, weight.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lorafusion_sparse_cuda

TORCH_LIBRARY_IMPL(lorafusion_sparse, CUDA, m) {
  m.impl("sparse_forward", &lorafusion_sparse_cuda::sparse_forward);
  m.impl("sparse_backward_input", &lorafusion_sparse_cuda::sparse_backward_input);
  m.impl("sparse_backward_values", &lorafusion_sparse_cuda::sparse_backward_values);
  m.impl("sparse_switch", &lorafusion_sparse_cuda::sparse_switch);
  m.impl("sparse_restore", &lorafusion_sparse_cuda::sparse_restore);
}

#endif  // !defined(__CUDA_ARCH__)
