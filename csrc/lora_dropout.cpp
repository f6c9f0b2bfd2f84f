// LoRA dropout's counter-based masks applied where they are drawn: the operator library `lorafusion_dropout` and its
// CPU kernels. The masks are lorafusion/adapters/dropout.py's `dropped_entries`, bit for bit: entry (row, column) of
// site s drops when the 16-bit uniform
//     u = bits [32 + 16 (column % 2), 48 + 16 (column % 2)) of ((row key ^ site key ^ column key[column / 2]) · C1)
// read as a signed int16, is below INT16_MIN + threshold. The torch path draws that mask in five passes over a
// [rows, columns / 2] int64 tensor and applies it in two more (forward: where; backward: masked_fill, add); here
// each element is drawn and applied in the one pass that reads it, and no mask is kept between forward and
// backward (the backward draws it again).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr uint64_t kC1 = 0xFF51AFD7ED558CCDull;  // murmur3's first finaliser constant, as dropout.py's _C1
constexpr int64_t kRowsPerTask = 16;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D [rows, columns] tensor, got shape ",
              t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
  auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, " must be float32 or bfloat16, got ", dtype);
}

void check_keys(const at::Tensor& keys, const at::Tensor& column_keys, const at::Tensor& t, int64_t threshold) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong && keys.is_contiguous() &&
                  keys.size(0) == t.size(0),
              "keys must be a contiguous int64 [rows] tensor with one key per row (", t.size(0), "), got ",
              keys.scalar_type(), " of shape ", keys.sizes());
  TORCH_CHECK(column_keys.dim() == 1 && column_keys.scalar_type() == at::kLong && column_keys.is_contiguous() &&
                  column_keys.size(0) == (t.size(1) + 1) / 2,
              "column_keys must be a contiguous int64 tensor of one key per pair of columns (", (t.size(1) + 1) / 2,
              "), got ", column_keys.scalar_type(), " of shape ", column_keys.sizes());
  TORCH_CHECK(threshold >= 0 && threshold < (1 << 16), "threshold must lie in [0, 65536), got ", threshold);
}

// The unsigned integer of an element's bits (T: float, or uint16_t standing for bf16).
template <typename T> struct Bits;
template <> struct Bits<float> { using type = uint32_t; };
template <> struct Bits<uint16_t> { using type = uint16_t; };

// bf16 handled as its bits: the masks apply to them directly, and the conversions below are integer arithmetic the
// compiler vectorises (c10::BFloat16's own conversions did not vectorise in these loops).
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, NaN to the quiet NaN 0x7FC0: torch's own fp32 -> bf16 rounding.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// An element's value from its bits, and back (T: float, or uint16_t for bf16).
template <typename T> float value(uint32_t bits);
template <> inline float value<float>(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <> inline float value<uint16_t>(uint32_t bits) { return bf16_to_float(static_cast<uint16_t>(bits)); }
template <typename T> typename Bits<T>::type bits_of(float v);
template <> inline uint32_t bits_of<float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}
template <> inline uint16_t bits_of<uint16_t>(float v) { return float_to_bf16(v); }

template <typename F>
void by_dtype(at::ScalarType dtype, F&& body) {
  if (dtype == at::kFloat) {
    body(float{});
  } else {
    body(uint16_t{});
  }
}

// Per element, the bits of T that survive: all of them where the entry is kept, none where it drops. A row's mask
// is drawn in one loop of 64-bit multiplies (one per column pair) that the compiler vectorises, and applied as a
// bitwise and (a dropped element becomes +0.0, as torch.where(dropped, 0.0, x) makes it).
template <typename M>
inline void draw_row(uint64_t row_key, const uint64_t* column_keys, int64_t pairs, uint32_t threshold, M* keep) {
  for (int64_t j = 0; j < pairs; ++j) {
    // u ^ 0x8000 per half, so that "u < INT16_MIN + threshold" reads "draw < threshold"
    const uint32_t draw = static_cast<uint32_t>(((row_key ^ column_keys[j]) * kC1) >> 32) ^ 0x80008000u;
    keep[2 * j] = (draw & 0xFFFFu) < threshold ? M(0) : M(~M(0));
    keep[2 * j + 1] = (draw >> 16) < threshold ? M(0) : M(~M(0));
  }
}

