// Full-catalogue softmax cross-entropy on the CPU without the M x N logits.
//
// With z_ij = <h_i, e_j> + b_j, lse_i = log sum_j exp(z_ij), t_i the target
// and eps the label smoothing,
//     loss_i = lse_i - (1 - eps) z_{i t_i} - eps/N sum_j z_ij
//     dz_ij  = g_i (softmax_ij - (1 - eps) [j = t_i] - eps/N).
// The items are cut into one contiguous chunk per thread. A thread walks its
// chunk in tiles and the rows in blocks; each (row block, item tile) of logits
// is made by a single-threaded GEMM into a cache-sized buffer and reduced with
// ATen's vectorised exp (the forward keeps a running max and sum per row; the
// backward recomputes the block from lse). Each thread owns the rows of
// ditems / dbias of its chunk; dhidden is summed over per-thread copies.
// Extra memory: threads * (block + M * D) in the accumulation type. The
// per-row max / exp / sum run in one or two passes of loss_kernels.h, compiled
// for AVX-512, AVX2+FMA and the baseline ISA and picked by cpu_isa().
//
// With keep_logit_grad the forward instead makes the whole [M, N] block of
// logits one row block at a time (a block stays in cache from the GEMM to the
// softmax), turns it into dz_ij / g_i in place and returns it; the backward is
// then two GEMMs with g applied to the [M, D] side,
//     dhidden = g * (dz/g @ items),  ditems = (dz/g)^T @ (g * hidden),
// so a training step does three GEMMs over the catalogue instead of four.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "unirec/cpu_features.h"
#include "unirec/loss.h"

// The baseline copy passes 32-byte vectors by value without AVX: only inside this file.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace unirec {
#define UNIREC_VEC_BYTES 64
namespace loss_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#include "simd.h"
#include "loss_kernels.h"
#pragma GCC pop_options
}  // namespace loss_avx512
#undef UNIREC_VEC_BYTES
#define UNIREC_VEC_BYTES 32
namespace loss_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#include "simd.h"
#include "loss_kernels.h"
#pragma GCC pop_options
}  // namespace loss_avx2
namespace loss_base {
#include "simd.h"
#include "loss_kernels.h"
}  // namespace loss_base
#undef UNIREC_VEC_BYTES

namespace {

// The row kernels of one ISA (loss_kernels.h), chosen once per call.
template <typename T>
struct RowOps {
  T (*max)(const T*, int64_t);
  T (*sum)(const T*, int64_t);
  T (*sum_exp)(const T*, int64_t, T);
  T (*exp)(T*, int64_t, T, T, T);
  void (*scale)(T*, int64_t, T, T);
};

template <typename T>
RowOps<T> row_ops(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return {loss_avx512::row_max, loss_avx512::row_sum, loss_avx512::row_sum_exp, loss_avx512::row_exp,
              loss_avx512::row_scale};
    case CpuIsa::kAvx2:
      return {loss_avx2::row_max, loss_avx2::row_sum, loss_avx2::row_sum_exp, loss_avx2::row_exp,
              loss_avx2::row_scale};
    default:
      return {loss_base::row_max, loss_base::row_sum, loss_base::row_sum_exp, loss_base::row_exp,
              loss_base::row_scale};
  }
}

constexpr int64_t kRowBlock = 256;

struct Blocking {
  int64_t tile, nchunks, chunk;
};

Blocking blocking(int64_t M, int64_t N) {
  Blocking b;
  b.tile = 512;
  b.nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + b.tile - 1) / b.tile));
  b.chunk = (N + b.nchunks - 1) / b.nchunks;
  return b;
}

