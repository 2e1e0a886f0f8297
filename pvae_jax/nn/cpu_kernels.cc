// Two kernels of an NHWC convolution for XLA:CPU, through the XLA FFI: its kernel
// gradient (pvae_kernel_gradient) and its forward pass (pvae_conv, ConvRows), each by
// direct sums or, where asked for and the shapes allow, by Winograd's minimal filtering
// along the rows (namespace winograd).
//
// dk[a, b, c, f] = sum_{n, i, j} x_pad[n, i * sh + a, j * sw + b, c] * dy[n, i, j, f],
// sh and sw being the strides over rows and columns and x_pad x with ``top`` zero rows
// above and ``left`` zero columns before it (and zeros below and after, up to the
// output's size; a negative ``top`` or ``left``, or an output smaller than x, crops x
// instead). x_pad is never built whole: rows that fall outside x are skipped, and a
// row whose columns need padding or cropping is copied into a zero-padded buffer
// (PaddedRows), so any padding works. For one output row (n, i) and one kernel
// row a, the kw columns and C channels that output pixel j reads are K = kw * C
// contiguous floats of x_pad, starting at column j * sw, whatever the stride. So row a of
// dk, as a [K, F] matrix, is a sum over pixels of rank-one updates x_window(j) (K)
// times dy(j) (F), accumulated here in registers over the Wo pixels of an output row:
// 5 rows of K by 16 columns of F at a time with AVX2, 12 (or 10, SumRows) by 32 with
// AVX-512. XLA:CPU
// instead runs a convolution that contracts over the batch alone (on a 2-core Zen 3,
// 5.6 ms against 1.6 ms here for a 3x5 kernel, 16 -> 32 channels, 10 images of 28x28,
// one core; on a 2-core Xeon with AVX-512, 50 images, the AVX-512 blocks take 4.9-5.0
// ms against 7.9 ms for the AVX2 ones).
//
// Rows (n, i) are split into a fixed number of chunks (RunChunks), at most one per core
// the device has to itself (``max_chunks``: 1 with one virtual device per core, where
// a chunk for the pool only made the two devices' threads share the cores). For the
// kernel gradient each is summed into its own buffer and the buffers added in order:
// the result does not depend on which thread ran which chunk. The forward pass writes
// each chunk's rows of y directly.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors of 8 floats (AVX2) and, where the CPU has AVX-512, of 16.
typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
#if defined(__AVX512F__)
// 32 vector registers: the main block is 12 rows by 2 x 16 columns (24 accumulators):
// per pixel 24 multiply-adds of 16 lanes for 14 loads, against AVX2's 10 of 8 for 7.
typedef v16 Wide;
constexpr int kRowBlock = 12;
#else
// 16 vector registers: 5 rows by 2 x 8 columns (10 accumulators).
typedef v8 Wide;
constexpr int kRowBlock = 5;
#endif

