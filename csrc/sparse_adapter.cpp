// SHiRA's sparse ΔW ops: the operator library `lorafusion_sparse` (schemas) and its CPU kernels.
//
// S is one job's sparse ΔW [N, K] on a fixed support, given as CSR (row-major, columns ascending within a row).
// The CUDA kernels of the same ops live in sparse_adapter_cuda.cu (TORCH_LIBRARY_IMPL only); torch's
// dispatcher picks a kernel by the tensors' device. Every op has a pure-torch fallback (the SHiRA layer's
// _SparseDelta and lorafusion/adapters/shira/switch.py), which lorafusion/ops/native.py chooses when no build exists.
//
// CPU kernels: OpenMP (torch's own runtime, at torch's thread count; dynamic schedules for the heavy loops) over
// token tiles or support entries; activations are copied into fp32 tiles whose rows are kTokens tokens of one
// feature, so each support entry costs one contiguous kTokens-wide multiply-add in SIMD registers. fp32
// accumulation; x/dy/y/dx may be fp32, bf16 or fp16, values fp32 or the activations' dtype. Never a dense [N, K].

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX__) || defined(__FMA__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

// The forward and dx: tiles of kTokens tokens, so one entry of M is one kTokens-wide fp32 FMA (four AVX2 or two
// AVX-512 registers: the index and value loads, the address and the loop are shared by that many tokens). M is
// walked in bands of kBandRows rows, whose accumulators [kBandRows, kTokens] (32 KiB) stay in L1/L2 and are
// written out a band at a time, a contiguous run per token (writing each row's kTokens sums straight into out's
// column, one cache line per token per row, took three times as long); within a band, in column blocks of
// kSlabFeatures features, so the tile rows a block reads (kSlabFeatures · kTokens fp32, 256 KiB) stay in L2.
// Narrower blocks keep the slab in L1 but leave a few entries per (row, block), and the branch mispredictions of
// those short loops cost more than the L2 reads (1-thread timings of the candidates: csrc/README.md).
constexpr int64_t kTokens = 32;
constexpr int64_t kBandRows = 256;
constexpr int64_t kSlabFeatures = 2048;
// Tokens per tile of the values' gradient: x^T and dy^T tiles of 32 tokens keep 128 KiB per 1024 features,
// so the columns one row's entries read stay in L2.
constexpr int64_t kDotTokens = 32;

void check_tokens(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [tokens, features], got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dtype);
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous 1-D int64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

// Every index in [0, bound), so a malformed support is an error instead of an out-of-bounds read.
void check_range(const at::Tensor& idx, int64_t bound, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= (p[i] >= 0) & (p[i] < bound);
  TORCH_CHECK(ok, name, " holds an index outside [0, ", bound, ")");
}

// CSR of a [rows, cols] matrix with values: sizes, dtypes, monotone row pointers and in-range columns.
void check_csr(const at::Tensor& crow, const at::Tensor& cols, const at::Tensor& values, int64_t rows,
               int64_t ncols, at::ScalarType act, const char* crow_name, const char* cols_name,
               const char* values_name) {
  check_index(crow, crow_name);
  check_index(cols, cols_name);
  TORCH_CHECK(crow.numel() == rows + 1, crow_name, " must have ", rows + 1, " entries (rows + 1), got ", crow.numel());
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == cols.numel(), values_name,
              " must be contiguous 1-D with as many entries as ", cols_name, " (", cols.numel(), "), got shape ",
              values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == act, values_name,
              " must be float32 or the activations' dtype ", act, ", got ", values.scalar_type());
  const int64_t* c = crow.data_ptr<int64_t>();
  bool ok = c[0] == 0 && c[rows] == cols.numel();
  for (int64_t r = 0; r < rows; ++r) ok &= c[r] <= c[r + 1];
  TORCH_CHECK(ok, crow_name, " must rise from 0 to nnz = ", cols.numel());
  check_range(cols, ncols, cols_name);
}