void check_targets(const at::Tensor& targets, int64_t N, int64_t ignore_index) {
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    UNIREC_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < N), "targets[", i, "] = ", t[i],
                 " is outside [0, N) with N = ", N, " and is not ignore_index (", ignore_index, ")");
  }
}

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// logits block = h_blk @ tile^T + bias_tile, written into buf [rows, len].
at::Tensor logits_block(at::Tensor& buf, const at::Tensor& h_blk, const at::Tensor& tile, const at::Tensor& bias,
                        int64_t t0, int64_t len) {
  at::Tensor z = buf.narrow(0, 0, h_blk.size(0) * len).view({h_blk.size(0), len});
  if (bias.defined()) {
    at::addmm_out(z, bias.narrow(0, t0, len).unsqueeze(0), h_blk, tile.t());
  } else {
    at::mm_out(z, h_blk, tile.t());
  }
  return z;
}

// The items of [t0, t0+len) in the accumulation type (a copy only for bf16/half).
at::Tensor tile_of(const at::Tensor& items, at::Tensor& tbuf, int64_t t0, int64_t len) {
  at::Tensor it = items.narrow(0, t0, len);
  return tbuf.defined() ? tbuf.narrow(0, 0, len).copy_(it) : it;
}

constexpr int64_t kKeepRowBlock = 64;