template <typename V>
constexpr int Lanes() { return sizeof(V) / sizeof(float); }
template <typename V>
inline V Splat(float f) { return f - V{}; }  // a scalar in a vector op is broadcast
template <typename V>
inline V Load(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
template <typename V>
inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

struct Shape {
  int64_t H, W, C, Ho, Wo, F, kh, K, top, left;
  int64_t sh = 1, sw = 1;  // the strides over rows and over columns
};

// Rows of x as rows of x_pad: the Wp = (Wo - 1) * sw + kw columns that one kernel row
// reads, column c holding x's column c - left and zeros outside x. Where x needs no
// padding (or cropping) at the sides, x's own row; else a copy in a buffer with one
// slot per kernel row, whose columns outside x stay zero from the start, since every
// slot always takes the same columns.
class PaddedRows {
 public:
  explicit PaddedRows(const Shape& s)
      : C_(s.C), left_(s.left), Wp_((s.Wo - 1) * s.sw + s.K / s.C),
        c0_(std::clamp<int64_t>(s.left, 0, Wp_)),
        c1_(std::clamp<int64_t>(s.W + s.left, c0_, Wp_)),
        buffer_(s.left == 0 && Wp_ <= s.W ? 0 : s.kh * Wp_ * s.C, 0.f) {}

  const float* Get(const float* x_row, int64_t slot) {
    if (buffer_.empty()) return x_row;
    float* p = buffer_.data() + slot * Wp_ * C_;
    std::memcpy(p + c0_ * C_, x_row + (c0_ - left_) * C_, sizeof(float) * (c1_ - c0_) * C_);
    return p;
  }

 private:
  int64_t C_, left_, Wp_, c0_, c1_;
  std::vector<float> buffer_;
};

// dk[r, n .. n + NV lanes] += sum_j x_pad[j * sw * C + m + r] * dy[j, n ..] for r < MB
// over the pixels j0 .. Wo of one output row: for each pixel, the NV vectors of dy times
// MB inputs broadcast.
template <typename V, int MB, int NV>
inline void Block(const float* x_pad, const float* dy, float* dk, int64_t m, const Shape& s,
                  int64_t j0) {
  // Summed from zero and then added to dk: the sum over pixels is then a sum of row
  // sums, with less rounding than one running sum over all of them.
  V acc[MB][NV] = {};
  constexpr int L = Lanes<V>();
  const float* x = x_pad + m + j0 * s.sw * s.C;
  for (int64_t j = j0; j < s.Wo; ++j, x += s.sw * s.C) {
    V d[NV];
    for (int v = 0; v < NV; ++v) d[v] = Load<V>(dy + j * s.F + L * v);
    for (int r = 0; r < MB; ++r) {
      const V xv = Splat<V>(x[r]);
      for (int v = 0; v < NV; ++v) acc[r][v] += xv * d[v];
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int v = 0; v < NV; ++v)
      Store<V>(dk + r * s.F + L * v, Load<V>(dk + r * s.F + L * v) + acc[r][v]);
}

// Rows m .. m + MB of dk over all F columns: two wide vectors at a time, then one,
// then 8 columns (with AVX-512; with AVX2 that is the loop before), then one by one.
template <int MB>
inline void Rows(const float* x_pad, const float* dy, float* dk, int64_t m, const Shape& s,
                 int64_t j0) {
  float* dk_m = dk + m * s.F;
  constexpr int L = Lanes<Wide>();
  int64_t n = 0;
  for (; n + 2 * L <= s.F; n += 2 * L) Block<Wide, MB, 2>(x_pad, dy + n, dk_m + n, m, s, j0);
  for (; n + L <= s.F; n += L) Block<Wide, MB, 1>(x_pad, dy + n, dk_m + n, m, s, j0);
  for (; n + 8 <= s.F; n += 8) Block<v8, MB, 1>(x_pad, dy + n, dk_m + n, m, s, j0);
  for (; n < s.F; ++n)
    for (int r = 0; r < MB; ++r) {
      float sum = 0.f;
      for (int64_t j = j0; j < s.Wo; ++j) sum += x_pad[j * s.sw * s.C + m + r] * dy[j * s.F + n];
      dk_m[r * s.F + n] += sum;
    }
}

// Rows m from ``m`` to K of dk, MB at a time, then 4, then 1, over the pixels j0 .. Wo.
// Each entry of dk sums its pixels in the same order whichever block it falls in.
// Against the guarded reads of the padding this replaced, and blocks of 12 then 4 for
// K = 80, the vertical stacks' kernel gradient took 3.45 ms against 3.83 ms (2-core
// Xeon, 50 images, medians of 40 calls, the same result to the bit) and a gated_noup
// step 0.987x the time.
template <int MB>
inline void RowsFrom(const float* x_pad, const float* dy, float* dk, int64_t m,
                     const Shape& s, int64_t j0) {
  for (; m + MB <= s.K; m += MB) Rows<MB>(x_pad, dy, dk, m, s, j0);
  for (; m + 4 <= s.K; m += 4) Rows<4>(x_pad, dy, dk, m, s, j0);
  for (; m < s.K; ++m) Rows<1>(x_pad, dy, dk, m, s, j0);
}

// One output row's (pixels j0 .. Wo) and one kernel row's share of dk_a (K x F).
void SumRow(const float* x_pad, const float* dy_row, float* dk_a, const Shape& s, int64_t j0) {
#if defined(__AVX512F__)
  // Blocks of 12 rows where they divide K, else of 10 (the vertical stacks' 80),
  // else of 12 and the rest by 4 and 1.
  if (s.K % 12 != 0 && s.K % 10 == 0) {
    RowsFrom<10>(x_pad, dy_row, dk_a, 0, s, j0);
    return;
  }
#endif
  RowsFrom<kRowBlock>(x_pad, dy_row, dk_a, 0, s, j0);
}

// dk (kh x K x F, zeroed by the caller) += the sum over output rows [row0, row1) of
// the flattened (n, i).
void SumRows(const float* x, const float* dy, float* dk, const Shape& s, int64_t row0,
             int64_t row1) {
  PaddedRows x_rows(s);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / s.Ho, i = row % s.Ho;
    const float* dy_row = dy + row * s.Wo * s.F;
    for (int64_t a = 0; a < s.kh; ++a) {
      const int64_t x_i = i * s.sh + a - s.top;  // rows of the padding add nothing
      if (x_i < 0 || x_i >= s.H) continue;
      SumRow(x_rows.Get(x + (n * s.H + x_i) * s.W * s.C, a), dy_row, dk + a * s.K * s.F, s, 0);
    }
  }
}

// Runs fn(c) for every chunk c in [0, count), on the pool's threads and the calling
// one, and returns when all have run. The calling thread takes chunks too and waits
// only for chunks other threads have started, so it never waits on a busy pool. Pool
// tasks may start after this returns (and then find no chunk left), so what they
// share lives on the heap.
template <typename Fn>
void RunChunks(ffi::ThreadPool& pool, int64_t count, const Fn& fn) {
  if (count == 1) {
    fn(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, fn] {
    for (int64_t c; (c = state->next.fetch_add(1)) < count;) {
      fn(c);
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == count) state->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < count; ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == count; });
}

// How many chunks to split ``rows`` rows into: one per pool thread, at most
// ``max_chunks`` (the cores the device has to itself), each of at least ``min_rows``.
int64_t NumChunks(ffi::ThreadPool& pool, int64_t rows, int64_t min_rows, int64_t max_chunks) {
  return std::max<int64_t>(
      1, std::min({std::max<int64_t>(pool.num_threads(), 1), max_chunks, rows / min_rows}));
}

// Winograd's minimal filtering along a row (AVX-512 builds, column stride 1, kernels 5
// wide, C and F multiples of 16), for both kernels; ``winograd=True`` asks for it.
// - The forward pass, F(4, 5): for each tile of 4 output pixels of one kernel row,
//   y_tile = AT [(G k) . (BT x_tile)] over the tile's 8 input columns: 8 products per
//   channel pair against the direct sum's 20, 2.5 times fewer multiply-adds, the
//   transforms aside. BT is the Toom-Cook interpolation at 0, +-1, +-2, +-1/2 and
//   infinity, each row scaled to small integers (G's rows by the inverse), G k is
//   formed in double once per call, and AT is exact in float.
// - The kernel gradient, F(5, 4): a kernel row's 5 columns of dk from one tile are the
//   correlation of its 8 columns of x with its 4 of dy, dk_tile = AT5 [(G4 dy_tile) .
//   (BT x_tile)] with the same points and BT (G4 in DyTransform, AT5 in
//   KernelOutputTransform). The products are summed over all of a chunk's tiles
//   before AT5, so they are sums of the transformed x times the transformed dy, 8
//   products per pair of channels and tile against 20.
// The rounding error is about 4 times the direct sums' (3x5 kernels, 16 or 32
// channels, normal inputs). The forward pass mixes the 8 columns of a tile at that
// level: an output may change by a rounding error when an input its kernel does not
// reach does, so it is only for convolutions whose outputs may read every column of
// the rows they read (a vertical stack). The kernel gradient's mixing only rounds dk.
namespace winograd {
// AT (4 x 8) and BT (8 x 8) are written out in OutputTransform and InputTransform, as
// sums and differences of the points' pairs +-p; G (8 x 5) is here:
constexpr int kM = 4, kR = 5, kN = kM + kR - 1;
constexpr double kG[kN][kR] = {{1. / 4, 0, 0, 0, 0},
                               {1. / 18, 1. / 18, 1. / 18, 1. / 18, 1. / 18},
                               {1. / 18, -1. / 18, 1. / 18, -1. / 18, 1. / 18},
                               {1. / 360, 1. / 180, 1. / 90, 1. / 45, 2. / 45},
                               {1. / 360, -1. / 180, 1. / 90, -1. / 45, 2. / 45},
                               {16. / 45, 8. / 45, 4. / 45, 2. / 45, 1. / 45},
                               {16. / 45, -8. / 45, 4. / 45, -2. / 45, 1. / 45},
                               {0, 0, 0, 0, 1. / 4}};

bool Applies(const Shape& s) {
  return Lanes<Wide>() == 16 && s.sw == 1 && s.K == kR * s.C && s.C % 16 == 0 &&
         s.F % 16 == 0 && s.Wo >= kM;
}

// U[a][t][c][f] = sum_b G[t][b] k[a][b][c][f], for every kernel row a.
std::vector<float> KernelTransform(const float* k, const Shape& s) {
  std::vector<float> u(s.kh * kN * s.C * s.F);
  for (int64_t a = 0; a < s.kh; ++a)
    for (int t = 0; t < kN; ++t)
      for (int64_t m = 0; m < s.C * s.F; ++m) {
        double sum = 0;
        for (int b = 0; b < kR; ++b) sum += kG[t][b] * k[(a * kR + b) * s.C * s.F + m];
        u[(a * kN + t) * s.C * s.F + m] = static_cast<float>(sum);
      }
  return u;
}

// v[tile][t][c] = sum_p BT[t][p] x_pad[(4 tile + p) * C + c] for the row's tiles, BT's
// rows being
//   (4, 0, -21, 0, 21, 0, -4, 0),   (0, -4, -4, 17, 17, -4, -4, 0),  (0, 4, -4, -17, 17, 4, -4, 0),
//   (0, 2, 1, -10, -5, 8, 4, 0),    (0, -2, 1, 10, -5, -8, 4, 0),    (0, 4, 8, -5, -10, 1, 2, 0),
//   (0, -4, 8, 5, -10, -1, 2, 0),   (0, -4, 0, 21, 0, -21, 0, 4):
// rows 1 and 2, 3 and 4, 5 and 6 are the sum and difference of their even and odd
// columns' parts (32 operations a vector where the rows as they are take 44).
void InputTransform(const float* x_pad, float* v, int64_t tiles, const Shape& s) {
  const Wide k2 = Splat<Wide>(2), k4 = Splat<Wide>(4), k5 = Splat<Wide>(5),
             k8 = Splat<Wide>(8), k10 = Splat<Wide>(10), k17 = Splat<Wide>(17),
             k21 = Splat<Wide>(21);
  for (int64_t tile = 0; tile < tiles; ++tile)
    for (int64_t c = 0; c < s.C; c += 16) {
      Wide d[kN];
      for (int p = 0; p < kN; ++p) d[p] = Load<Wide>(x_pad + (kM * tile + p) * s.C + c);
      const Wide e1 = k17 * d[4] - k4 * (d[2] + d[6]), o1 = k17 * d[3] - k4 * (d[1] + d[5]);
      const Wide e3 = d[2] - k5 * d[4] + k4 * d[6], o3 = k2 * d[1] - k10 * d[3] + k8 * d[5];
      const Wide e5 = k8 * d[2] - k10 * d[4] + k2 * d[6], o5 = k4 * d[1] - k5 * d[3] + d[5];
      const Wide r[kN] = {k4 * (d[0] - d[6]) + k21 * (d[4] - d[2]), e1 + o1, e1 - o1, e3 + o3,
                          e3 - o3, e5 + o5, e5 - o5, k4 * (d[7] - d[1]) + k21 * (d[3] - d[5])};
      for (int t = 0; t < kN; ++t) Store<Wide>(v + (tile * kN + t) * s.C + c, r[t]);
    }
}

// m[tile][t][f ..] = sum_a sum_c v_a[tile][t][c] * U_a[t][c][f ..] for TB tiles from
// tile0, NT points from t0 and NV vectors of f from f0.
template <int TB, int NT, int NV>
inline void Product(const float* const* v_rows, const float* const* u_rows, int num_rows,
                    float* m, int64_t tile0, int t0, int64_t f0, const Shape& s) {
  Wide acc[NT][TB][NV] = {};
  for (int a = 0; a < num_rows; ++a)
    for (int64_t c = 0; c < s.C; ++c)
#pragma GCC unroll 2
      for (int tt = 0; tt < NT; ++tt) {
        const float* u = u_rows[a] + ((t0 + tt) * s.C + c) * s.F + f0;
        Wide uv[NV];
        for (int q = 0; q < NV; ++q) uv[q] = Load<Wide>(u + 16 * q);
        const float* v = v_rows[a] + ((tile0 * kN) + t0 + tt) * s.C + c;
#pragma GCC unroll 8
        for (int tile = 0; tile < TB; ++tile) {
          const Wide xv = Splat<Wide>(v[tile * kN * s.C]);
          for (int q = 0; q < NV; ++q) acc[tt][tile][q] += xv * uv[q];
        }
      }
  for (int tt = 0; tt < NT; ++tt)
    for (int tile = 0; tile < TB; ++tile)
      for (int q = 0; q < NV; ++q)
        Store<Wide>(m + ((tile0 + tile) * kN + t0 + tt) * s.F + f0 + 16 * q, acc[tt][tile][q]);
}

template <int NT, int NV>
void Products(const float* const* v_rows, const float* const* u_rows, int num_rows, float* m,
              int64_t tiles, int64_t f0, const Shape& s) {
  for (int t0 = 0; t0 < kN; t0 += NT) {
    int64_t tile = 0;
    for (; tile + 7 <= tiles; tile += 7)
      Product<7, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s);
    switch (tiles - tile) {
      case 6: Product<6, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s); break;
      case 5: Product<5, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s); break;
      case 4: Product<4, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s); break;
      case 3: Product<3, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s); break;
      case 2: Product<2, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s); break;
      case 1: Product<1, NT, NV>(v_rows, u_rows, num_rows, m, tile, t0, f0, s); break;
      default: break;
    }
  }
}