// tile[f * width + i] = src[(t0 + i) * features + f] as fp32, for i < count; the rest of the width zero.
// Features in blocks of kPackBlock, so the tile rows one block writes (kPackBlock · width floats) stay in L1 while
// every token's segment of them is read; a token at a time over all features revisited the whole tile per token.
constexpr int64_t kPackBlock = 64;
template <typename T>
void pack_tile(const T* src, int64_t features, int64_t t0, int64_t count, int64_t width, float* tile) {
  for (int64_t f0 = 0; f0 < features; f0 += kPackBlock) {
    const int64_t f1 = std::min(features, f0 + kPackBlock);
    for (int64_t i = 0; i < width; ++i) {
      float* out = tile + i;
      if (i < count) {
        const T* row = src + (t0 + i) * features;
        for (int64_t f = f0; f < f1; ++f) out[f * width] = static_cast<float>(row[f]);
      } else {
        for (int64_t f = f0; f < f1; ++f) out[f * width] = 0.0f;
      }
    }
  }
}

// This CPU's fp32 SIMD register as a value (GCC/Clang vector extension), so the loops below compile to plain
// broadcast-FMA sequences with their accumulators in registers; `omp simd` vectorised across support entries with
// gathers instead, and a vector type wider than the hardware's is spilled to the stack.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int64_t kVecs = kTokens / kLanes;  // registers per kTokens-wide row of a tile
static_assert(kTokens % kLanes == 0 && kDotTokens % kLanes == 0, "tiles hold whole SIMD registers");

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc + s · v, as one fused multiply-add wherever the CPU has one. Written out because the compiler's own
// contraction of `acc += s * v` differs between loops (one register wide it kept the multiply and the add apart),
// and then the direct and the regrouped product, which add the same terms in the same order, differed in bits.
inline Vec madd(Vec acc, float s, Vec v) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_fmadd_ps(_mm512_set1_ps(s), reinterpret_cast<__m512>(v),
                                               reinterpret_cast<__m512>(acc)));
#elif defined(__FMA__)
  static_assert(kLanes == 8, "FMA without AVX-512: 256-bit registers");
  return reinterpret_cast<Vec>(_mm256_fmadd_ps(_mm256_set1_ps(s), reinterpret_cast<__m256>(v),
                                               reinterpret_cast<__m256>(acc)));
#elif defined(__aarch64__)
  static_assert(kLanes == 4, "NEON: 128-bit registers");
  float32x4_t a, b;  // copies, not casts: how the generic and NEON vector types convert is the compiler's choice
  std::memcpy(&a, &acc, sizeof a);
  std::memcpy(&b, &v, sizeof b);
  const float32x4_t sum = vfmaq_n_f32(a, b, s);
  Vec out;
  std::memcpy(&out, &sum, sizeof out);
  return out;
#else
  return acc + s * v;  // x86 without FMA: nothing to fuse; other CPUs: the compiler decides (untested here)
#endif
}

// M [rows, features] (CSR) regrouped for the tiled product: its entries ordered by (row band, column block, row),
// each as its offset in a packed tile (column · kTokens) and its fp32 value. Key (band · blocks + g) · band_rows +
// (r − band start) holds row r's entries in column block g, at [ptr[key], ptr[key + 1]). Within a key the
// entries keep the CSR's order. Built per call (parallel over bands, O(nnz + rows · blocks)); the values change
// every step anyway.
struct BlockedCsr {
  int64_t band_rows = 0, bands = 0, blocks = 0;
  std::vector<int64_t> ptr;
  std::vector<int32_t> offset;
  std::vector<float> value;
};