// Rows split over torch's threads: `body(row, keep)` with that row's keep mask (one entry per column, padded to
// an even count).
template <typename M, typename Body>
void for_rows(const at::Tensor& keys, const at::Tensor& column_keys, int64_t site_key, uint32_t threshold,
              Body&& body) {
  const int64_t rows = keys.size(0), pairs = column_keys.size(0);
  const int64_t* key = keys.data_ptr<int64_t>();
  const uint64_t* cols = reinterpret_cast<const uint64_t*>(column_keys.data_ptr<int64_t>());
  const uint64_t site = static_cast<uint64_t>(site_key);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    std::vector<M> keep(2 * pairs);
    for (int64_t r = r0; r < r1; ++r) {
      draw_row(static_cast<uint64_t>(key[r]) ^ site, cols, pairs, threshold, keep.data());
      body(r, keep.data());
    }
  });
}

// body(tag, in_row, out_row, keep) on every row of `in` and `out` (same shape and dtype; tag: a T, float or
// uint16_t for bf16, whose bits the rows hold): the dtype dispatch, the rows' pointers and masks of both ops.
template <typename Body>
void map_rows(const at::Tensor& in, at::Tensor& out, const at::Tensor& keys, const at::Tensor& column_keys,
              int64_t site_key, int64_t threshold, Body&& body) {
  const int64_t columns = in.size(1);
  by_dtype(in.scalar_type(), [&](auto tag) {
    using M = typename Bits<decltype(tag)>::type;
    const M* src = static_cast<const M*>(in.data_ptr());
    M* dst = static_cast<M*>(out.data_ptr());
    for_rows<M>(keys, column_keys, site_key, static_cast<uint32_t>(threshold), [&](int64_t r, const M* keep) {
      body(tag, src + r * columns, dst + r * columns, keep);
    });
  });
}

// x̂ = x with the dropped entries zeroed (torch.where(dropped, 0.0, x)), a new tensor.
at::Tensor dropout_zeroed(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& column_keys,
                          int64_t site_key, int64_t threshold) {
  check_rows(x, "x");
  check_keys(keys, column_keys, x, threshold);
  at::Tensor out = at::empty_like(x);
  const int64_t columns = x.size(1);
  map_rows(x, out, keys, column_keys, site_key, threshold, [&](auto, const auto* xr, auto* yr, const auto* keep) {
    for (int64_t c = 0; c < columns; ++c) yr[c] = xr[c] & keep[c];
  });
  return out;
}

// out += t with t's dropped entries zeroed (out.add_(t.masked_fill(dropped, 0.0))): a dropped entry adds +0.0, as
// there, so even a -0.0 in out comes out as torch's.
void dropout_add_kept_(at::Tensor& out, const at::Tensor& t, const at::Tensor& keys, const at::Tensor& column_keys,
                       int64_t site_key, int64_t threshold) {
  check_rows(out, "out");
  check_rows(t, "t");
  TORCH_CHECK(out.sizes() == t.sizes() && out.scalar_type() == t.scalar_type(), "out and t must match; got ",
              out.scalar_type(), out.sizes(), " and ", t.scalar_type(), t.sizes());
  check_keys(keys, column_keys, t, threshold);
  const int64_t columns = t.size(1);
  map_rows(t, out, keys, column_keys, site_key, threshold, [&](auto tag, const auto* tr, auto* yr, const auto* keep) {
    using T = decltype(tag);
    using M = typename Bits<T>::type;
    // in fp32, rounded once to T: torch's add_ of reduced-precision tensors does the same
    for (int64_t c = 0; c < columns; ++c) yr[c] = bits_of<T>(value<T>(yr[c]) + value<T>(M(tr[c] & keep[c])));
  });
}

}  // namespace

TORCH_LIBRARY(lorafusion_dropout, m) {
  m.def("dropout_zeroed(Tensor x, Tensor keys, Tensor column_keys, int site_key, int threshold) -> Tensor");
  m.def("dropout_add_kept_(Tensor(a!) out, Tensor t, Tensor keys, Tensor column_keys, int site_key, "
        "int threshold) -> ()");
}

TORCH_LIBRARY_IMPL(lorafusion_dropout, CPU, m) {
  m.impl("dropout_zeroed", &dropout_zeroed);
  m.impl("dropout_add_kept_", &dropout_add_kept_);
}
