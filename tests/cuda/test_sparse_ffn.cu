// Self-checking test and benchmark of the fused sparse consumers (cuda/sparse_ffn/).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
//        -Iinclude -Icuda tests/cuda/test_sparse_ffn.cu cuda/sparse_ffn/sparse_ffn.cu -o /tmp/ts
//   /tmp/ts [--small] [--tiny] [--seed N] [--no-bench] [--bench-only] [--no-variants]
//   compute-sanitizer --tool memcheck /tmp/ts --small     (--tiny for racecheck/synccheck)
//
// Inputs are fresh random each run (seed printed; --seed repeats a run): x, W_u, W_d
// uniform bf16, gate values uniform in [0.05, 2) rounded to bf16. TwELL matrices are
// built here by a host encoder that follows include/twell/twell.h: entries in
// ascending column order, word 0 = the tile's true count, at most slots-1 entries,
// zero padding, a row flag for every row with a tile over capacity. Edge rows add
// what a producer bug or a corrupt buffer could hold: a count word far above the
// capacity in a row that is NOT flagged (with a full tile, or with 3 entries and
// zero words after them), and entry columns outside their tile / outside H.
//
// Oracle: a float64 CPU reference over the STORED entries (what a correct consumer
// reads: min(count, slots-1) words per tile, columns inside the tile and < H), on
// every row (M <= 1024) or 1024 sampled rows plus the first and last 64.
// Metric: relative Frobenius error ||y - ref|| / ||ref|| over the checked rows, and
// the same per row; tolerance 1e-2. The kernel computes u, h and y in fp32 and
// rounds y to bf16 once: bf16 keeps 8 significant bits, so each element's relative
// rounding error is at most 2^-9 ~ 2e-3 (rms ~1.1e-3 over a row); fp32
// accumulation adds ~1e-6. So a correct kernel sits near 1-2e-3 and 1e-2 leaves a
// 5x margin, while a dropped or doubled entry (>= 1/sqrt(active) ~ 0.1-0.2 of its
// row), a wrong neuron or bf16 rounding of every product (the published kernel's
// mode, ~3e-3 per product) shows up in the per-row check.
// Also checked, for every row: flagged rows and the padding columns of y keep the
// poison (bf16 0xFFFF) bit for bit; other rows hold no NaN; the result is bitwise
// identical on a second call; stats[TWELL_STAT_MAX_ROW_COUNT] equals the largest
// sum of count words of a row (flagged rows included) and the other stats words
// stay 0. Every variant of the kernel (tokens per CTA, cluster sizes, up phase on
// FFMA or on tensor cores) is run and checked on every case, not only the one the
// launcher picks. For M <= 64 the decode-sized consumer (sparse_ffn_decode.h) runs
// too, with its own launcher's cluster size and with clusters of 1, 2 and 8: it
// treats every row with a count word over the capacity as overflowed (the
// producer flags such rows), so its expected flags come from the count words; it
// writes every stats word and the overflow-row list, checked against host values. (The tensor-core up phase accumulates
// the exact bf16 products in fp32 inside the MMA unit; its rounding differs from FFMA's by ~1e-7 relative.)
//
// Timing: harness::Timer, median of 20 calls after 3 warm-up calls, 4 copies of the
// weights (4 x 46 MB > L2) and of x / packed / y rotated call to call, so every
// call starts with the weights it needs out of L2 unless it brings them in itself.
// Calls under 1 ms are queued in batches behind a blocking kernel, so the events
// measure GPU time (as in a stream of layers); for M <= 1024 the time of a lone
// call on an idle GPU, host launch overhead included, is printed too ("cold").
// GB/s counts the weight bytes the entries touch: 2 * D * 2 bytes per active entry
// (rows of neurons shared by tokens of a block are read once, so this can exceed
// the DRAM bandwidth when neurons are shared).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "sparse_ffn/sparse_ffn.h"
#include "sparse_ffn/sparse_ffn_decode.h"
#include "sparse_ffn/experiments/sparse_ffn_block.h"
#include "sparse_ffn/sparse_ffn_internal.cuh"
#include "harness.cuh"

using twell::bf16;
using twell::u64;
namespace sfd = twell::sparse_ffn_detail;
namespace sfx = twell::sparse_ffn_experiments;
// Variant code of the block-consumer experiment + row sub-variant r: tb = kRowsKernel, up = kBlockFirst + r.
constexpr int kBlockFirst = 100;

namespace {

// ---------------------------------------------------------------- utilities
using harness::bf16_bits_to_float;
using harness::float_to_bf16_bits;
using harness::kPoisonBf16;
using harness::Rng;

inline uint64_t hash2(uint64_t a, uint64_t b) {
  Rng r(a * 0xD6E8FEB86659FD93ull ^ (b + 0x632BE59BD9B4E019ull));
  r.next();
  return r.next();
}

unsigned n_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 4 : std::min(n, 64u);
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& f) {
  const unsigned nt = n_threads();
  if (n < 2 || nt == 1) {
    f(0, n);
    return;
  }
  std::vector<std::thread> th;
  const int64_t per = (n + nt - 1) / nt;
  for (unsigned i = 0; i < nt; ++i) {
    const int64_t a = i * per, b = std::min(n, a + per);
    if (a >= b) break;
    th.emplace_back(f, a, b);
  }
  for (auto& t : th) t.join();
}

// rows x cols bf16 values uniform in [-scale, scale), row stride ld; padding
// columns get a NaN so that a kernel reading them shows it.
void fill_bf16(std::vector<uint16_t>& v, int64_t rows, int64_t cols, int64_t ld, uint64_t seed, float scale) {
  v.assign(static_cast<size_t>(rows * ld), 0x7FC1u);
  parallel_for(rows, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const uint64_t h = hash2(seed, static_cast<uint64_t>(r * cols + c));
        const double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
        v[r * ld + c] = float_to_bf16_bits(static_cast<float>((2.0 * u - 1.0) * scale));
      }
  });
}

// ---------------------------------------------------------------- patterns
enum Pattern { kU05, kU2, kSkew, kHot, kEdge, kZipf, kTrained, kNumPatterns };
const char* pattern_name(int p) {
  static const char* n[] = {"uniform0.5%", "uniform2%", "skewed", "hot", "edge", "zipf", "trained"};
  return n[p];
}

// Row kinds of the edge pattern.
enum RowKind { kNormal, kZero, kDense, kBigCountFull, kBigCountFew, kBadColumns };

struct Entry {
  uint32_t col;
  uint16_t g;  // bf16 bits, > 0
};

uint16_t rand_gate(Rng& r) { return float_to_bf16_bits(static_cast<float>(0.05 + 1.95 * r.uniform())); }

// Columns with independent probability p (geometric skips), appended sorted.
void add_uniform(std::vector<Entry>& e, int64_t H, double p, Rng& r) {
  const double lq = std::log1p(-p);
  int64_t c = -1;
  for (;;) {
    const double u = std::max(r.uniform(), 1e-300);
    c += 1 + static_cast<int64_t>(std::floor(std::log(u) / lq));
    if (c >= H) break;
    e.push_back({static_cast<uint32_t>(c), rand_gate(r)});
  }
}