BlockedCsr block_csr(const int64_t* crow, const int64_t* cols, const float* vals, int64_t rows, int64_t features,
                     int64_t band_rows) {
  BlockedCsr m;
  m.band_rows = band_rows;
  m.bands = (rows + band_rows - 1) / band_rows;
  m.blocks = (features + kSlabFeatures - 1) / kSlabFeatures;
  const int64_t keys_per_band = m.blocks * band_rows, nnz = crow[rows];
  m.ptr.resize(m.bands * keys_per_band + 1);
  m.offset.resize(nnz);
  m.value.resize(nnz);
  m.ptr.back() = nnz;
  at::parallel_for(0, m.bands, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cursor(keys_per_band);
    for (int64_t band = b0; band < b1; ++band) {
      const int64_t r0 = band * band_rows, r1 = std::min(rows, r0 + band_rows);
      std::fill(cursor.begin(), cursor.end(), 0);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = crow[r]; j < crow[r + 1]; ++j) ++cursor[cols[j] / kSlabFeatures * band_rows + (r - r0)];
      }
      int64_t at = crow[r0];  // the band's entries keep the CSR's range [crow[r0], crow[r1])
      int64_t* ptr = m.ptr.data() + band * keys_per_band;
      for (int64_t key = 0; key < keys_per_band; ++key) {
        ptr[key] = at;
        at += cursor[key];
        cursor[key] = ptr[key];
      }
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
          const int64_t to = cursor[cols[j] / kSlabFeatures * band_rows + (r - r0)]++;
          m.offset[to] = static_cast<int32_t>(cols[j] * kTokens);
          m.value[to] = vals[j];
        }
      }
    }
  });
  return m;
}

// sum[q] += Σ_j vals[j] · tile[offset_of(j) + q · kLanes ...] for j in [j0, j1), in order, one FMA per register:
// the one loop every forward/dx path adds a row's entries with, so that all of them give the same bits.
template <int64_t vecs, typename Offset>
inline void add_row_entries(Vec* sum, const float* tile, const float* vals, int64_t j0, int64_t j1, Offset offset_of) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* col = tile + offset_of(j);
    for (int64_t q = 0; q < vecs; ++q) sum[q] = madd(sum[q], vals[j], load_vec(col + q * kLanes));
  }
}

// out[t0 + i, r] = Σ_j v_j · tile[c_j, i] for the rows r of one band: the band's accumulators acc [band rows,
// kTokens] stay near while the column blocks pass; one kTokens-wide FMA per entry.
template <typename T>
void band_product(const float* tile, const BlockedCsr& m, int64_t band, int64_t rows, float* acc, T* out,
                  int64_t t0, int64_t count) {
  const int64_t r0 = band * m.band_rows, band_size = std::min(m.band_rows, rows - r0);
  std::fill(acc, acc + band_size * kTokens, 0.0f);
  const int32_t* offset = m.offset.data();
  const float* value = m.value.data();
  for (int64_t g = 0; g < m.blocks; ++g) {
    const int64_t* ptr = m.ptr.data() + (band * m.blocks + g) * m.band_rows;
    for (int64_t r = 0; r < band_size; ++r) {
      const int64_t j0 = ptr[r], j1 = ptr[r + 1];
      if (j0 == j1) continue;
      float* a = acc + r * kTokens;
      Vec sum[kVecs];
      for (int64_t q = 0; q < kVecs; ++q) sum[q] = load_vec(a + q * kLanes);
      add_row_entries<kVecs>(sum, tile, value, j0, j1, [offset](int64_t j) { return offset[j]; });
      std::memcpy(a, sum, sizeof sum);
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    T* o = out + (t0 + i) * rows + r0;
    for (int64_t r = 0; r < band_size; ++r) o[r] = static_cast<T>(acc[r * kTokens + i]);
  }
}

// out[t0 + i, r] = Σ_j v_j · tile[c_j, i] for rows r in [r0, r1), straight from the CSR, over a tile of `width`
// tokens: for segments of a few tiles, where regrouping M (block_csr) would cost more than it saves. Each sum
// adds a row's entries in CSR order from zero with add_row_entries, as band_product does.
template <typename T, int64_t width>
void csr_rows(const float* tile, const int64_t* crow, const int64_t* cols, const float* vals, int64_t r0, int64_t r1,
              T* out, int64_t rows, int64_t t0, int64_t count) {
  constexpr int64_t vecs = width / kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    Vec sum[vecs] = {};
    add_row_entries<vecs>(sum, tile, vals, crow[r], crow[r + 1], [cols](int64_t j) { return cols[j] * width; });
    float sums[width];
    std::memcpy(sums, sum, sizeof sums);
    for (int64_t i = 0; i < count; ++i) out[(t0 + i) * rows + r] = static_cast<T>(sums[i]);
  }
}