// y_row[4 tile + q][f] = sum_t AT[q][t] m[tile][t][f], AT's rows being
//   (1, 1, 1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1/2, -1/2, 0), (0, 1, 1, 4, 4, 1/4, 1/4, 0),
//   (0, 1, -1, 8, -8, 1/8, -1/8, 1):
// the powers of the points +-1, +-2, +-1/2, from the sums and differences of each pair.
void OutputTransform(const float* m, float* y_row, int64_t tiles, const Shape& s) {
  for (int64_t tile = 0; tile < tiles; ++tile)
    for (int64_t f = 0; f < s.F; f += 16) {
      Wide mt[kN];
      for (int t = 0; t < kN; ++t) mt[t] = Load<Wide>(m + (tile * kN + t) * s.F + f);
      const Wide s1 = mt[1] + mt[2], d1 = mt[1] - mt[2], s2 = mt[3] + mt[4],
                 d2 = mt[3] - mt[4], s3 = mt[5] + mt[6], d3 = mt[5] - mt[6];
      float* y = y_row + kM * tile * s.F + f;
      Store<Wide>(y, mt[0] + s1 + s2 + s3);
      Store<Wide>(y + s.F, d1 + Splat<Wide>(2) * d2 + Splat<Wide>(.5f) * d3);
      Store<Wide>(y + 2 * s.F, s1 + Splat<Wide>(4) * s2 + Splat<Wide>(.25f) * s3);
      Store<Wide>(y + 3 * s.F, d1 + Splat<Wide>(8) * d2 + Splat<Wide>(.125f) * d3 + mt[7]);
    }
}