// The logit gradient per unit of g: rows of softmax - (1 - eps) onehot - eps/N,
// zero on ignored rows. Returns (loss, lse, that [M, N] tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_keep(const at::Tensor& h, const at::Tensor& items,
                                                        const at::Tensor& bias, const at::Tensor& targets,
                                                        int64_t ignore_index, double eps, const CeShape& s,
                                                        at::TensorOptions aopt, double lowest) {
  at::Tensor dz = at::empty({s.M, s.N}, aopt);
  const at::Tensor valid = targets.ne(ignore_index);
  at::Tensor lse = at::empty({s.M}, aopt), zt = at::empty({s.M}, aopt), zs = at::zeros({s.M}, aopt);
  const bool smooth = eps > 0.0;
  const int64_t nblocks = (s.M + kKeepRowBlock - 1) / kKeepRowBlock;
  const int64_t* tp = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "softmax_ce_fwd_keep", [&] {
    using T = scalar_t;
    const RowOps<T> ops = row_ops<T>(cpu_isa());
    T* zp = dz.data_ptr<T>();
    T *lp = lse.data_ptr<T>(), *ztp = zt.data_ptr<T>(), *zsp = zs.data_ptr<T>();
    const T low = static_cast<T>(lowest), keep = static_cast<T>(1.0 - eps);
    const T unif = static_cast<T>(eps / static_cast<double>(s.N));
    at::parallel_for(0, nblocks, 1, [&](int64_t bbegin, int64_t bend) {
      for (int64_t b = bbegin; b < bend; ++b) {
        const int64_t r0 = b * kKeepRowBlock, rows = std::min(kKeepRowBlock, s.M - r0);
        at::Tensor z = dz.narrow(0, r0, rows);
        const at::Tensor hb = h.narrow(0, r0, rows);
        if (bias.defined()) {
          at::addmm_out(z, bias.unsqueeze(0), hb, items.t());
        } else {
          at::mm_out(z, hb, items.t());
        }
        // each row, still in cache from the GEMM: its target logit (and sum), then exp in place
        // and the scaling to softmax - (1 - eps) onehot - eps/N (zero on ignored rows)
        for (int64_t i = r0; i < r0 + rows; ++i) {
          T* zr = zp + i * s.N;
          const bool v = tp[i] != ignore_index;
          const int64_t t = v ? tp[i] : 0;
          ztp[i] = zr[t];
          if (smooth) zsp[i] = ops.sum(zr, s.N);
          // A row of -inf logits keeps sum 0: shift by a finite value.
          const T m = std::max(ops.max(zr, s.N), low);
          const T sum = ops.exp(zr, s.N, m, T(1), T(0));
          lp[i] = std::log(sum) + m;
          ops.scale(zr, s.N, v ? T(1) / sum : T(0), v ? unif : T(0));
          if (v) zr[t] -= keep;
        }
      }
    });
  });
  at::Tensor l = lse - zt * (1.0 - eps);
  if (smooth) l.sub_(zs, eps / static_cast<double>(s.N));
  return {at::where(valid, l, at::zeros_like(l)), lse, dz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_ce_fwd_cpu(const at::Tensor& hidden_,
                                                                  const at::Tensor& items_,
                                                                  const at::Tensor& targets_,
                                                                  const std::optional<at::Tensor>& item_bias,
                                                                  int64_t ignore_index, double label_smoothing,
                                                                  bool keep_logit_grad) {
  // Inner ATen calls must not record autograd: the inputs are detached (the
  // guard is thread-local and does not reach the pool's threads).
  at::AutoDispatchBelowADInplaceOrView guard;
  const CeShape s = check_ce_args(hidden_, items_, targets_, item_bias, label_smoothing);
  const at::Tensor targets = targets_.contiguous();
  check_targets(targets, s.N, ignore_index);
  const auto acc = acc_type_of(hidden_);
  const auto aopt = hidden_.options().dtype(acc);
  at::Tensor loss = at::zeros({s.M}, aopt);
  at::Tensor lse = at::zeros({s.M}, aopt);
  if (s.M == 0) return {loss, lse, at::empty({0, s.N}, aopt)};
  UNIREC_CHECK(s.N > 0, "items must have at least one row for a softmax over the catalogue");
  const at::Tensor h = hidden_.detach().to(acc).contiguous();
  const at::Tensor items = items_.detach().contiguous();
  const at::Tensor bias = s.bias ? item_bias->detach().to(acc).contiguous() : at::Tensor();
  const double lowest = acc == at::kDouble ? std::numeric_limits<double>::lowest()
                                           : static_cast<double>(std::numeric_limits<float>::lowest());
  if (keep_logit_grad) {
    return fwd_keep(h, items.to(acc), bias, targets, ignore_index, label_smoothing, s, aopt, lowest);
  }
  const bool convert = items.scalar_type() != acc;
  const bool smooth = label_smoothing > 0.0;
  const Blocking bl = blocking(s.M, s.N);
  // Per chunk: running max, running sum of exp, sum of logits (for smoothing).
  at::Tensor cmax = at::full({bl.nchunks, s.M}, -std::numeric_limits<double>::infinity(), aopt);
  at::Tensor csum = at::zeros({bl.nchunks, s.M}, aopt);
  at::Tensor czs = at::zeros({bl.nchunks, s.M}, aopt);

  AT_DISPATCH_FLOATING_TYPES(acc, "softmax_ce_fwd", [&] {
    using T = scalar_t;
    const RowOps<T> ops = row_ops<T>(cpu_isa());
    const T low = static_cast<T>(lowest);
    at::parallel_for(0, bl.nchunks, 1, [&](int64_t cbegin, int64_t cend) {
      at::Tensor buf = at::empty({kRowBlock * bl.tile}, aopt);
      at::Tensor tbuf = convert ? at::empty({bl.tile, s.D}, aopt) : at::Tensor();
      for (int64_t c = cbegin; c < cend; ++c) {
        const int64_t lo = c * bl.chunk, hi = std::min(s.N, lo + bl.chunk);
        T* m_run = cmax[c].data_ptr<T>();
        T* s_run = csum[c].data_ptr<T>();
        T* zs_run = czs[c].data_ptr<T>();
        for (int64_t t0 = lo; t0 < hi; t0 += bl.tile) {
          const int64_t len = std::min(bl.tile, hi - t0);
          const at::Tensor tile = tile_of(items, tbuf, t0, len);
          for (int64_t r0 = 0; r0 < s.M; r0 += kRowBlock) {
            const int64_t rows = std::min(kRowBlock, s.M - r0);
            const T* z = logits_block(buf, h.narrow(0, r0, rows), tile, bias, t0, len).data_ptr<T>();
            for (int64_t r = 0; r < rows; ++r) {
              const T* zr = z + r * len;
              const int64_t i = r0 + r;
              if (smooth) zs_run[i] += ops.sum(zr, len);
              const T m_new = std::max(m_run[i], ops.max(zr, len));
              // A row of -inf logits so far keeps sum 0: shift by a finite value.
              const T shift = std::max(m_new, low);
              s_run[i] = s_run[i] * std::exp(m_run[i] - shift) + ops.sum_exp(zr, len, shift);
              m_run[i] = m_new;
            }
          }
        }
      }
    });
  });

  // Merge the chunks' (max, sum) pairs, then the target logits by direct dots.
  at::Tensor gmax = std::get<0>(cmax.max(0)).clamp_min(lowest);
  lse.copy_((csum * (cmax - gmax.unsqueeze(0)).exp()).sum(0).log().add_(gmax));
  at::Tensor valid = targets.ne(ignore_index);
  at::Tensor tsafe = at::where(valid, targets, at::zeros_like(targets));
  at::Tensor zt = (h * items.index_select(0, tsafe).to(acc)).sum(1);
  if (s.bias) zt.add_(bias.index_select(0, tsafe));
  at::Tensor l = lse - zt * (1.0 - label_smoothing);
  if (smooth) l.sub_(czs.sum(0), label_smoothing / static_cast<double>(s.N));
  loss.copy_(at::where(valid, l, at::zeros_like(l)));
  return {loss, lse, at::empty({0, s.N}, aopt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_ce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden_, const at::Tensor& items_, const at::Tensor& targets_,
    const std::optional<at::Tensor>& item_bias, const at::Tensor& lse_,
    const std::optional<at::Tensor>& logit_grad, int64_t ignore_index, double label_smoothing) {
  // Inner ATen calls must not record autograd: the inputs are detached (the
  // guard is thread-local and does not reach the pool's threads).
  at::AutoDispatchBelowADInplaceOrView guard;
  const CeShape s = check_ce_args(hidden_, items_, targets_, item_bias, label_smoothing);
  const auto acc = acc_type_of(hidden_);
  const auto aopt = hidden_.options().dtype(acc);
  check_dim(grad_loss, 1, "grad_loss");
  check_dim(lse_, 1, "lse");
  UNIREC_CHECK(grad_loss.size(0) == s.M && lse_.size(0) == s.M, "grad_loss and lse must have M = ", s.M,
               " entries, got ", grad_loss.size(0), " and ", lse_.size(0));
  // lse is the forward's, in its accumulation dtype: a rounded one would shift every probability.
  check_dtype(lse_, acc, "lse");
  check_same_device(grad_loss, hidden_, "grad_loss", "hidden");
  check_same_device(lse_, hidden_, "lse", "hidden");
  if (logit_grad.has_value()) check_same_device(*logit_grad, hidden_, "logit_grad", "hidden");
  const at::Tensor targets = targets_.contiguous();
  check_targets(targets, s.N, ignore_index);
  if (logit_grad.has_value()) {
    const at::Tensor& dz = *logit_grad;
    UNIREC_CHECK(dz.dim() == 2 && dz.size(0) == s.M && dz.size(1) == s.N && dz.scalar_type() == acc &&
                     dz.is_contiguous(),
                 "logit_grad must be the contiguous [M, N] = [", s.M, ", ", s.N, "] ", acc,
                 " tensor of the forward, got ", dz.scalar_type(), " ", dz.sizes());
    const at::Tensor valid = targets.ne(ignore_index);
    const at::Tensor g = at::where(valid, grad_loss.detach().to(acc), at::zeros({}, aopt)).unsqueeze(1);
    const at::Tensor items = items_.detach().to(acc);
    const at::Tensor dh = at::mm(dz, items).mul_(g);
    const at::Tensor di = at::mm(dz.t(), hidden_.detach().to(acc) * g);
    const at::Tensor db = s.bias ? at::mv(dz.t(), g.squeeze(1)) : at::zeros({s.N}, aopt);
    const auto dt = hidden_.scalar_type();
    return {dh.to(dt), di.to(dt), db.to(dt)};
  }
  at::Tensor dh_acc = at::zeros({s.M, s.D}, aopt);
  at::Tensor di_acc = at::zeros({s.N, s.D}, aopt);
  at::Tensor db_acc = at::zeros({s.N}, aopt);
  if (s.M > 0 && s.N > 0) {
    const at::Tensor h = hidden_.detach().to(acc).contiguous();
    const at::Tensor items = items_.detach().contiguous();
    const at::Tensor bias = s.bias ? item_bias->detach().to(acc).contiguous() : at::Tensor();
    const at::Tensor valid = targets.ne(ignore_index);
    // g_i = 0 on ignored rows, so their block rows vanish.
    const at::Tensor g = at::where(valid, grad_loss.detach().to(acc), at::zeros({}, aopt)).contiguous();
    const at::Tensor lse = lse_.detach().to(acc).contiguous();
    const at::Tensor gu = (g * (label_smoothing / static_cast<double>(s.N))).contiguous();
    const at::Tensor gt = (g * (1.0 - label_smoothing)).contiguous();
    const bool convert = items.scalar_type() != acc;
    const bool smooth = label_smoothing > 0.0;
    const Blocking bl = blocking(s.M, s.N);
    const int64_t* tp = targets.data_ptr<int64_t>();
    at::Tensor dh_part = at::zeros({bl.nchunks, s.M, s.D}, aopt);
    const CpuIsa isa = cpu_isa();  // once per call, not per block

    at::parallel_for(0, bl.nchunks, 1, [&](int64_t cbegin, int64_t cend) {
      at::Tensor buf = at::empty({kRowBlock * bl.tile}, aopt);
      at::Tensor tbuf = convert ? at::empty({bl.tile, s.D}, aopt) : at::Tensor();
      for (int64_t c = cbegin; c < cend; ++c) {
        const int64_t lo = c * bl.chunk, hi = std::min(s.N, lo + bl.chunk);
        at::Tensor dh = dh_part[c];
        for (int64_t t0 = lo; t0 < hi; t0 += bl.tile) {
          const int64_t len = std::min(bl.tile, hi - t0);
          const at::Tensor tile = tile_of(items, tbuf, t0, len);
          at::Tensor ditile = di_acc.narrow(0, t0, len);
          at::Tensor dbtile = db_acc.narrow(0, t0, len);
          for (int64_t r0 = 0; r0 < s.M; r0 += kRowBlock) {
            const int64_t rows = std::min(kRowBlock, s.M - r0);
            const at::Tensor hb = h.narrow(0, r0, rows);
            at::Tensor z = logits_block(buf, hb, tile, bias, t0, len);
            AT_DISPATCH_FLOATING_TYPES(acc, "softmax_ce_bwd_block", [&] {
              using T = scalar_t;
              const RowOps<T> ops = row_ops<T>(isa);
              T* zp = z.data_ptr<T>();
              const T *lp = lse.data_ptr<T>(), *gp = g.data_ptr<T>(), *gup = gu.data_ptr<T>();
              const T* gtp = gt.data_ptr<T>();
              // dz / 1 = g (softmax - (1 - eps) onehot - eps/N), one pass per row
              for (int64_t r = 0; r < rows; ++r) {
                const int64_t i = r0 + r;
                ops.exp(zp + r * len, len, lp[i], gp[i], smooth ? gup[i] : T(0));
                const int64_t t = tp[i];
                if (t >= t0 && t < t0 + len) zp[r * len + (t - t0)] -= gtp[i];
              }
            });
            dh.narrow(0, r0, rows).addmm_(z, tile);
            ditile.addmm_(z.t(), hb);
            if (s.bias) dbtile.add_(z.sum(0));
          }
        }
      }
    });
    dh_acc = dh_part.sum(0);
  }
  const auto dt = hidden_.scalar_type();
  return {dh_acc.to(dt), di_acc.to(dt), db_acc.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) {
  m.impl("softmax_ce_fwd", &softmax_ce_fwd_cpu);
  m.impl("softmax_ce_bwd", &softmax_ce_bwd_cpu);
}

}  // namespace unirec