// The direct CSR product of a segment of `tokens` tokens in tiles of `width` (see csr_rows), parallel over rows.
template <typename T, int64_t width>
void direct_product(const T* src, int64_t tokens, int64_t features, const int64_t* crow, const int64_t* cols,
                    const float* vals, T* dst, int64_t rows) {
  std::vector<float> tile(features * width);
  for (int64_t t0 = 0; t0 < tokens; t0 += width) {
    const int64_t count = std::min(width, tokens - t0);
    pack_tile(src, features, t0, count, width, tile.data());
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      csr_rows<T, width>(tile.data(), crow, cols, vals, r0, r1, dst, rows, t0, count);
    });
  }
}

// Below this many token tiles the product reads M's CSR as it is (see csr_rows).
constexpr int64_t kMinBlockedTiles = 4;

// out [T, rows] = in [T, features] · Mᵀ for M [rows, features] as CSR, into a new tensor (every element written:
// no zero-fill, no read-modify-write). Parallel over token tiles when there are enough of them for every thread,
// else over M's rows within each tile (short segments, T = 1).
template <typename T>
at::Tensor csr_product(const at::Tensor& in, const at::Tensor& crow, const at::Tensor& cols, const at::Tensor& values,
                       int64_t rows) {
  const int64_t tokens = in.size(0), features = in.size(1);
  if (tokens == 0 || rows == 0 || cols.numel() == 0) return at::zeros({tokens, rows}, in.options());
  at::Tensor out = at::empty({tokens, rows}, in.options());
  const T* src = in.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const at::Tensor v_float = values.to(at::kFloat);  // the values themselves when fp32 (SHiRA's are): no copy
  const float* vals = v_float.data_ptr<float>();
  const int64_t* c = crow.data_ptr<int64_t>();
  const int64_t* k = cols.data_ptr<int64_t>();
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = (tokens + kTokens - 1) / kTokens;
  if (tokens <= kLanes) {  // a few tokens (T = 1, say): one register per entry, not kTokens / kLanes mostly idle
    direct_product<T, kLanes>(src, tokens, features, c, k, vals, dst, rows);
    return out;
  }
  if (tiles < kMinBlockedTiles) {
    direct_product<T, kTokens>(src, tokens, features, c, k, vals, dst, rows);
    return out;
  }
  const bool by_tiles = tiles >= threads;
  const int64_t band_rows =
      by_tiles ? kBandRows : std::clamp<int64_t>((rows + threads - 1) / threads, int64_t{16}, kBandRows);
  const BlockedCsr m = block_csr(c, k, vals, rows, features, band_rows);
  if (by_tiles) {
    // Tiles handed out one at a time (dynamic): a thread whose core another process shares takes fewer of them,
    // where at::parallel_for's equal halves made the other thread wait for it.
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      std::vector<float> tile(features * kTokens), acc(band_rows * kTokens);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < tiles; ++b) {
        const int64_t t0 = b * kTokens, count = std::min(kTokens, tokens - t0);
        pack_tile(src, features, t0, count, kTokens, tile.data());
        for (int64_t band = 0; band < m.bands; ++band) {
          band_product(tile.data(), m, band, rows, acc.data(), dst, t0, count);
        }
      }
    }
    return out;
  }
  std::vector<float> tile(features * kTokens);
  for (int64_t b = 0; b < tiles; ++b) {
    const int64_t t0 = b * kTokens, count = std::min(kTokens, tokens - t0);
    pack_tile(src, features, t0, count, kTokens, tile.data());
    at::parallel_for(0, m.bands, 1, [&](int64_t band0, int64_t band1) {
      std::vector<float> acc(band_rows * kTokens);
      for (int64_t band = band0; band < band1; ++band) {
        band_product(tile.data(), m, band, rows, acc.data(), dst, t0, count);
      }
    });
  }
  return out;
}

template <typename F>
void by_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), b_name, " must have ", a_name, "'s dtype ", a.scalar_type(),
              ", got ", b.scalar_type());
}

