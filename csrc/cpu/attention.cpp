// Jagged (packed) multi-head attention on the CPU, flash-attention style.
//
// Work items are (sequence, head) pairs, handed out longest first from an
// atomic counter (lengths vary a lot, a static split would leave a core idle).
// Each item copies its rows into contiguous float32 (float64 for float64
// inputs) buffers with the head dim zero-padded to 16/32/64/128/256, then runs
// the tiled kernels of attention_kernels.h: 64x64 score tiles, online softmax,
// tiles past the causal / target limit skipped, never more than one tile of
// scores alive. The backward recomputes the probabilities from the saved
// log-sum-exp (softmax) or from the scores (silu).
//
// The kernels are compiled three times, for AVX-512 (16-float vectors), for
// AVX2+FMA (8-float) and for the baseline ISA, and picked at run time by
// cpu_isa() (UNIREC_CPU_ISA caps it, so that each variant can be tested).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "unirec/attention.h"
#include "unirec/cpu_features.h"

// The baseline copy passes 32-byte vectors by value without AVX: only inside this file.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wunused-local-typedefs"

namespace unirec {
#define UNIREC_VEC_BYTES 64
namespace attn_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#include "simd.h"
#include "attention_kernels.h"
#pragma GCC pop_options
}  // namespace attn_avx512
#undef UNIREC_VEC_BYTES
#define UNIREC_VEC_BYTES 32
namespace attn_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#include "simd.h"
#include "attention_kernels.h"
#pragma GCC pop_options
}  // namespace attn_avx2
namespace attn_base {
#include "simd.h"
#include "attention_kernels.h"
}  // namespace attn_base
#undef UNIREC_VEC_BYTES

namespace {

constexpr int kTile = attn_base::kBK;
constexpr double kSerialWork = 64.0 * 64.0 * 4;  // sum over items of L^2 below which one thread does all
static_assert(attn_base::kBK == attn_base::kBQ, "copy-in pads to one tile size");

// Head dims the kernels are compiled for; 48 and 96 are common (dim 96 or 192
// over 2 heads) and would waste a third of the work padded to 64 / 128.
int padded_dim(int64_t D) {
  for (int p : {16, 32, 48, 64, 96, 128}) if (D <= p) return p;
  return 256;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Offsets and num_targets as host vectors, with every value the kernels trust checked.
struct Seqs {
  std::vector<int64_t> off;
  std::vector<int64_t> t0;  // first target token of each sequence
  int64_t maxlen = 0;
};

Seqs check_values(const at::Tensor& offsets, const std::optional<at::Tensor>& num_targets, int64_t total,
                  int64_t max_seqlen) {
  Seqs s;
  const auto off_c = offsets.contiguous();
  const int64_t* off = off_c.data_ptr<int64_t>();
  const int64_t B = offsets.size(0) - 1;
  s.off.assign(off, off + B + 1);
  UNIREC_CHECK(off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  UNIREC_CHECK(off[B] == total, "offsets[-1] must equal q.shape[0] (", total, "), got ", off[B]);
  s.t0.resize(B);
  const int64_t* nt = nullptr;
  at::Tensor nt_c;
  if (num_targets.has_value()) {
    nt_c = num_targets->contiguous();
    nt = nt_c.data_ptr<int64_t>();
  }
  // Order first: an entry out of range shows as a decrease, not as one very long sequence.
  for (int64_t b = 0; b < B; ++b) {
    UNIREC_CHECK(off[b + 1] >= off[b], "offsets must not decrease, but offsets[", b + 1, "] = ", off[b + 1],
                 " < offsets[", b, "] = ", off[b]);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = off[b + 1] - off[b];
    UNIREC_CHECK(L <= max_seqlen, "offsets give sequence ", b, " ", L, " tokens, more than max_seqlen = ",
                 max_seqlen);
    const int64_t n = nt ? nt[b] : 0;
    UNIREC_CHECK(n >= 0 && n <= L, "num_targets[", b, "] = ", n, " must be in [0, ", L,
                 "] (the length of sequence ", b, ")");
    s.t0[b] = L - n;
    s.maxlen = std::max(s.maxlen, L);
  }
  return s;
}

// (sequence, head) items, longest sequences first, handed out dynamically.
template <typename F>
void for_each_item(const Seqs& s, int64_t H, const F& fn) {
  const int64_t B = static_cast<int64_t>(s.t0.size());
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return s.off[a + 1] - s.off[a] > s.off[b + 1] - s.off[b];
  });
  const int64_t n = B * H;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    typename F::Scratch_ scratch;
    for (int64_t w; (w = next.fetch_add(1)) < n;) {
      const int64_t b = order[w / H], h = w % H;
      if (s.off[b + 1] > s.off[b]) fn(scratch, b, h);
    }
  };
  // Tiny problems run on the calling thread: waking a thread team costs more.
  double work = 0;
  for (int64_t b = 0; b < B; ++b) work += static_cast<double>(s.off[b + 1] - s.off[b]) * (s.off[b + 1] - s.off[b]);
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  if (nthreads == 1 || work * H < kSerialWork) {
    worker(0, 1);
  } else {
    at::parallel_for(0, nthreads, 1, worker);
  }
}