void sort_unique(std::vector<Entry>& e) {
  std::sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) { return a.col < b.col; });
  e.erase(std::unique(e.begin(), e.end(), [](const Entry& a, const Entry& b) { return a.col == b.col; }), e.end());
}

struct PatternState {
  std::vector<uint32_t> hot;  // hot neurons
  std::vector<uint32_t> live;  // zipf: live neurons, most popular first
  std::vector<double> live_p;
};

PatternState make_pattern_state(int pat, int64_t H, Rng& r) {
  PatternState ps;
  if (pat == kHot) {
    while (ps.hot.size() < 10 && static_cast<int64_t>(ps.hot.size()) < H) {
      const uint32_t c = static_cast<uint32_t>(r.below(H));
      if (std::find(ps.hot.begin(), ps.hot.end(), c) == ps.hot.end()) ps.hot.push_back(c);
    }
  } else if (pat == kZipf) {
    // ~5% of the neurons ever fire; the k-th most popular with probability
    // 0.6 / (k+1)^0.9: ~5 active per token, the top neuron in 60% of tokens.
    std::vector<uint32_t> perm(H);
    for (int64_t i = 0; i < H; ++i) perm[i] = static_cast<uint32_t>(i);
    for (int64_t i = H - 1; i > 0; --i) std::swap(perm[i], perm[r.below(i + 1)]);
    const int64_t nl = std::max<int64_t>(1, H / 20);
    for (int64_t k = 0; k < nl; ++k) {
      ps.live.push_back(perm[k]);
      ps.live_p.push_back(0.6 / std::pow(static_cast<double>(k + 1), 0.9));
    }
  } else if (pat == kTrained) {
    // The benchmarks' "trained" pattern (python/twell/patterns.py): 10% of the
    // neurons live at shuffled positions, the k-th firing with probability
    // min(0.65, c k^-1.2), c set for 12 active per token (fewer where H is small).
    std::vector<uint32_t> perm(H);
    for (int64_t i = 0; i < H; ++i) perm[i] = static_cast<uint32_t>(i);
    for (int64_t i = H - 1; i > 0; --i) std::swap(perm[i], perm[r.below(i + 1)]);
    const int64_t nl = std::max<int64_t>(1, H / 10);
    auto total = [&](double c) {
      double t = 0;
      for (int64_t k = 0; k < nl; ++k) t += std::min(0.65, c * std::pow(static_cast<double>(k + 1), -1.2));
      return t;
    };
    double lo = 0, hi = 1e6;
    for (int it = 0; it < 200; ++it) (total(0.5 * (lo + hi)) < 12.0 ? lo : hi) = 0.5 * (lo + hi);
    for (int64_t k = 0; k < nl; ++k) {
      ps.live.push_back(perm[k]);
      ps.live_p.push_back(std::min(0.65, hi * std::pow(static_cast<double>(k + 1), -1.2)));
    }
  }
  return ps;
}

// The active entries of one row (sorted, unique) and its kind.
RowKind gen_row(int pat, int64_t m, int64_t H, const PatternState& ps, Rng& r, std::vector<Entry>& e) {
  e.clear();
  switch (pat) {
    case kU05: add_uniform(e, H, 0.005, r); break;
    case kU2: add_uniform(e, H, 0.02, r); break;
    case kSkew: {
      // log-normal active count, median ~20, mean ~33, a heavy tail
      const double n = std::exp(std::log(20.0) + 1.0 * r.normal());
      const int64_t cnt = std::min<int64_t>(H, static_cast<int64_t>(std::llround(n)));
      if (cnt > H / 2) {
        std::vector<uint8_t> off(H, 0);
        int64_t left = H - cnt;
        while (left > 0) {
          const uint64_t c = r.below(H);
          if (!off[c]) off[c] = 1, --left;
        }
        for (int64_t c = 0; c < H; ++c)
          if (!off[c]) e.push_back({static_cast<uint32_t>(c), rand_gate(r)});
      } else {
        for (int64_t i = 0; i < cnt; ++i) e.push_back({static_cast<uint32_t>(r.below(H)), rand_gate(r)});
        sort_unique(e);
      }
      break;
    }
    case kHot:
      add_uniform(e, H, 0.005, r);
      for (uint32_t c : ps.hot)
        if (r.uniform() < 0.8) e.push_back({c, rand_gate(r)});
      sort_unique(e);
      break;
    case kZipf:
    case kTrained:
      for (size_t k = 0; k < ps.live.size(); ++k)
        if (r.uniform() < ps.live_p[k]) e.push_back({ps.live[k], rand_gate(r)});
      sort_unique(e);
      break;
    case kEdge: {
      const int kind = static_cast<int>(m % 6);
      if (kind == 0) return kZero;
      if (kind == 1) {
        for (int64_t c = 0; c < H; ++c) e.push_back({static_cast<uint32_t>(c), rand_gate(r)});
        return kDense;
      }
      add_uniform(e, H, 0.02, r);
      if (kind == 2) return kBigCountFull;
      if (kind == 3) return kBigCountFew;
      if (kind == 4) return kBadColumns;
      return kNormal;
    }
    default: break;
  }
  return kNormal;
}

// ---------------------------------------------------------------- host encoder
struct Sparse {
  int64_t M = 0, H = 0;
  int slots = 32;
  int64_t tiles = 0, row_words = 0;
  std::vector<uint32_t> packed;
  std::vector<uint8_t> flags;
  std::vector<u64> count_sum;  // per row: sum of the count words
  std::vector<uint32_t> stored_valid;  // per row: stored entries a consumer uses
  int64_t n_flagged = 0;
  u64 max_row_count = 0;
  u64 active_unflagged = 0;  // stored valid entries of unflagged rows
  double avg_active = 0;
};