// Rows of x transformed by BT (InputTransform), the last ``slots`` consecutive ones read
// kept by row: the next output row (or group of rows) reads most of them again, so each
// row of x is transformed once per chunk, not once per kernel row that reads it.
class TransformedRows {
 public:
  TransformedRows(const Shape& s, int64_t tiles, int64_t slots)
      : size_(tiles * kN * s.C), tiles_(tiles), slots_(slots), padded_(s),
        data_(slots * size_), tag_(slots, -1) {}

  const float* Get(const float* x, int64_t n, int64_t x_i, const Shape& s) {
    const int64_t slot = x_i % slots_, tag = n * s.H + x_i;
    float* v = data_.data() + slot * size_;
    if (tag_[slot] != tag) {
      InputTransform(padded_.Get(x + tag * s.W * s.C, 0), v, tiles_, s);
      tag_[slot] = tag;
    }
    return v;
  }

 private:
  int64_t size_, tiles_, slots_;
  PaddedRows padded_;
  std::vector<float> data_;
  std::vector<int64_t> tag_;
};

// d[tile][t][f] = sum_q G4[t][q] dy_row[(4 tile + q) * F + f], G4 being G's first 4
// columns but for the last row, (0, 0, 0, 1/4): the dy tile as a polynomial of degree
// 3 at the points, scaled like G's rows.
void DyTransform(const float* dy_row, float* d, int64_t tiles, const Shape& s) {
  const Wide k2 = Splat<Wide>(2), k4 = Splat<Wide>(4), k8 = Splat<Wide>(8),
             quarter = Splat<Wide>(.25f), r18 = Splat<Wide>(1.f / 18),
             r45 = Splat<Wide>(1.f / 45), r360 = Splat<Wide>(1.f / 360);
  for (int64_t tile = 0; tile < tiles; ++tile)
    for (int64_t f = 0; f < s.F; f += 16) {
      Wide g[kM];
      for (int q = 0; q < kM; ++q) g[q] = Load<Wide>(dy_row + (kM * tile + q) * s.F + f);
      const Wide e1 = (g[0] + g[2]) * r18, o1 = (g[1] + g[3]) * r18;
      const Wide e2 = (g[0] + k4 * g[2]) * r360, o2 = (k2 * g[1] + k8 * g[3]) * r360;
      const Wide e3 = (k4 * (k4 * g[0] + g[2])) * r45, o3 = (k2 * (k4 * g[1] + g[3])) * r45;
      const Wide r[kN] = {g[0] * quarter, e1 + o1, e1 - o1, e2 + o2,
                          e2 - o2, e3 + o3, e3 - o3, g[3] * quarter};
      for (int t = 0; t < kN; ++t) Store<Wide>(d + (tile * kN + t) * s.F + f, r[t]);
    }
}