// in [T, features] · Mᵀ [T, rows] after checking the arguments under the op's own names (names[0..3]: in, crow,
// cols, values), shared by the forward (M = S) and dx (M = Sᵀ); M has crow.numel() − 1 rows.
at::Tensor checked_csr_product(const at::Tensor& in, const at::Tensor& crow, const at::Tensor& cols,
                               const at::Tensor& values, const char* const names[4]) {
  check_tokens(in, names[0]);
  check_index(crow, names[1]);
  TORCH_CHECK(crow.numel() >= 1, names[1], " is empty; it holds rows + 1 pointers, [0] for no row");
  TORCH_CHECK(in.size(1) < (int64_t{1} << 31) / kTokens, names[0], " has ", in.size(1), " features, over ",
              (int64_t{1} << 31) / kTokens, ", the most the packed tiles' int32 offsets reach");
  const int64_t rows = crow.numel() - 1;
  check_csr(crow, cols, values, rows, in.size(1), in.scalar_type(), names[1], names[2], names[3]);
  at::Tensor out;
  by_dtype(in.scalar_type(), [&](auto tag) { out = csr_product<decltype(tag)>(in, crow, cols, values, rows); });
  return out;
}

at::Tensor sparse_forward(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& cols,
                          const at::Tensor& values) {
  static const char* const names[4] = {"x", "crow", "cols", "values"};
  return checked_csr_product(x, crow, cols, values, names);
}

at::Tensor sparse_backward_input(const at::Tensor& dy, const at::Tensor& t_crow, const at::Tensor& t_cols,
                                 const at::Tensor& t_values) {
  static const char* const names[4] = {"dy", "t_crow", "t_cols", "t_values"};
  return checked_csr_product(dy, t_crow, t_cols, t_values, names);
}

// The lane-wise products of one kDotTokens-long dot product, a · e: its sum is the sum of the lanes.
inline Vec dot_lanes(const float* a, const float* e) {
  Vec prod = load_vec(a) * load_vec(e);
  for (int64_t q = kLanes; q < kDotTokens; q += kLanes) prod += load_vec(a + q) * load_vec(e + q);
  return prod;
}

inline float lane_sum(Vec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  float sum = 0.0f;
  for (int64_t q = 0; q < kLanes; ++q) sum += lanes[q];
  return sum;
}

// out[u] += lane_sum(v[u]) for kSumBatch vectors at once: with AVX, three rounds of pairwise horizontal adds
// and one cross-half add (7 shuffling adds for 8 sums, where one sum at a time took ~10 instructions each,
// the values' gradient's largest cost after the loads).
constexpr int64_t kSumBatch = 8;
inline void add_lane_sums(const Vec* v, float* out) {
#if defined(__AVX__)
  __m256 h[kSumBatch];
  for (int64_t u = 0; u < kSumBatch; ++u) {
#if defined(__AVX512F__)
    const __m512 w = reinterpret_cast<const __m512&>(v[u]);
    h[u] = _mm256_add_ps(_mm512_castps512_ps256(w), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
#else
    h[u] = reinterpret_cast<const __m256&>(v[u]);
#endif
  }
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), sums));
#else
  for (int64_t u = 0; u < kSumBatch; ++u) out[u] += lane_sum(v[u]);
#endif
}