// Encodes row m (entries sorted) into its packed words; returns the flag.
uint8_t encode_row(Sparse& s, int64_t m, const std::vector<Entry>& e, RowKind kind, Rng& r) {
  uint32_t* row = s.packed.data() + m * s.row_words;
  std::fill(row, row + s.row_words, 0u);
  const int cap = s.slots - 1;
  bool over = false;
  size_t i = 0;
  for (int64_t t = 0; t < s.tiles; ++t) {
    uint32_t* tw = row + t * s.slots;
    const uint32_t lo = static_cast<uint32_t>(t * 256), hi = lo + 256;
    uint32_t n = 0;
    while (i < e.size() && e[i].col < hi) {
      if (static_cast<int>(n) < cap) tw[1 + n] = (static_cast<uint32_t>(e[i].g) << 16) | (e[i].col - lo);
      ++n;
      ++i;
    }
    tw[0] = n;
    if (static_cast<int>(n) > cap) over = true;
  }
  const int64_t last = s.tiles - 1;
  const uint32_t last_width = static_cast<uint32_t>(s.H - last * 256);
  if (kind == kBigCountFull) {
    // Tile 0 full (slots-1 stored entries) but its count word says 1000 + slots:
    // an overflow the producer did not flag. Only the stored entries count.
    uint32_t* tw = row;
    const uint32_t w0 = static_cast<uint32_t>(std::min<int64_t>(256, s.H));
    std::vector<uint32_t> cols;
    std::vector<uint8_t> used(w0, 0);
    const int want = std::min<int>(cap, static_cast<int>(w0));
    while (static_cast<int>(cols.size()) < want) {
      const uint32_t c = static_cast<uint32_t>(r.below(w0));
      if (!used[c]) used[c] = 1, cols.push_back(c);
    }
    std::sort(cols.begin(), cols.end());
    for (int k = 0; k < s.slots - 1; ++k)
      tw[1 + k] = k < want ? ((static_cast<uint32_t>(rand_gate(r)) << 16) | cols[k]) : 0u;
    tw[0] = 1000u + static_cast<uint32_t>(s.slots);
    over = false;  // deliberately not flagged
  } else if (kind == kBigCountFew) {
    // Tile 0: 3 entries, then zero words, count word 200 (> capacity for every
    // slots value): a consumer reads min(200, slots-1) words, the zero words
    // decode to (column 0, value +0) and contribute nothing.
    uint32_t* tw = row;
    const uint32_t w0 = static_cast<uint32_t>(std::min<int64_t>(256, s.H));
    for (int k = 1; k < s.slots; ++k) tw[k] = 0;
    const uint32_t c0 = w0 / 4, c1 = w0 / 2, c2 = w0 - 1;
    tw[1] = (static_cast<uint32_t>(rand_gate(r)) << 16) | c0;
    tw[2] = (static_cast<uint32_t>(rand_gate(r)) << 16) | c1;
    tw[3] = (static_cast<uint32_t>(rand_gate(r)) << 16) | c2;
    tw[0] = 200u;
    over = false;
    for (int64_t t = 1; t < s.tiles; ++t)
      if (static_cast<int>(row[t * s.slots]) > cap) over = true;
  } else if (kind == kBadColumns) {
    // Entries outside their tile (column >= 256) or outside H (last tile
    // partial): stored after the valid ones (ascending order kept), ignored.
    uint32_t* tw = row + last * s.slots;
    uint32_t n = tw[0];
    if (static_cast<int>(n) + 2 <= cap) {
      if (last_width < 256) tw[1 + n++] = (static_cast<uint32_t>(rand_gate(r)) << 16) | last_width;
      tw[1 + n++] = (static_cast<uint32_t>(rand_gate(r)) << 16) | 0x1234u;
      tw[0] = n;
    }
    uint32_t* t0 = row;  // and one at the end of tile 0
    uint32_t n0 = t0[0];
    if (static_cast<int>(n0) + 1 <= cap) {
      t0[1 + n0++] = (static_cast<uint32_t>(rand_gate(r)) << 16) | 0xFFFFu;
      t0[0] = n0;
    }
  }
  return over ? 1 : 0;
}

// The stored entries a correct consumer uses for row m: (global column, g).
void stored_entries(const Sparse& s, int64_t m, std::vector<std::pair<uint32_t, float>>& out) {
  out.clear();
  const uint32_t* row = s.packed.data() + m * s.row_words;
  for (int64_t t = 0; t < s.tiles; ++t) {
    const uint32_t* tw = row + t * s.slots;
    const uint32_t n = std::min<uint32_t>(tw[0], static_cast<uint32_t>(s.slots - 1));
    for (uint32_t k = 0; k < n; ++k) {
      const uint32_t w = tw[1 + k];
      const uint32_t col = w & 0xFFFFu;
      const int64_t j = t * 256 + col;
      if (col >= 256 || j >= s.H) continue;
      out.push_back({static_cast<uint32_t>(j), bf16_bits_to_float(static_cast<uint16_t>(w >> 16))});
    }
  }
}

Sparse make_sparse(int pat, int64_t M, int64_t H, int slots, uint64_t seed) {
  Sparse s;
  s.M = M;
  s.H = H;
  s.slots = slots;
  s.tiles = (H + 255) / 256;
  s.row_words = s.tiles * slots;
  s.packed.assign(static_cast<size_t>(M * s.row_words), 0u);
  s.flags.assign(static_cast<size_t>(M), 0);
  s.count_sum.assign(static_cast<size_t>(M), 0);
  s.stored_valid.assign(static_cast<size_t>(M), 0);
  Rng r0(seed);
  const PatternState ps = make_pattern_state(pat, H, r0);
  const unsigned nt = n_threads();
  const int64_t per = (M + nt - 1) / nt;
  std::vector<std::thread> th;
  for (unsigned ti = 0; ti < nt; ++ti) {
    const int64_t a = ti * per, b = std::min(M, a + per);
    if (a >= b) break;
    th.emplace_back([&, a, b, ti]() {
      Rng r(hash2(seed, 1000 + ti));
      std::vector<Entry> e;
      std::vector<std::pair<uint32_t, float>> st;
      for (int64_t m = a; m < b; ++m) {
        const RowKind kind = gen_row(pat, m, H, ps, r, e);
        s.flags[m] = encode_row(s, m, e, kind, r);
        u64 cs = 0;
        for (int64_t t = 0; t < s.tiles; ++t) cs += s.packed[m * s.row_words + t * slots];
        s.count_sum[m] = cs;
        stored_entries(s, m, st);
        s.stored_valid[m] = static_cast<uint32_t>(st.size());
      }
    });
  }
  for (auto& t : th) t.join();
  double tot = 0;
  for (int64_t m = 0; m < M; ++m) {
    s.max_row_count = std::max(s.max_row_count, s.count_sum[m]);
    if (s.flags[m]) {
      ++s.n_flagged;
    } else {
      s.active_unflagged += s.stored_valid[m];
    }
    tot += s.stored_valid[m];
  }
  s.avg_active = tot / static_cast<double>(M);
  return s;
}

// ---------------------------------------------------------------- problem
struct Weights {
  int64_t D = 0, H = 0, ldw = 0;
  std::vector<uint16_t> wu, wd;
  bf16* d_wu = nullptr;
  bf16* d_wd = nullptr;
};

struct Inputs {
  int64_t M = 0, ldx = 0, ldy = 0;
  std::vector<uint16_t> x;
  bf16* d_x = nullptr;
};

// float64 reference for the listed rows (each row's D outputs).
void reference(const Weights& W, const Inputs& X, const Sparse& s, bool gated, const std::vector<int64_t>& rows,
               std::vector<double>& ref) {
  const int64_t D = W.D;
  ref.assign(rows.size() * D, 0.0);
  parallel_for(static_cast<int64_t>(rows.size()), [&](int64_t a, int64_t b) {
    std::vector<std::pair<uint32_t, float>> st;
    std::vector<double> xr(D);
    for (int64_t i = a; i < b; ++i) {
      const int64_t m = rows[i];
      stored_entries(s, m, st);
      for (int64_t k = 0; k < D; ++k) xr[k] = bf16_bits_to_float(X.x[m * X.ldx + k]);
      double* yr = ref.data() + i * D;
      for (const auto& en : st) {
        double h = en.second;
        if (gated) {
          const uint16_t* wu = W.wu.data() + static_cast<int64_t>(en.first) * W.ldw;
          double u = 0;
          for (int64_t k = 0; k < D; ++k) u += xr[k] * static_cast<double>(bf16_bits_to_float(wu[k]));
          h *= u;
        }
        const uint16_t* wd = W.wd.data() + static_cast<int64_t>(en.first) * W.ldw;
        for (int64_t k = 0; k < D; ++k) yr[k] += h * static_cast<double>(bf16_bits_to_float(wd[k]));
      }
    }
  });
}