// mk[c][f ..] += sum over the rows and tiles p of v_p[t][c] d_p[t][f ..], for CB
// channels from c0 and NV vectors of f from f0: v_p and d_p are a row's transformed x
// and dy (``tiles`` tiles each), one point t.
template <int CB, int NV>
inline void KernelProduct(const float* const* v_rows, const float* const* d_rows,
                          int num_rows, int64_t tiles, int t, float* mk, int64_t c0,
                          int64_t f0, const Shape& s) {
  Wide acc[CB][NV] = {};
  for (int r = 0; r < num_rows; ++r)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const float* d = d_rows[r] + (tile * kN + t) * s.F + f0;
      const float* v = v_rows[r] + (tile * kN + t) * s.C + c0;
      Wide dv[NV];
      for (int q = 0; q < NV; ++q) dv[q] = Load<Wide>(d + 16 * q);
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) {
        const Wide xv = Splat<Wide>(v[c]);
        for (int q = 0; q < NV; ++q) acc[c][q] += xv * dv[q];
      }
    }
  for (int c = 0; c < CB; ++c)
    for (int q = 0; q < NV; ++q) {
      float* m = mk + (c0 + c) * s.F + f0 + 16 * q;
      Store<Wide>(m, Load<Wide>(m) + acc[c][q]);
    }
}

// dk_a[b * C + c][f] += sum_t AT5[b][t] mk_a[t][c][f] for every kernel row a, AT5's
// rows being the powers 0 to 4 of the points 0, +-1, +-2, +-1/2 and, for the point at
// infinity, (0, 0, 0, 0, 1).
void KernelOutputTransform(const float* mk, float* dk, const Shape& s) {
  const int64_t size = s.C * s.F;
  for (int64_t a = 0; a < s.kh; ++a)
    for (int64_t m = 0; m < size; m += 16) {
      Wide mt[kN];
      for (int t = 0; t < kN; ++t) mt[t] = Load<Wide>(mk + (a * kN + t) * size + m);
      const Wide s1 = mt[1] + mt[2], d1 = mt[1] - mt[2], s2 = mt[3] + mt[4],
                 d2 = mt[3] - mt[4], s3 = mt[5] + mt[6], d3 = mt[5] - mt[6];
      const Wide b[kR] = {
          mt[0] + s1 + s2 + s3, d1 + Splat<Wide>(2) * d2 + Splat<Wide>(.5f) * d3,
          s1 + Splat<Wide>(4) * s2 + Splat<Wide>(.25f) * s3,
          d1 + Splat<Wide>(8) * d2 + Splat<Wide>(.125f) * d3,
          s1 + Splat<Wide>(16) * s2 + Splat<Wide>(.0625f) * s3 + mt[7]};
      for (int q = 0; q < kR; ++q) {
        float* out = dk + (a * kR + q) * size + m;
        Store<Wide>(out, Load<Wide>(out) + b[q]);
      }
    }
}