// dv_k = Σ_t dy[t, rows_k] · x[t, cols_k]: both transposed tile by tile into [features, kDotTokens] fp32, then
// one contiguous kDotTokens-long dot product per entry. The entries are cut into chunks (parallel, dynamically
// scheduled, two per thread; each thread writes only its own dv), and a chunk's entries are grouped by column
// block of kColBlock features (stable, so rows stay in order within a group): within one (chunk, tile, block)
// pass the x columns read lie in kColBlock · kDotTokens floats (16 KiB), which stay in L1, where the support's
// order scattered them over the whole [K, kDotTokens] tile (L2) and the loads from there bounded the op. Every
// chunk reads every tile once, so chunks are as large as the threads allow (within [kMinDotChunk, kMaxDotChunk]).
constexpr int64_t kMinDotChunk = 16384;
constexpr int64_t kMaxDotChunk = 131072;
constexpr int64_t kColBlock = 128;
template <typename T>
void sampled_dot(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                 float* dv) {
  const int64_t tokens = x.size(0), in_f = x.size(1), out_f = dy.size(1), nnz = rows.numel();
  const int64_t tiles = (tokens + kDotTokens - 1) / kDotTokens;
  // The calling thread's packing buffers, kept between calls: freshly allocated, their tens of MB were page-faulted
  // in on every call (glibc maps blocks that large afresh), which cost as much as packing them.
  thread_local std::vector<float> x_buffer, dy_buffer;
  x_buffer.resize(std::max<size_t>(x_buffer.size(), tiles * in_f * kDotTokens));
  dy_buffer.resize(std::max<size_t>(dy_buffer.size(), tiles * out_f * kDotTokens));
  float* const xt = x_buffer.data();
  float* const dyt = dy_buffer.data();
  at::parallel_for(0, tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * kDotTokens, count = std::min(kDotTokens, tokens - t0);
      pack_tile(x.data_ptr<T>(), in_f, t0, count, kDotTokens, xt + b * in_f * kDotTokens);
      pack_tile(dy.data_ptr<T>(), out_f, t0, count, kDotTokens, dyt + b * out_f * kDotTokens);
    }
  });
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  const int64_t blocks = (in_f + kColBlock - 1) / kColBlock;
  const int64_t per_thread = (nnz + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t chunk_size = std::clamp(per_thread, kMinDotChunk, kMaxDotChunk);
  const int64_t chunks = (nnz + chunk_size - 1) / chunk_size;
#pragma omp parallel num_threads(static_cast<int>(at::get_num_threads()))
  {
    // one chunk's entries grouped by column block: their tile offsets and their place in dv, and the groups' starts;
    // row_at, col_at and sums run kSumBatch past the chunk, so its last batch is whole (see below)
    std::vector<int64_t> row_at(chunk_size + kSumBatch), col_at(chunk_size + kSumBatch), entry(chunk_size),
        start(blocks + 1);
    std::vector<float> sums(chunk_size + kSumBatch);
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t k0 = chunk * chunk_size, size = std::min(nnz, k0 + chunk_size) - k0;
      std::fill(start.begin(), start.end(), 0);
      for (int64_t k = k0; k < k0 + size; ++k) ++start[c[k] / kColBlock + 1];
      for (int64_t g = 0; g < blocks; ++g) start[g + 1] += start[g];
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t k = k0; k < k0 + size; ++k) {
        const int64_t at = fill[c[k] / kColBlock]++;
        row_at[at] = r[k] * kDotTokens;
        col_at[at] = c[k] * kDotTokens;
        entry[at] = k;
      }
      std::fill(row_at.begin() + size, row_at.begin() + size + kSumBatch, 0);
      std::fill(col_at.begin() + size, col_at.begin() + size + kSumBatch, 0);
      std::fill(sums.begin(), sums.begin() + size + kSumBatch, 0.0f);
      for (int64_t b = 0; b < tiles; ++b) {
        const float* xb = xt + b * in_f * kDotTokens;
        const float* db = dyt + b * out_f * kDotTokens;
        // Whole batches only, the last one padded with dot products of offset 0 into scratch sums: an entry's sum
        // is then the same whichever place it has in its chunk, so dv's bits do not depend on the thread count
        // (which sets the chunks); one sum at a time rounds differently from a batch's.
        for (int64_t i = 0; i < size; i += kSumBatch) {
          Vec prod[kSumBatch];
          for (int64_t u = 0; u < kSumBatch; ++u) prod[u] = dot_lanes(db + row_at[i + u], xb + col_at[i + u]);
          add_lane_sums(prod, &sums[i]);
        }
      }
      for (int64_t i = 0; i < size; ++i) dv[entry[i]] = sums[i];
    }
  }
}