template <typename T>
void run_fwd(CpuIsa isa, int DP, const attn_base::SeqArgs<T>& a, const T* Qs, const T* Ktb, const T* V, T* O,
             T* lse, T* S) {
  if (isa == CpuIsa::kAvx512) {
    attn_avx512::SeqArgs<T> b{a.L, a.t0, a.causal, a.silu, a.inv_n, a.rb};
    attn_avx512::fwd(DP, b, Qs, Ktb, V, O, lse, S);
  } else if (isa == CpuIsa::kAvx2) {
    attn_avx2::SeqArgs<T> b{a.L, a.t0, a.causal, a.silu, a.inv_n, a.rb};
    attn_avx2::fwd(DP, b, Qs, Ktb, V, O, lse, S);
  } else {
    attn_base::fwd(DP, a, Qs, Ktb, V, O, lse, S);
  }
}

template <typename T>
void run_bwd(CpuIsa isa, int DP, const attn_base::SeqArgs<T>& a, const T* Qs, const T* K, const T* Ktb,
             const T* Vtb, const T* dO, const T* lse, const T* delta, T* dQ, T* dK, T* dV, T* drb, T* S, T* dP) {
  if (isa == CpuIsa::kAvx512) {
    attn_avx512::SeqArgs<T> b{a.L, a.t0, a.causal, a.silu, a.inv_n, a.rb};
    attn_avx512::bwd(DP, b, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);
  } else if (isa == CpuIsa::kAvx2) {
    attn_avx2::SeqArgs<T> b{a.L, a.t0, a.causal, a.silu, a.inv_n, a.rb};
    attn_avx2::bwd(DP, b, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);
  } else {
    attn_base::bwd(DP, a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);
  }
}

// rows [start, start+L) of head h of x [total, H, D] -> dst [Lp][DP] (times mul), zero padded.
template <typename scalar_t, typename T>
void load_rows(const scalar_t* x, int64_t start, int64_t L, int64_t Lp, int64_t h, int64_t H, int64_t D, int DP,
               T mul, T* dst) {
  std::fill(dst, dst + Lp * DP, T(0));
  for (int64_t i = 0; i < L; ++i) {
    const scalar_t* src = x + ((start + i) * H + h) * D;
    T* o = dst + i * DP;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(src[d]) * mul;
  }
}

// [Lp][DP] -> [Lp/tile][DP][tile]
template <typename T>
void tile_transpose(const T* src, int64_t Lp, int DP, T* dst) {
  for (int64_t t0 = 0; t0 < Lp; t0 += kTile)
    for (int d = 0; d < DP; ++d)
      for (int j = 0; j < kTile; ++j) dst[t0 * DP + d * kTile + j] = src[(t0 + j) * DP + d];
}