// SumRows by F(5, 4) over the first 4 * tiles pixels of each row, the rest by the
// direct sums. The tiles' products are summed in registers over kGroup output rows of
// one image at a time, then into mk (the transformed dk, kh x 8 x C x F), which is
// transformed into dk once at the end.
void SumRows(const float* x, const float* dy, float* dk, const Shape& s, int64_t row0,
             int64_t row1) {
  constexpr int64_t kGroup = 4;
  const int64_t tiles = s.Wo / kM, j0 = tiles * kM;
  // The rows of x that a group reads, from its first row's first to its last's last.
  TransformedRows transformed(s, tiles, (kGroup - 1) * s.sh + s.kh);
  PaddedRows padded(s);
  std::vector<float> d(kGroup * tiles * kN * s.F), mk(s.kh * kN * s.C * s.F, 0.f);
  const float* v_rows[kGroup];
  const float* d_rows[kGroup];
  for (int64_t row = row0; row < row1;) {
    const int64_t n = row / s.Ho, end = std::min({row1, (n + 1) * s.Ho, row + kGroup});
    for (int64_t r = row; r < end; ++r)
      DyTransform(dy + r * s.Wo * s.F, d.data() + (r - row) * tiles * kN * s.F, tiles, s);
    for (int64_t a = 0; a < s.kh; ++a) {
      int num_rows = 0;
      for (int64_t r = row; r < end; ++r) {
        const int64_t x_i = (r % s.Ho) * s.sh + a - s.top;  // rows of the padding add nothing
        if (x_i < 0 || x_i >= s.H) continue;
        v_rows[num_rows] = transformed.Get(x, n, x_i, s);
        d_rows[num_rows] = d.data() + (r - row) * tiles * kN * s.F;
        ++num_rows;
        if (j0 < s.Wo)
          SumRow(padded.Get(x + (n * s.H + x_i) * s.W * s.C, 0), dy + r * s.Wo * s.F,
                 dk + a * s.K * s.F, s, j0);
      }
      if (num_rows == 0) continue;
      float* mk_a = mk.data() + a * kN * s.C * s.F;
      for (int t = 0; t < kN; ++t)
        for (int64_t c = 0; c < s.C; c += 8) {
          int64_t f = 0;
          for (; f + 32 <= s.F; f += 32)
            KernelProduct<8, 2>(v_rows, d_rows, num_rows, tiles, t, mk_a + t * s.C * s.F, c,
                                f, s);
          for (; f < s.F; f += 16)
            KernelProduct<8, 1>(v_rows, d_rows, num_rows, tiles, t, mk_a + t * s.C * s.F, c,
                                f, s);
        }
    }
    row = end;
  }
  KernelOutputTransform(mk.data(), dk, s);
}
}  // namespace winograd

ffi::Error KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                          int64_t top, int64_t left, int64_t sh, int64_t sw,
                          int64_t max_chunks, int64_t use_winograd) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 3 || xd[0] != yd[0] ||
      yd[3] != kd[2] || kd[1] % xd[3] != 0 || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument(
        "pvae_kernel_gradient: needs x [B, H, W, C], dy [B, Ho, Wo, F] and a result "
        "[kh, kw * C, F], and strides of at least 1");
  const Shape s{xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], kd[0], kd[1], top, left, sh, sw};
  const int64_t rows = xd[0] * s.Ho, size = s.kh * s.K * s.F;
  float* out = dk->typed_data();
  // Chunks of at least 64 rows (a 28x28 image is 28): below that a thread's share is
  // not worth its buffer and the final sum.
  const int64_t count = NumChunks(pool, rows, 64, max_chunks);
  const auto sum_rows = use_winograd && winograd::Applies(s) ? winograd::SumRows : SumRows;
  if (count == 1) {
    std::memset(out, 0, sizeof(float) * size);
    sum_rows(x.typed_data(), dy.typed_data(), out, s, 0, rows);
    return ffi::Error::Success();
  }
  std::vector<std::vector<float>> partial(count);
  RunChunks(pool, count, [&](int64_t c) {
    partial[c].assign(size, 0.f);
    sum_rows(x.typed_data(), dy.typed_data(), partial[c].data(), s, c * rows / count,
             (c + 1) * rows / count);
  });
  std::memcpy(out, partial[0].data(), sizeof(float) * size);
  for (int64_t c = 1; c < count; ++c) {
    const float* p = partial[c].data();
    for (int64_t k = 0; k < size; ++k) out[k] += p[k];
  }
  return ffi::Error::Success();
}