struct Failures {
  int count = 0;
  void fail(const std::string& what) {
    ++count;
    if (count <= 60) std::printf("    FAIL: %s\n", what.c_str());
  }
};

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

struct VariantResult {
  double rel_fro = 0, max_row_rel = 0;
  bool ok = true;
};

// The decode-sized consumer's expectations (see the header comment).
struct DecodeCase {
  int cluster = 0;  // 0 = the launcher's choice
  std::vector<uint8_t> flags;  // rows with a count word > slots-1
  std::vector<u64> stats;  // every word
  std::vector<int32_t> rows;  // ascending overflowed rows
  int32_t* d_rows = nullptr;
};

DecodeCase decode_case(const Sparse& s) {
  DecodeCase dc;
  dc.flags.assign(static_cast<size_t>(s.M), 0);
  dc.stats.assign(TWELL_STATS_WORDS, 0);
  const uint32_t cap = static_cast<uint32_t>(s.slots - 1);
  for (int64_t m = 0; m < s.M; ++m) {
    u64 sum = 0;
    for (int64_t t = 0; t < s.tiles; ++t) {
      const uint32_t c = s.packed[m * s.row_words + t * s.slots];
      sum += c;
      dc.stats[TWELL_STAT_MAX_TILE_COUNT] = std::max<u64>(dc.stats[TWELL_STAT_MAX_TILE_COUNT], c);
      if (c > cap) ++dc.stats[TWELL_STAT_OVERFLOW_TILES], dc.flags[m] = 1;
    }
    dc.stats[TWELL_STAT_ACTIVE] += sum;
    dc.stats[TWELL_STAT_MAX_ROW_COUNT] = std::max(dc.stats[TWELL_STAT_MAX_ROW_COUNT], sum);
    if (dc.flags[m]) dc.rows.push_back(static_cast<int32_t>(m));
  }
  dc.stats[TWELL_STAT_ROWS] = static_cast<u64>(s.M);
  dc.stats[TWELL_STAT_OVERFLOW_ROWS] = dc.rows.size();
  dc.stats[TWELL_STAT_PATH] = TWELL_PATH_SPARSE;
  dc.stats[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
  return dc;
}

// The up-phase / sub-variant part of a label.
std::string up_name(int tb, int mma) {
  if (tb != sfd::kRowsKernel) return mma ? "mma" : "ffma";
  return mma >= kBlockFirst ? fmt("block+rows%d", mma - kBlockFirst) : fmt("rows%d", mma);
}

// The block consumer's scratch ([ceil(M / 32)] bytes), grown as needed, never freed;
// poisoned, since the consumer must not depend on its contents.
uint8_t* block_scratch(int64_t M) {
  static uint8_t* buf = nullptr;
  static int64_t have = 0;
  const int64_t need = (M + 31) / 32 + 1;
  if (need > have) {
    if (buf) CUDA_CHECK(cudaFree(buf));
    CUDA_CHECK(cudaMalloc(&buf, static_cast<size_t>(need)));
    have = need;
  }
  CUDA_CHECK(cudaMemset(buf, 0xA5, static_cast<size_t>(have)));
  return buf;
}

// One forced configuration: the library's variants, or the block-consumer experiment.
cudaError_t run_config(const twell::SparseFfnArgs& a, int tb, int cs, int mma, uint8_t* scratch, cudaStream_t stream) {
  if (tb == sfd::kRowsKernel && mma >= kBlockFirst)
    return cs == 1 ? sfx::sparse_ffn_block_then_rows(a, mma - kBlockFirst, scratch, stream) : cudaErrorInvalidValue;
  return sfd::sparse_ffn_config(a, tb, cs, mma, stream);
}

// Runs one configuration twice on `stream` and checks everything.
VariantResult run_and_check(const std::string& label, const Weights& W, const Inputs& X, const Sparse& s, bool gated,
                            int tb, int cs, int mma, const uint32_t* d_packed, const uint8_t* d_flags, bf16* d_y,
                            u64* d_stats, const std::vector<int64_t>& rows, const std::vector<double>& ref,
                            cudaStream_t stream, bool use_default, int sm_count, Failures& F,
                            const DecodeCase* dc = nullptr) {
  VariantResult vr;
  const std::vector<uint8_t>& flags = dc ? dc->flags : s.flags;
  const int64_t M = s.M, D = W.D, ldy = X.ldy;
  twell::SparseFfnArgs a;
  a.packed = d_packed;
  a.slots = s.slots;
  a.M = M;
  a.D = D;
  a.H = W.H;
  a.x = {gated ? X.d_x : nullptr, X.ldx};
  a.w_up = {gated ? W.d_wu : nullptr, W.ldw};
  a.w_down = {W.d_wd, W.ldw};
  a.y = {d_y, ldy};
  a.row_flags = d_flags;
  a.stats = d_stats;
  std::vector<uint16_t> y1(static_cast<size_t>(M * ldy)), y2(y1.size());
  std::vector<u64> st(TWELL_STATS_WORDS);
  twell::SparseFfnDecodeArgs da;
  if (dc) {
    da.packed = d_packed;
    da.slots = s.slots;
    da.M = M;
    da.D = D;
    da.H = W.H;
    da.x = a.x;
    da.w_up = a.w_up;
    da.w_down = a.w_down;
    da.y = {d_y, ldy};
    da.stats = d_stats;
    da.overflow_rows = dc->d_rows;
  }
  std::vector<int32_t> got_rows(static_cast<size_t>(M));
  for (int rep = 0; rep < 2; ++rep) {
    harness::poison_bf16(d_y, y1.size(), stream);
    CUDA_CHECK(cudaMemsetAsync(d_stats, dc ? 0xAB : 0, TWELL_STATS_WORDS * sizeof(u64), stream));
    if (dc) CUDA_CHECK(cudaMemsetAsync(dc->d_rows, 0xFF, static_cast<size_t>(M) * 4, stream));
    const cudaError_t err = dc ? (dc->cluster == 0 ? twell::sparse_ffn_decode(da, sm_count, stream)
                                                   : twell::sparse_ffn_decode_cluster(da, dc->cluster, stream))
                            : use_default ? twell::sparse_ffn(a, sm_count, stream)
                                          : run_config(a, tb, cs, mma, block_scratch(M), stream);
    if (err != cudaSuccess) {
      F.fail(fmt("%s: launch returned %s", label.c_str(), cudaGetErrorName(err)));
      vr.ok = false;
      return vr;
    }
    CUDA_CHECK(cudaMemcpyAsync(rep == 0 ? y1.data() : y2.data(), d_y, y1.size() * 2, cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaMemcpyAsync(st.data(), d_stats, TWELL_STATS_WORDS * sizeof(u64), cudaMemcpyDeviceToHost, stream));
    if (dc)
      CUDA_CHECK(
          cudaMemcpyAsync(got_rows.data(), dc->d_rows, static_cast<size_t>(M) * 4, cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    if (dc && !std::equal(dc->rows.begin(), dc->rows.end(), got_rows.begin())) {
      F.fail(fmt("%s: overflow-row list differs from the count words'", label.c_str()));
      vr.ok = false;
    }
    for (int w = 0; w < TWELL_STATS_WORDS; ++w) {
      const u64 want = dc ? dc->stats[w] : (w == TWELL_STAT_MAX_ROW_COUNT ? s.max_row_count : 0);
      if (st[w] != want) {
        F.fail(fmt("%s: stats[%d] = %llu, expected %llu", label.c_str(), w, static_cast<unsigned long long>(st[w]),
                   static_cast<unsigned long long>(want)));
        vr.ok = false;
      }
    }
  }
  if (std::memcmp(y1.data(), y2.data(), y1.size() * 2) != 0) {
    F.fail(fmt("%s: second call not bitwise identical", label.c_str()));
    vr.ok = false;
  }
  // Every row: poison kept where it must be, no NaN elsewhere.
  std::atomic<int64_t> bad_poison{0}, bad_nan{0}, first_bad{-1};
  parallel_for(M, [&](int64_t a0, int64_t b0) {
    for (int64_t m = a0; m < b0; ++m) {
      const uint16_t* yr = y1.data() + m * ldy;
      bool bp = false, bn = false;
      for (int64_t k = 0; k < ldy; ++k) {
        const bool must_poison = flags[m] || k >= D;
        if (must_poison) {
          if (yr[k] != kPoisonBf16) bp = true;
        } else if (harness::bf16_is_nan(yr[k])) {
          bn = true;
        }
      }
      if (bp) ++bad_poison, first_bad = m;
      if (bn) ++bad_nan, first_bad = m;
    }
  });
  if (bad_poison > 0) {
    F.fail(fmt("%s: %lld rows wrote where they must not (flagged row or padding), e.g. row %lld", label.c_str(),
               static_cast<long long>(bad_poison.load()), static_cast<long long>(first_bad.load())));
    vr.ok = false;
  }
  if (bad_nan > 0) {
    F.fail(fmt("%s: %lld unflagged rows hold NaN, e.g. row %lld", label.c_str(), static_cast<long long>(bad_nan.load()),
               static_cast<long long>(first_bad.load())));
    vr.ok = false;
  }
  // Checked rows against the reference.
  double num = 0, den = 0, worst = 0;
  int64_t worst_row = -1;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t m = rows[i];
    if (flags[m]) continue;
    double rn = 0, rd = 0;
    const double* rr = ref.data() + i * D;
    const uint16_t* yr = y1.data() + m * ldy;
    for (int64_t k = 0; k < D; ++k) {
      const double dv = static_cast<double>(bf16_bits_to_float(yr[k])) - rr[k];
      rn += dv * dv;
      rd += rr[k] * rr[k];
    }
    num += rn;
    den += rd;
    double rel;
    if (rd == 0) {
      rel = rn == 0 ? 0 : INFINITY;  // an all-zero row must give exact zeros
    } else {
      rel = std::sqrt(rn / rd);
    }
    if (!(rel <= worst)) worst = rel, worst_row = m;
  }
  vr.rel_fro = den > 0 ? std::sqrt(num / den) : (num == 0 ? 0 : INFINITY);
  vr.max_row_rel = worst;
  if (!(vr.rel_fro < 1e-2) || !(vr.max_row_rel < 1e-2)) {
    F.fail(fmt("%s: rel Frobenius error %.3e, worst row %lld: %.3e (tolerance 1e-2)", label.c_str(), vr.rel_fro,
               static_cast<long long>(worst_row), vr.max_row_rel));
    vr.ok = false;
  }
  return vr;
}

struct Options {
  bool small = false, tiny = false, bench = true, tests = true, variants = true;
  uint64_t seed = 0;
};

// ---------------------------------------------------------------- correctness
int run_tests(const Options& opt, int sm_count, Failures& F) {
  struct Shape {
    int64_t D, H;
    bool padded;
  };
  std::vector<Shape> shapes = {
      {2048, 5632, false}, {4096, 14336, false}, {896, 4864, true}, {1024, 2816, false}, {64, 264, true}};
  std::vector<int64_t> Ms = {1, 7, 64, 129, 300, 4096};
  std::vector<int> pats = {kU05, kU2, kSkew, kHot, kEdge, kZipf, kTrained};
  if (opt.small) {
    shapes = {{64, 264, true}, {896, 4864, true}, {2048, 5632, false}};
    Ms = {1, 7, 129};
    pats = {kU05, kU2, kSkew, kHot, kEdge, kTrained};
  }
  if (opt.tiny) {  // for racecheck / synccheck: every variant, few launches
    shapes = {{64, 264, true}, {2048, 5632, false}};
    Ms = {17};
    pats = {kHot, kEdge, kTrained};
  }
  const int slot_opts[3] = {32, 64, 128};
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int case_no = 0, n_runs = 0;
  double worst_fro = 0, worst_row = 0;
  const auto t_start = std::chrono::steady_clock::now();
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape sh = shapes[si];
    Weights W;
    W.D = sh.D;
    W.H = sh.H;
    W.ldw = sh.padded ? sh.D + 8 : sh.D;
    fill_bf16(W.wu, W.H, W.D, W.ldw, hash2(opt.seed, 11 + si), 1.0f / std::sqrt(static_cast<float>(W.D)) * 1.7f);
    fill_bf16(W.wd, W.H, W.D, W.ldw, hash2(opt.seed, 23 + si), 1.0f);
    W.d_wu = reinterpret_cast<bf16*>(harness::upload(W.wu));
    W.d_wd = reinterpret_cast<bf16*>(harness::upload(W.wd));
    const int64_t maxM = *std::max_element(Ms.begin(), Ms.end());
    Inputs X;
    X.M = maxM;
    X.ldx = sh.padded ? sh.D + 16 : sh.D;
    X.ldy = sh.padded ? sh.D + 8 : sh.D;
    fill_bf16(X.x, maxM, W.D, X.ldx, hash2(opt.seed, 37 + si), 1.0f);
    X.d_x = reinterpret_cast<bf16*>(harness::upload(X.x));
    std::printf("shape D=%lld H=%lld%s\n", static_cast<long long>(W.D), static_cast<long long>(W.H),
                sh.padded ? " (padded leading dimensions)" : "");
    for (int64_t M : Ms) {
      for (int pat : pats) {
        for (int gated = 1; gated >= 0; --gated) {
          const int slots = slot_opts[(case_no + pat) % 3];
          ++case_no;
          const Sparse s = make_sparse(pat, M, W.H, slots, hash2(opt.seed, 1000 + case_no));
          std::vector<int64_t> rows;
          if (M <= 1024) {
            for (int64_t m = 0; m < M; ++m) rows.push_back(m);
          } else {
            Rng rr(hash2(opt.seed, 5000 + case_no));
            for (int64_t m = 0; m < 64; ++m) rows.push_back(m), rows.push_back(M - 1 - m);
            for (int i = 0; i < 1024; ++i) rows.push_back(static_cast<int64_t>(rr.below(M)));
            std::sort(rows.begin(), rows.end());
            rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
          }
          std::vector<double> ref;
          reference(W, X, s, gated != 0, rows, ref);
          uint32_t* d_packed = harness::upload(s.packed);
          uint8_t* d_flags = harness::upload(s.flags);
          bf16* d_y = nullptr;
          u64* d_stats = nullptr;
          CUDA_CHECK(cudaMalloc(&d_y, static_cast<size_t>(M * X.ldy) * 2));
          CUDA_CHECK(cudaMalloc(&d_stats, TWELL_STATS_WORDS * sizeof(u64)));
          Inputs XM = X;
          XM.M = M;
          // Variants: the launcher's choice, then every tokens-per-CTA option, then
          // single-token CTAs split over clusters of 2 and 8.
          // (up phase on tensor cores and on FFMA for gated calls).
          struct V {
            int tb, cs, mma;
            bool def;
          };
          std::vector<V> vs = {{0, 0, 0, true}};
          if (opt.variants) {
            int opts[3];
            const int n = sfd::tokens_per_cta_options(W.D, opts);
            for (int i = 0; i < n; ++i) {
              vs.push_back({opts[i], 1, 1, false});
              if (gated) vs.push_back({opts[i], 1, 0, false});
            }
            twell::SparseFfnArgs probe;
            probe.D = W.D;
            if (sfd::usable_cluster(probe, 8) > 1) {
              vs.push_back({1, 2, 1, false});
              vs.push_back({1, 8, 1, false});
              if (gated) vs.push_back({1, 8, 0, false});
            }
            if (sfd::rows_supported(W.D)) {
              for (int r = 0; r < sfd::kRowsVariants; ++r) vs.push_back({sfd::kRowsKernel, 1, r, false});
              if (W.H <= sfx::kBlockMaxH)
                for (int r = 0; r < 2; ++r) vs.push_back({sfd::kRowsKernel, 1, kBlockFirst + r, false});
            }
          }
          const std::string base =
              fmt("D=%lld H=%lld M=%lld slots=%d %s %s", static_cast<long long>(W.D), static_cast<long long>(W.H),
                  static_cast<long long>(M), slots, pattern_name(pat), gated ? "gated" : "non-gated");
          double cf = 0, cr = 0;
          bool all_ok = true;
          std::string vlist;
          for (const V& v : vs) {
            int tb = v.tb, cs = v.cs, mma = v.mma;
            twell::SparseFfnArgs probe;
            probe.M = M;
            probe.D = W.D;
            probe.H = W.H;
            if (v.def) sfd::default_config(probe, sm_count, &tb, &cs, &mma);
            if (!gated && tb != sfd::kRowsKernel) mma = 0;
            const std::string label = base + fmt(" [%s tb=%d cluster=%d up=%s]", v.def ? "default" : "forced", tb, cs,
                                                 up_name(tb, mma).c_str());
            const VariantResult vr = run_and_check(label, W, XM, s, gated != 0, tb, cs, mma, d_packed, d_flags, d_y,
                                                   d_stats, rows, ref, stream, v.def, sm_count, F);
            ++n_runs;
            all_ok = all_ok && vr.ok;
            cf = std::max(cf, vr.rel_fro);
            cr = std::max(cr, vr.max_row_rel);
            vlist += fmt(" %d/%d%s", tb, cs, gated ? (mma ? "m" : "f") : "");
          }
          // The decode-sized consumer: its launcher's choice and clusters of 1, 2, 8.
          {
            twell::SparseFfnDecodeArgs probe;
            probe.packed = d_packed;
            probe.slots = slots;
            probe.M = M;
            probe.D = W.D;
            probe.H = W.H;
            probe.x = {gated ? X.d_x : nullptr, X.ldx};
            probe.w_up = {gated ? W.d_wu : nullptr, W.ldw};
            probe.w_down = {W.d_wd, W.ldw};
            probe.y = {d_y, X.ldy};
            probe.stats = d_stats;
            DecodeCase dc = decode_case(s);
            CUDA_CHECK(cudaMalloc(&dc.d_rows, static_cast<size_t>(M) * 4));
            probe.overflow_rows = dc.d_rows;
            if (twell::sparse_ffn_decode_can_run(probe)) {
              for (int dcs : {0, 1, 2, 8}) {
                dc.cluster = dcs;
                const std::string label = base + fmt(" [decode cluster=%s]", dcs ? fmt("%d", dcs).c_str() : "default");
                const VariantResult vr = run_and_check(label, W, XM, s, gated != 0, 1, 1, 0, d_packed, d_flags, d_y,
                                                       d_stats, rows, ref, stream, false, sm_count, F, &dc);
                ++n_runs;
                all_ok = all_ok && vr.ok;
                cf = std::max(cf, vr.rel_fro);
                cr = std::max(cr, vr.max_row_rel);
                vlist += fmt(" dec%d", dcs);
              }
            }
            CUDA_CHECK(cudaFree(dc.d_rows));
          }
          worst_fro = std::max(worst_fro, cf);
          worst_row = std::max(worst_row, cr);
          std::printf(
              "  %-4s %-62s avg %.1f active, %lld flagged; variants tb/cluster[m=mma,f=ffma]:%s; err fro %.2e row "
              "%.2e\n",
              all_ok ? "ok" : "FAIL", base.c_str(), s.avg_active, static_cast<long long>(s.n_flagged), vlist.c_str(),
              cf, cr);
          CUDA_CHECK(cudaFree(d_packed));
          CUDA_CHECK(cudaFree(d_flags));
          CUDA_CHECK(cudaFree(d_y));
          CUDA_CHECK(cudaFree(d_stats));
        }
      }
    }
    CUDA_CHECK(cudaFree(W.d_wu));
    CUDA_CHECK(cudaFree(W.d_wd));
    CUDA_CHECK(cudaFree(X.d_x));
  }

  // M = 65536 at the published shape, sampled rows.
  if (!opt.small && !opt.tiny) {
    Weights W;
    W.D = 2048;
    W.H = 5632;
    W.ldw = W.D;
    fill_bf16(W.wu, W.H, W.D, W.ldw, hash2(opt.seed, 71), 1.7f / std::sqrt(2048.0f));
    fill_bf16(W.wd, W.H, W.D, W.ldw, hash2(opt.seed, 73), 1.0f);
    W.d_wu = reinterpret_cast<bf16*>(harness::upload(W.wu));
    W.d_wd = reinterpret_cast<bf16*>(harness::upload(W.wd));
    Inputs X;
    X.M = 65536;
    X.ldx = X.ldy = W.D;
    fill_bf16(X.x, X.M, W.D, X.ldx, hash2(opt.seed, 79), 1.0f);
    X.d_x = reinterpret_cast<bf16*>(harness::upload(X.x));
    for (int pat : {static_cast<int>(kU05), static_cast<int>(kHot), static_cast<int>(kSkew)}) {
      ++case_no;
      const Sparse s = make_sparse(pat, X.M, W.H, 32, hash2(opt.seed, 9000 + pat));
      std::vector<int64_t> rows;
      Rng rr(hash2(opt.seed, 9100 + pat));
      for (int64_t m = 0; m < 64; ++m) rows.push_back(m), rows.push_back(X.M - 1 - m);
      for (int i = 0; i < 512; ++i) rows.push_back(static_cast<int64_t>(rr.below(X.M)));
      std::sort(rows.begin(), rows.end());
      rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
      std::vector<double> ref;
      reference(W, X, s, true, rows, ref);
      uint32_t* d_packed = harness::upload(s.packed);
      uint8_t* d_flags = harness::upload(s.flags);
      bf16* d_y = nullptr;
      u64* d_stats = nullptr;
      CUDA_CHECK(cudaMalloc(&d_y, static_cast<size_t>(X.M * X.ldy) * 2));
      CUDA_CHECK(cudaMalloc(&d_stats, TWELL_STATS_WORDS * sizeof(u64)));
      const std::string base = fmt("D=2048 H=5632 M=65536 slots=32 %s gated", pattern_name(pat));
      double cf = 0, cr = 0;
      bool ok = true;
      std::string vlist;
      int opts[3];
      const int n = sfd::tokens_per_cta_options(W.D, opts);
      std::vector<std::pair<int, int>> vs = {{0, 0}};
      for (int i = 0; i < n; ++i) vs.push_back({opts[i], 1}), vs.push_back({opts[i], 0});
      for (int r = 0; r < sfd::kRowsVariants; ++r) vs.push_back({sfd::kRowsKernel, r});
      for (int r = 0; r < 2; ++r) vs.push_back({sfd::kRowsKernel, kBlockFirst + r});
      for (auto v : vs) {
        int tb = v.first, cs = 1, mma = v.second;
        twell::SparseFfnArgs probe;
        probe.M = X.M;
        probe.D = W.D;
        probe.H = W.H;
        const bool def = tb == 0;
        if (def) sfd::default_config(probe, sm_count, &tb, &cs, &mma);
        const VariantResult vr = run_and_check(
            base + fmt(" [%s tb=%d cluster=%d up=%s]", def ? "default" : "forced", tb, cs, up_name(tb, mma).c_str()), W,
            X, s, true, tb, cs, mma, d_packed, d_flags, d_y, d_stats, rows, ref, stream, def, sm_count, F);
        ++n_runs;
        ok = ok && vr.ok;
        cf = std::max(cf, vr.rel_fro);
        cr = std::max(cr, vr.max_row_rel);
        vlist += fmt(" %d/%d%s", tb, cs, mma ? "m" : "f");
      }
      worst_fro = std::max(worst_fro, cf);
      worst_row = std::max(worst_row, cr);
      std::printf(
          "  %-4s %-62s avg %.1f active, %lld flagged; variants tb/cluster[m=mma,f=ffma]:%s; err fro %.2e row %.2e "
          "(%zu rows checked)\n",
          ok ? "ok" : "FAIL", base.c_str(), s.avg_active, static_cast<long long>(s.n_flagged), vlist.c_str(), cf, cr,
          rows.size());
      CUDA_CHECK(cudaFree(d_packed));
      CUDA_CHECK(cudaFree(d_flags));
      CUDA_CHECK(cudaFree(d_y));
      CUDA_CHECK(cudaFree(d_stats));
    }
    CUDA_CHECK(cudaFree(W.d_wu));
    CUDA_CHECK(cudaFree(W.d_wd));
    CUDA_CHECK(cudaFree(X.d_x));
  }

  // Argument validation: the launcher refuses what it cannot run.
  {
    twell::SparseFfnArgs a;
    a.M = 4;
    a.D = 20000;  // > 16384
    a.H = 256;
    a.slots = 32;
    uint32_t* dp = nullptr;
    bf16* dw = nullptr;
    CUDA_CHECK(cudaMalloc(&dp, 4096));
    CUDA_CHECK(cudaMalloc(&dw, 4096));
    a.packed = dp;
    a.w_down = {dw, a.D};
    a.y = {dw, a.D};
    auto expect_invalid = [&](const char* what, const twell::SparseFfnArgs& b) {
      const cudaError_t e = twell::sparse_ffn(b, sm_count, stream);
      if (e != cudaErrorInvalidValue)
        F.fail(fmt("argument check (%s): got %s, expected cudaErrorInvalidValue", what, cudaGetErrorName(e)));
      (void)cudaGetLastError();
    };
    expect_invalid("D > 16384", a);
    a.D = 100;
    a.w_down.ld = a.y.ld = 104;
    expect_invalid("D not a multiple of 8", a);
    a.D = 64;
    a.w_down.ld = a.y.ld = 64;
    a.slots = 48;
    expect_invalid("slots = 48", a);
    a.slots = 32;
    a.w_up = {dw, 64};  // gated without x
    expect_invalid("gated without x", a);
    a.w_up.ptr = nullptr;
    a.y.ld = 60;
    expect_invalid("ldy < D", a);
    CUDA_CHECK(cudaFree(dp));
    CUDA_CHECK(cudaFree(dw));
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf(
      "correctness: %d cases, %d checked runs (each called twice), worst rel Frobenius %.2e, worst row %.2e, %.1f s\n",
      case_no, n_runs, worst_fro, worst_row, secs);
  return 0;
}

// ---------------------------------------------------------------- benchmark
struct BenchRow {
  std::string pattern, config;
  int64_t M;
  double us, us_cold, gbs, ns_tok, avg_active;
  bool is_default;
};

void run_bench(const Options& opt, int sm_count, std::vector<BenchRow>& out) {
  const int64_t D = 2048, H = 5632;
  const int kCopies = 4;
  const int slots = 32;
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // 4 copies of the weights (random content; the benchmark does not check values).
  std::vector<uint16_t> wu, wd;
  fill_bf16(wu, H, D, D, hash2(opt.seed, 201), 0.04f);
  fill_bf16(wd, H, D, D, hash2(opt.seed, 203), 0.02f);
  bf16 *d_wu[kCopies], *d_wd[kCopies];
  for (int c = 0; c < kCopies; ++c) {
    d_wu[c] = reinterpret_cast<bf16*>(harness::upload(wu));
    d_wd[c] = reinterpret_cast<bf16*>(harness::upload(wd));
  }
  const std::vector<int64_t> Ms = {1, 16, 64, 256, 1024, 4096, 16384, 65536};
  const int64_t maxM = 65536;
  std::vector<uint16_t> xh;
  fill_bf16(xh, maxM, D, D, hash2(opt.seed, 207), 1.0f);
  bf16* d_x[kCopies];
  for (int c = 0; c < kCopies; ++c) d_x[c] = reinterpret_cast<bf16*>(harness::upload(xh));
  bf16* d_y[kCopies];
  for (int c = 0; c < kCopies; ++c) CUDA_CHECK(cudaMalloc(&d_y[c], static_cast<size_t>(maxM * D) * 2));
  harness::Timer timer;
  twell::SparseFfnArgs probe;
  probe.D = D;
  const bool clusters = sfd::usable_cluster(probe, 8) > 1;
  for (int pat :
       {static_cast<int>(kU05), static_cast<int>(kHot), static_cast<int>(kZipf), static_cast<int>(kTrained)}) {
    const Sparse sfull = make_sparse(pat, maxM, H, slots, hash2(opt.seed, 300 + pat));
    uint32_t* d_packed[kCopies];
    for (int c = 0; c < kCopies; ++c) d_packed[c] = harness::upload(sfull.packed);
    for (int64_t M : Ms) {
      // Active entries of the first M rows (no row of these patterns overflows
      // at slots = 32 in practice; flagged rows would simply be skipped).
      u64 active = 0;
      for (int64_t m = 0; m < M; ++m)
        if (!sfull.flags[m]) active += sfull.stored_valid[m];
      const double bytes = static_cast<double>(active) * 2.0 * D * 2.0;
      struct V {
        int tb, cs, mma;
        bool def;
      };
      std::vector<V> vs = {{0, 0, 0, true}};
      if (opt.variants) {
        int opts[3];
        const int n = sfd::tokens_per_cta_options(D, opts);
        for (int i = 0; i < n; ++i) vs.push_back({opts[i], 1, 1, false}), vs.push_back({opts[i], 1, 0, false});
        for (int r = 0; r < sfd::kRowsVariants; ++r) vs.push_back({sfd::kRowsKernel, 1, r, false});
        for (int r = 0; r < 2; ++r) vs.push_back({sfd::kRowsKernel, 1, kBlockFirst + r, false});
        if (M <= 1024 && clusters)
          for (int c : {2, 4, 8}) vs.push_back({1, c, 1, false});
      }
      for (const V& v : vs) {
        int tb = v.tb, cs = v.cs, mma = v.mma;
        twell::SparseFfnArgs a;
        a.slots = slots;
        a.M = M;
        a.D = D;
        a.H = H;
        a.x.ld = a.w_up.ld = a.w_down.ld = a.y.ld = D;
        a.stats = nullptr;
        a.row_flags = nullptr;
        uint8_t* scratch = block_scratch(M);
        if (v.def) sfd::default_config(a, sm_count, &tb, &cs, &mma);
        auto call = [&](int, int c) {
          a.packed = d_packed[c];
          a.x.ptr = d_x[c];
          a.w_up.ptr = d_wu[c];
          a.w_down.ptr = d_wd[c];
          a.y.ptr = d_y[c];
          CUDA_CHECK(v.def ? twell::sparse_ffn(a, sm_count, stream) : run_config(a, tb, cs, mma, scratch, stream));
        };
        // held: GPU time; idle ("cold"): a lone call, host launch overhead included
        harness::TimeOptions o{.warmup = 3, .reps = 20, .sets = kCopies, .queue = harness::Queue::kHeld};
        const double us = 1000.0 * timer.time(call, o, stream).med;
        o.queue = harness::Queue::kIdle;
        const double us_cold = M <= 1024 ? 1000.0 * timer.time(call, o, stream).med : -1.0;
        BenchRow br;
        br.pattern = pattern_name(pat);
        br.config = fmt("%s tb=%d cl=%d %s", v.def ? "default" : "forced ", tb, cs, up_name(tb, mma).c_str());
        br.M = M;
        br.us = us;
        br.us_cold = us_cold;
        br.gbs = bytes / (us * 1e-6) / 1e9;
        br.ns_tok = us * 1000.0 / static_cast<double>(M);
        br.avg_active = static_cast<double>(active) / static_cast<double>(M);
        br.is_default = v.def;
        out.push_back(br);
        std::printf(
            "  bench %-12s M=%-6lld %-26s %10.2f us (cold launch %8.2f)  %8.1f GB/s  %9.2f ns/token  (%.1f "
            "active/token)\n",
            br.pattern.c_str(), static_cast<long long>(M), br.config.c_str(), br.us, br.us_cold, br.gbs, br.ns_tok,
            br.avg_active);
        std::fflush(stdout);
      }
    }
    for (int c = 0; c < kCopies; ++c) CUDA_CHECK(cudaFree(d_packed[c]));
  }
  for (int c = 0; c < kCopies; ++c) {
    CUDA_CHECK(cudaFree(d_wu[c]));
    CUDA_CHECK(cudaFree(d_wd[c]));
    CUDA_CHECK(cudaFree(d_x[c]));
    CUDA_CHECK(cudaFree(d_y[c]));
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  opt.seed = static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--small") {
      opt.small = true;
      opt.bench = false;
    } else if (a == "--tiny") {
      opt.tiny = true;
      opt.bench = false;
    } else if (a == "--no-bench") {
      opt.bench = false;
    } else if (a == "--bench-only") {
      opt.tests = false;
    } else if (a == "--no-variants") {
      opt.variants = false;
    } else if (a == "--seed" && i + 1 < argc) {
      opt.seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--small] [--tiny] [--seed N] [--no-bench] [--bench-only] [--no-variants]\n",
                   argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  if (!harness::first_device(&prop)) return harness::kExitSkip;
  std::printf("test_sparse_ffn: seed %llu, device %s (sm_%d%d, %d SMs, L2 %d MB), %u host threads\n",
              static_cast<unsigned long long>(opt.seed), prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, n_threads());
  {
    twell::SparseFfnArgs probe;
    probe.D = 2048;
    std::printf("thread-block clusters for small M: %s\n",
                sfd::usable_cluster(probe, 8) > 1 ? "yes" : "no (one CTA per token)");
  }
  Failures F;
  if (opt.tests) run_tests(opt, prop.multiProcessorCount, F);
  std::vector<BenchRow> bench;
  if (opt.bench) run_bench(opt, prop.multiProcessorCount, bench);
  if (!bench.empty()) {
    std::printf(
        "\nsummary (D=2048 H=5632 gated, slots=32, %s, median of 20, weights/x/packed/y rotated over 4 copies;\n"
        "         us = GPU time with the call queued behind other work, cold = idle GPU incl. host launch;\n"
        "         GB/s = weight bytes touched (2*D*2 per active entry) / us)\n",
        prop.name);
    std::printf("  %-12s %8s %-26s %10s %10s %9s %11s %8s\n", "pattern", "M", "config", "us", "cold us", "GB/s",
                "ns/token", "active");
    for (const BenchRow& b : bench) {
      if (!b.is_default) continue;
      std::printf("  %-12s %8lld %-26s %10.2f %10.2f %9.1f %11.2f %8.1f\n", b.pattern.c_str(),
                  static_cast<long long>(b.M), b.config.c_str(), b.us, b.us_cold, b.gbs, b.ns_tok, b.avg_active);
    }
    // Best forced variant per (pattern, M), for tuning the launcher.
    std::printf("  best variant per (pattern, M):\n");
    for (size_t i = 0; i < bench.size();) {
      size_t j = i;
      const BenchRow* best = &bench[i];
      while (j < bench.size() && bench[j].pattern == bench[i].pattern && bench[j].M == bench[i].M) {
        if (bench[j].us < best->us) best = &bench[j];
        ++j;
      }
      std::printf("  %-12s %8lld %-26s %10.2f %10.2f %9.1f\n", best->pattern.c_str(), static_cast<long long>(best->M),
                  best->config.c_str(), best->us, best->us_cold, best->gbs);
      i = j;
    }
  }
  if (F.count == 0) {
    std::printf("ALL CHECKS PASSED (seed %llu)\n", static_cast<unsigned long long>(opt.seed));
    return harness::kExitPass;
  }
  std::printf("%d CHECK(S) FAILED (seed %llu)\n", F.count, static_cast<unsigned long long>(opt.seed));
  return harness::kExitFail;
}