template <typename scalar_t, typename T>
void store_rows(const T* src, int64_t start, int64_t L, int64_t h, int64_t H, int64_t D, int DP, T mul,
                scalar_t* x) {
  for (int64_t i = 0; i < L; ++i) {
    scalar_t* o = x + ((start + i) * H + h) * D;
    const T* s = src + i * DP;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(s[d] * mul);
  }
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const at::Tensor& offsets,
                                                            int64_t max_seqlen, bool causal,
                                                            const std::optional<at::Tensor>& num_targets,
                                                            c10::string_view activation_,
                                                            const std::optional<at::Tensor>& rel_bias, double scale) {
  const bool silu = parse_activation(std::string(activation_));
  const AttnShape sh = check_attention_args(q_, k_, v_, offsets, max_seqlen, num_targets, rel_bias);
  const Seqs seqs = check_values(offsets, num_targets, sh.total, max_seqlen);
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const bool dbl = q.scalar_type() == at::kDouble;
  auto out = at::empty_like(q);
  auto lse = silu ? q.new_empty({0}, q.options().dtype(dbl ? at::kDouble : at::kFloat))
                  : q.new_empty({sh.total, sh.H}, q.options().dtype(dbl ? at::kDouble : at::kFloat));
  at::Tensor rb;
  if (rel_bias.has_value()) rb = rel_bias->contiguous();
  const int DP = padded_dim(sh.D);
  const CpuIsa isa = cpu_isa();  // once per call, not per (sequence, head)
  const int64_t H = sh.H, D = sh.D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "jagged_attention_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    T* lsep = silu ? nullptr : lse.data_ptr<T>();
    const scalar_t* rbp = rb.defined() ? rb.data_ptr<scalar_t>() : nullptr;
    const int64_t Lmax = round_up(std::max<int64_t>(seqs.maxlen, 1), kTile);
    struct Scratch {
      std::vector<T> Qs, Ktmp, Ktb, V, O, lse, S, rb;
    };
    struct Fn {
      using Scratch_ = Scratch;
      const std::function<void(Scratch&, int64_t, int64_t)>* f;
      void operator()(Scratch& s, int64_t b, int64_t h) const { (*f)(s, b, h); }
    };
    std::function<void(Scratch&, int64_t, int64_t)> body = [&](Scratch& s, int64_t b, int64_t h) {
      if (s.Qs.empty()) {
        s.Qs.resize(Lmax * DP); s.Ktmp.resize(Lmax * DP); s.Ktb.resize(Lmax * DP); s.V.resize(Lmax * DP);
        s.O.resize(Lmax * DP); s.lse.resize(Lmax); s.S.resize(kTile * kTile);
        // Sized by max_seqlen only when a rel_bias that long exists: alone it may exceed any length by far.
        if (rbp) s.rb.resize(max_seqlen);
      }
      const int64_t start = seqs.off[b], L = seqs.off[b + 1] - start, Lp = round_up(L, kTile);
      load_rows(qp, start, L, Lp, h, H, D, DP, static_cast<T>(scale), s.Qs.data());
      load_rows(kp, start, L, Lp, h, H, D, DP, T(1), s.Ktmp.data());
      tile_transpose(s.Ktmp.data(), Lp, DP, s.Ktb.data());
      load_rows(vp, start, L, Lp, h, H, D, DP, T(1), s.V.data());
      if (rbp) for (int64_t r = 0; r < max_seqlen; ++r) s.rb[r] = static_cast<T>(rbp[h * max_seqlen + r]);
      attn_base::SeqArgs<T> a{static_cast<int>(L), static_cast<int>(seqs.t0[b]), causal, silu,
                              static_cast<T>(1.0 / std::max<int64_t>(max_seqlen, 1)), rbp ? s.rb.data() : nullptr};
      run_fwd<T>(isa, DP, a, s.Qs.data(), s.Ktb.data(), s.V.data(), s.O.data(), s.lse.data(), s.S.data());
      store_rows(s.O.data(), start, L, h, H, D, DP, T(1), op);
      if (lsep) for (int64_t i = 0; i < L; ++i) lsep[(start + i) * H + h] = s.lse[i];
    };
    for_each_item(seqs, H, Fn{&body});
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jagged_attention_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& offsets, int64_t max_seqlen, bool causal,
    const std::optional<at::Tensor>& num_targets, c10::string_view activation_,
    const std::optional<at::Tensor>& rel_bias, double scale) {
  const bool silu = parse_activation(std::string(activation_));
  const AttnShape sh = check_attention_args(q_, k_, v_, offsets, max_seqlen, num_targets, rel_bias);
  UNIREC_CHECK(grad_out_.sizes() == q_.sizes(), "grad_out must have q's shape ", q_.sizes(), ", got ",
               grad_out_.sizes());
  if (!silu) {  // silu recomputes from q, k, v and reads neither
    UNIREC_CHECK(out_.sizes() == q_.sizes(), "out must have q's shape ", q_.sizes(), ", got ", out_.sizes());
    UNIREC_CHECK(out_.scalar_type() == q_.scalar_type(), "out must have q's dtype ", q_.scalar_type(), ", got ",
                 out_.scalar_type());
    check_same_device(out_, q_, "out", "q");
    check_same_device(lse_, q_, "lse", "q");
  }
  check_same_device(grad_out_, q_, "grad_out", "q");
  const Seqs seqs = check_values(offsets, num_targets, sh.total, max_seqlen);
  const auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto g = grad_out_.contiguous().to(q.scalar_type());
  const bool dbl = q.scalar_type() == at::kDouble;
  at::Tensor o, lse;
  if (!silu) {
    o = out_.contiguous();
    // The forward's: a rounded log-sum-exp would shift every probability.
    check_dtype(lse_, dbl ? at::kDouble : at::kFloat, "lse");
    lse = lse_.contiguous();
    UNIREC_CHECK(lse.dim() == 2 && lse.size(0) == sh.total && lse.size(1) == sh.H, "lse must be [total, H] = [",
                 sh.total, ", ", sh.H, "], got ", lse.sizes());
  }
  auto dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  at::Tensor rb, drb;
  if (rel_bias.has_value()) rb = rel_bias->contiguous();
  const int DP = padded_dim(sh.D);
  const CpuIsa isa = cpu_isa();  // once per call, not per (sequence, head)
  const int64_t H = sh.H, D = sh.D;
  const int nthreads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "jagged_attention_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* opp = silu ? nullptr : o.data_ptr<scalar_t>();
    const T* lsep = silu ? nullptr : lse.data_ptr<T>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    const scalar_t* rbp = rb.defined() ? rb.data_ptr<scalar_t>() : nullptr;
    // per-thread d rel_bias partial sums [threads][H][max_seqlen]
    std::vector<T> drb_parts(rbp ? static_cast<size_t>(nthreads) * H * max_seqlen : 0, T(0));
    const int64_t Lmax = round_up(std::max<int64_t>(seqs.maxlen, 1), kTile);
    struct Scratch {
      std::vector<T> Qs, K, Ktb, Vt, Vtb, dO, lse, delta, dQ, dK, dV, S, dP, rb;
    };
    std::function<void(Scratch&, int64_t, int64_t)> body = [&](Scratch& s, int64_t b, int64_t h) {
      if (s.Qs.empty()) {
        for (auto* vec : {&s.Qs, &s.K, &s.Ktb, &s.Vt, &s.Vtb, &s.dO, &s.dQ, &s.dK, &s.dV}) vec->resize(Lmax * DP);
        s.lse.resize(Lmax); s.delta.resize(Lmax);
        s.S.resize(kTile * kTile); s.dP.resize(kTile * kTile);
        if (rbp) s.rb.resize(max_seqlen);
      }
      const int64_t start = seqs.off[b], L = seqs.off[b + 1] - start, Lp = round_up(L, kTile);
      load_rows(qp, start, L, Lp, h, H, D, DP, static_cast<T>(scale), s.Qs.data());
      load_rows(kp, start, L, Lp, h, H, D, DP, T(1), s.K.data());
      tile_transpose(s.K.data(), Lp, DP, s.Ktb.data());
      load_rows(vp, start, L, Lp, h, H, D, DP, T(1), s.Vt.data());
      tile_transpose(s.Vt.data(), Lp, DP, s.Vtb.data());
      load_rows(gp, start, L, Lp, h, H, D, DP, T(1), s.dO.data());
      if (!silu) {
        for (int64_t i = 0; i < L; ++i) {
          const scalar_t* orow = opp + ((start + i) * H + h) * D;
          const T* grow = s.dO.data() + i * DP;
          T acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += grow[d] * static_cast<T>(orow[d]);
          s.delta[i] = acc;
          s.lse[i] = lsep[(start + i) * H + h];
        }
      }
      std::fill(s.dQ.begin(), s.dQ.begin() + Lp * DP, T(0));
      std::fill(s.dK.begin(), s.dK.begin() + Lp * DP, T(0));
      std::fill(s.dV.begin(), s.dV.begin() + Lp * DP, T(0));
      T* drbp = nullptr;
      if (rbp) {
        for (int64_t r = 0; r < max_seqlen; ++r) s.rb[r] = static_cast<T>(rbp[h * max_seqlen + r]);
        drbp = drb_parts.data() + (static_cast<int64_t>(at::get_thread_num()) * H + h) * max_seqlen;
      }
      attn_base::SeqArgs<T> a{static_cast<int>(L), static_cast<int>(seqs.t0[b]), causal, silu,
                              static_cast<T>(1.0 / std::max<int64_t>(max_seqlen, 1)), rbp ? s.rb.data() : nullptr};
      run_bwd<T>(isa, DP, a, s.Qs.data(), s.K.data(), s.Ktb.data(), s.Vtb.data(), s.dO.data(), s.lse.data(),
                 s.delta.data(), s.dQ.data(), s.dK.data(), s.dV.data(), drbp, s.S.data(), s.dP.data());
      store_rows(s.dQ.data(), start, L, h, H, D, DP, static_cast<T>(scale), dqp);
      store_rows(s.dK.data(), start, L, h, H, D, DP, T(1), dkp);
      store_rows(s.dV.data(), start, L, h, H, D, DP, T(1), dvp);
    };
    struct Fn {
      using Scratch_ = Scratch;
      const std::function<void(Scratch&, int64_t, int64_t)>* f;
      void operator()(Scratch& s, int64_t b, int64_t h) const { (*f)(s, b, h); }
    };
    for_each_item(seqs, H, Fn{&body});
    if (rbp) {
      auto acc = at::zeros({H, max_seqlen}, q.options().dtype(dbl ? at::kDouble : at::kFloat));
      T* ap = acc.data_ptr<T>();
      for (int t = 0; t < nthreads; ++t)
        for (int64_t r = 0; r < H * max_seqlen; ++r) ap[r] += drb_parts[static_cast<size_t>(t) * H * max_seqlen + r];
      drb = acc.to(q.scalar_type());
    }
  });
  // An empty rel_bias ([H, 0]) has no data to read: its gradient is as empty, not missing.
  if (!drb.defined()) drb = rel_bias.has_value() ? at::zeros_like(*rel_bias) : q.new_empty({0});
  return {dq, dk, dv, drb};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) {
  m.impl("jagged_attention_fwd", &jagged_attention_fwd_cpu);
  m.impl("jagged_attention_bwd", &jagged_attention_bwd_cpu);
}

}  // namespace unirec