// The forward pass of the same convolution: y[n, i, j, f] = sum_{a, b, c}
// x_pad[n, i * sh + a, j * sw + b, c] * k[a, b, c, f]. For one output row and one kernel
// row a, output pixel j reads the K = kw * C contiguous floats of x_pad's row from
// column j * sw, so the row is a sum over m < K of x_pad[j * sw * C + m] times row m of
// k[a] (F floats), accumulated here in registers: R pixels by NV vectors of F at a time
// (12 by 2 x 16 with AVX-512, 6 by 2 x 8 with AVX2), for each m NV loads of k for
// R x NV multiply-adds, x broadcast from memory.
template <typename V, int R, int NV>
inline void ConvBlock(const float* const* x_rows, const float* const* k_rows, int num_rows,
                      float* y_row, int64_t j0, int64_t n, const Shape& s) {
  constexpr int L = Lanes<V>();
  V acc[R][NV] = {};
  const int64_t pixel = s.sw * s.C;  // x's floats from one output pixel to the next
  for (int a = 0; a < num_rows; ++a) {
    const float* x = x_rows[a] + j0 * pixel;
    const float* k = k_rows[a] + n;
    for (int64_t m = 0; m < s.K; ++m) {
      V kv[NV];
      for (int v = 0; v < NV; ++v) kv[v] = Load<V>(k + m * s.F + L * v);
      for (int r = 0; r < R; ++r) {
        const V xv = Splat<V>(x[r * pixel + m]);
        for (int v = 0; v < NV; ++v) acc[r][v] += xv * kv[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) Store<V>(y_row + (j0 + r) * s.F + n + L * v, acc[r][v]);
}

// Columns n .. n + NV lanes of the row's pixels from j on: R at a time, then R / 2 (if
// R is even), 4, 2 and 1.
template <typename V, int R, int NV>
inline void ConvPixels(const float* const* x_rows, const float* const* k_rows, int num_rows,
                       float* y_row, int64_t n, const Shape& s, int64_t j) {
  for (; j + R <= s.Wo; j += R) ConvBlock<V, R, NV>(x_rows, k_rows, num_rows, y_row, j, n, s);
  if constexpr (R % 2 == 0 && R / 2 > 4)
    for (; j + R / 2 <= s.Wo; j += R / 2)
      ConvBlock<V, R / 2, NV>(x_rows, k_rows, num_rows, y_row, j, n, s);
  for (; j + 4 <= s.Wo; j += 4) ConvBlock<V, 4, NV>(x_rows, k_rows, num_rows, y_row, j, n, s);
  for (; j + 2 <= s.Wo; j += 2) ConvBlock<V, 2, NV>(x_rows, k_rows, num_rows, y_row, j, n, s);
  for (; j < s.Wo; ++j) ConvBlock<V, 1, NV>(x_rows, k_rows, num_rows, y_row, j, n, s);
}

// Columns n .. n + 16 of pixels j0 .. j0 + R of one output row, for a kernel KW columns
// wide at stride 1 (AVX-512). Input column p of x_pad is read by the KW output pixels
// p - b (b < KW), so each input is broadcast once and multiplied by KW rows of the
// kernel held in registers: per channel, KW loads of k and R + KW - 1 broadcasts for
// R x KW multiply-adds, against ConvBlock's R + 1 loads for R. With 16 output channels
// (one vector a pixel: the input gradients of the 16-channel stacks) ConvBlock is
// bound by those loads: on a 2-core Xeon, 50 images of 28x28, a vertical 3x5 32 -> 16
// took 5.0-5.2 ms here against 7.0 ms by ConvBlock and 5.3-6.8 ms by XLA (medians of
// 30 calls on both cores), and a horizontal 1x3 0.8-1.6 ms against XLA's 1.7-2.3 ms.
// 14 pixels a block (20 of the 32 registers) measured no slower than 24.
template <int R, int KW>
inline void TapBlock(const float* const* x_rows, const float* const* k_rows, int num_rows,
                     float* y_row, int64_t j0, int64_t n, const Shape& s) {
  Wide acc[R] = {};
  for (int a = 0; a < num_rows; ++a) {
    const float* x = x_rows[a] + j0 * s.C;
    const float* k = k_rows[a] + n;
    for (int64_t c = 0; c < s.C; ++c) {
      Wide kv[KW];
#pragma GCC unroll 8
      for (int b = 0; b < KW; ++b) kv[b] = Load<Wide>(k + (b * s.C + c) * s.F);
#pragma GCC unroll 32
      for (int p = 0; p < R + KW - 1; ++p) {
        const Wide xv = Splat<Wide>(x[p * s.C + c]);
#pragma GCC unroll 8
        for (int b = 0; b < KW; ++b)
          if (p - b >= 0 && p - b < R) acc[p - b] += xv * kv[b];
      }
    }
  }
  for (int r = 0; r < R; ++r) Store<Wide>(y_row + (j0 + r) * s.F + n, acc[r]);
}

template <int KW>
inline void TapPixels(const float* const* x_rows, const float* const* k_rows, int num_rows,
                      float* y_row, int64_t n, const Shape& s, int64_t j) {
  for (; j + 14 <= s.Wo; j += 14) TapBlock<14, KW>(x_rows, k_rows, num_rows, y_row, j, n, s);
  for (; j + 8 <= s.Wo; j += 8) TapBlock<8, KW>(x_rows, k_rows, num_rows, y_row, j, n, s);
  for (; j + 4 <= s.Wo; j += 4) TapBlock<4, KW>(x_rows, k_rows, num_rows, y_row, j, n, s);
  for (; j < s.Wo; ++j) TapBlock<1, KW>(x_rows, k_rows, num_rows, y_row, j, n, s);
}

#if defined(__AVX512F__)
constexpr int kPixelBlock = 12;  // 24 of the 32 vector registers accumulate
#else
constexpr int kPixelBlock = 6;  // 12 of the 16
#endif

// y's output rows [row0, row1) of the flattened (n, i); ``u`` is k transformed for
// Winograd's F(4, 5) (winograd::Applies), or null for the direct sums alone.
void ConvRows(const float* x, const float* k, const float* u, float* y, const Shape& s,
              int64_t row0, int64_t row1) {
  const int64_t kw = s.K / s.C;
  // Winograd's tiles cover the first 4 * tiles pixels of a row; the direct sums the rest.
  const int64_t tiles = u ? s.Wo / winograd::kM : 0, j0 = tiles * winograd::kM;
  PaddedRows padded(s);
  std::optional<winograd::TransformedRows> transformed;  // only where Winograd runs
  if (tiles) transformed.emplace(s, tiles, s.kh);
  std::vector<float> products(tiles * winograd::kN * s.F);
  std::vector<const float*> x_rows(s.kh), k_rows(s.kh), v_rows(s.kh), u_rows(s.kh);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / s.Ho, i = row % s.Ho;
    float* y_row = y + row * s.Wo * s.F;
    int num_rows = 0;  // kernel rows that read x, not the padding
    for (int64_t a = 0; a < s.kh; ++a) {
      const int64_t x_i = i * s.sh + a - s.top;
      if (x_i < 0 || x_i >= s.H) continue;
      if (tiles) {
        v_rows[num_rows] = transformed->Get(x, n, x_i, s);
        u_rows[num_rows] = u + a * winograd::kN * s.C * s.F;
      }
      if (j0 < s.Wo) x_rows[num_rows] = padded.Get(x + (n * s.H + x_i) * s.W * s.C, num_rows);
      k_rows[num_rows] = k + a * s.K * s.F;
      ++num_rows;
    }
    if (tiles) {
      int64_t f = 0;
      for (; f + 32 <= s.F; f += 32)
        winograd::Products<1, 2>(v_rows.data(), u_rows.data(), num_rows, products.data(),
                                 tiles, f, s);
      for (; f < s.F; f += 16)
        winograd::Products<2, 1>(v_rows.data(), u_rows.data(), num_rows, products.data(),
                                 tiles, f, s);
      winograd::OutputTransform(products.data(), y_row, tiles, s);
      if (j0 == s.Wo) continue;
    }
    constexpr int L = Lanes<Wide>();
    int64_t f = 0;
    for (; f + 2 * L <= s.F; f += 2 * L)
      ConvPixels<Wide, kPixelBlock, 2>(x_rows.data(), k_rows.data(), num_rows, y_row, f, s, j0);
    for (; f + L <= s.F; f += L) {
      if (L == 16 && s.sw == 1 && kw == 5)
        TapPixels<5>(x_rows.data(), k_rows.data(), num_rows, y_row, f, s, j0);
      else if (L == 16 && s.sw == 1 && kw == 3)
        TapPixels<3>(x_rows.data(), k_rows.data(), num_rows, y_row, f, s, j0);
      else
        ConvPixels<Wide, 2 * kPixelBlock, 1>(x_rows.data(), k_rows.data(), num_rows, y_row,
                                             f, s, j0);
    }
    for (; f + 8 <= s.F; f += 8)
      ConvPixels<v8, 12, 1>(x_rows.data(), k_rows.data(), num_rows, y_row, f, s, j0);
    for (; f < s.F; ++f)
      for (int64_t j = j0; j < s.Wo; ++j) {
        float sum = 0.f;
        for (int a = 0; a < num_rows; ++a)
          for (int64_t m = 0; m < s.K; ++m)
            sum += x_rows[a][j * s.sw * s.C + m] * k_rows[a][m * s.F + f];
        y_row[j * s.F + f] = sum;
      }
  }
}

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                ffi::ResultBuffer<ffi::F32> y, int64_t top, int64_t left, int64_t sh, int64_t sw,
                int64_t max_chunks, int64_t use_winograd) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 3 || yd.size() != 4 || xd[0] != yd[0] ||
      kd[2] != yd[3] || kd[1] % xd[3] != 0 || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument(
        "pvae_conv: needs x [B, H, W, C], a kernel [kh, kw * C, F] and a result "
        "[B, Ho, Wo, F], and strides of at least 1");
  const Shape s{xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], kd[0], kd[1], top, left, sh, sw};
  const int64_t rows = xd[0] * s.Ho;
  std::vector<float> u;
  if (use_winograd && winograd::Applies(s)) u = winograd::KernelTransform(k.typed_data(), s);
  // Each chunk writes its own rows of y: nothing to add up afterwards.
  const int64_t count = NumChunks(pool, rows, 16, max_chunks);
  RunChunks(pool, count, [&](int64_t c) {
    ConvRows(x.typed_data(), k.typed_data(), u.empty() ? nullptr : u.data(), y->typed_data(),
             s, c * rows / count, (c + 1) * rows / count);
  });
  return ffi::Error::Success();
}

// Both kernels take the pool, two float32 arrays, one result, the padding's top and
// left, the strides over rows and columns, the most chunks to split the rows into, and
// whether Winograd's filtering may be used where it applies (``winograd``, 0 or 1).
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("top")
      .Attr<int64_t>("left")
      .Attr<int64_t>("stride_rows")
      .Attr<int64_t>("stride_cols")
      .Attr<int64_t>("max_chunks")
      .Attr<int64_t>("winograd");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PvaeKernelGradient, KernelGradient, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PvaeConv, Conv, Binding());

// 1 where this build has the AVX-512 blocks: the forward pass is measured faster than
// XLA's there only.
extern "C" int PvaeWideBlocks() { return Lanes<Wide>() == 16; }