at::Tensor sparse_backward_values(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows,
                                  const at::Tensor& cols) {
  check_tokens(dy, "dy");
  check_tokens(x, "x");
  check_same(x, dy, "x", "dy");
  TORCH_CHECK(dy.size(0) == x.size(0), "dy must have x's ", x.size(0), " tokens, got ", dy.size(0));
  check_index(rows, "rows");
  check_index(cols, "cols");
  TORCH_CHECK(rows.numel() == cols.numel(), "rows and cols must have the same length, got ", rows.numel(), " and ",
              cols.numel());
  check_range(rows, dy.size(1), "rows");
  check_range(cols, x.size(1), "cols");
  at::Tensor dv = at::empty({rows.numel()}, x.options().dtype(at::kFloat));
  float* out = dv.data_ptr<float>();
  std::fill(out, out + dv.numel(), 0.0f);
  if (x.size(0) > 0 && rows.numel() > 0) {
    by_dtype(x.scalar_type(), [&](auto tag) { sampled_dot<decltype(tag)>(dy, x, rows, cols, out); });
  }
  return dv;
}

void check_switch(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& other, const char* other_name) {
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  check_index(index, "index");
  TORCH_CHECK(other.dim() == 1 && other.is_contiguous() && other.numel() == index.numel(), other_name,
              " must be contiguous 1-D with as many entries as index (", index.numel(), "), got shape ", other.sizes());
  check_range(index, weight.numel(), "index");
}

// Each thread owns one contiguous range of the weight and walks the whole index list in order, so duplicated
// indices (several jobs' supports) add up in list order without a race, whatever the thread count.
template <typename W, typename V>
void add_at(W* w, int64_t numel, const int64_t* index, const V* values, int64_t m) {
  at::parallel_for(0, numel, 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < m; ++k) {
      const int64_t i = index[k];
      if (i >= lo && i < hi) w[i] = static_cast<W>(static_cast<float>(w[i]) + static_cast<float>(values[k]));
    }
  });
}

void sparse_switch(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& values,
                   const at::Tensor& saved) {
  check_switch(weight, index, values, "values");
  check_switch(weight, index, saved, "saved");
  check_same(weight, saved, "weight", "saved");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == weight.scalar_type(),
              "values must be float32 or weight's dtype ", weight.scalar_type(), ", got ", values.scalar_type());
  const int64_t m = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  by_dtype(weight.scalar_type(), [&](auto tag) {
    using W = decltype(tag);
    W* w = weight.data_ptr<W>();
    W* s = saved.data_ptr<W>();
    at::parallel_for(0, m, 1 << 14, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) s[k] = w[idx[k]];
    });
    if (values.scalar_type() == at::kFloat) {
      add_at(w, weight.numel(), idx, values.data_ptr<float>(), m);
    } else {
      add_at(w, weight.numel(), idx, values.data_ptr<W>(), m);
    }
  });
}

void sparse_restore(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& saved) {
  check_switch(weight, index, saved, "saved");
  check_same(weight, saved, "weight", "saved");
  const int64_t m = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  // A duplicated index has the same saved bits at each of its places, so the writes agree and order is moot.
  by_dtype(weight.scalar_type(), [&](auto tag) {
    using W = decltype(tag);
    W* w = weight.data_ptr<W>();
    const W* s = saved.data_ptr<W>();
    at::parallel_for(0, m, 1 << 14, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) std::memcpy(&w[idx[k]], &s[k], sizeof(W));
    });
  });
}

}  // namespace

TORCH_LIBRARY(lorafusion_sparse, m) {
  m.def("sparse_forward(Tensor x, Tensor crow, Tensor cols, Tensor values) -> Tensor");
  m.def("sparse_backward_input(Tensor dy, Tensor t_crow, Tensor t_cols, Tensor t_values) -> Tensor");
  m.def("sparse_backward_values(Tensor dy, Tensor x, Tensor rows, Tensor cols) -> Tensor");
  m.def("sparse_switch(Tensor(a!) weight, Tensor index, Tensor values, Tensor(b!) saved) -> ()");
  m.def("sparse_restore(Tensor(a!) weight, Tensor index, Tensor saved) -> ()");
}

TORCH_LIBRARY_IMPL(lorafusion_sparse, CPU, m) {
  m.impl("sparse_forward", &sparse_forward);
  m.impl("sparse_backward_input", &sparse_backward_input);
  m.impl("sparse_backward_values", &sparse_backward_values);
  m.impl("sparse_switch", &sparse_switch);
  m.impl("sparse_restore", &sparse_restore);
}
