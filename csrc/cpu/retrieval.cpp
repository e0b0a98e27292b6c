// Top-k retrieval over the whole catalogue on the CPU, never storing B x N.
//
// The items are cut into one contiguous chunk per thread. A thread scores its
// chunk tile by tile with a single-threaded GEMM (at::mm inside
// at::parallel_for runs MKL/oneDNN on the calling thread) into a [B, tile]
// buffer, then keeps, per query, a bounded heap of its k best (value, index).
// Items arrive in increasing index order, so a newcomer equal to the heap's
// worst never displaces it: that is exactly "ties go to the smaller index".
// Excluded ids are marked NaN in the tile (NaN compares false, so it is
// never admitted). The chunks' heaps are merged per query at the end.
// Extra memory: threads * B * (k + tile) scores, the sorted exclusion copy,
// and the float copy of queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "unirec/retrieval.h"

namespace unirec {
namespace {

template <typename acc_t>
struct Cand {
  acc_t v;
  int64_t i;
};

// "a ranks before b": larger score, then smaller index.
template <typename acc_t>
inline bool better(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// Sorted copy of each query's exclusion list (so a tile finds its ids by
// binary search), after checking offsets and ids.
std::vector<int64_t> sorted_exclusions(const at::Tensor& offsets, const at::Tensor& ids, int64_t B, int64_t N) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t nnz = ids.numel();
  UNIREC_CHECK(off[0] == 0, "exclude_offsets[0] must be 0, got ", off[0]);
  UNIREC_CHECK(off[B] == nnz, "exclude_offsets[-1] must equal len(exclude_indices) (", nnz, "), got ", off[B]);
  for (int64_t b = 0; b < B; ++b) {
    UNIREC_CHECK(off[b + 1] >= off[b], "exclude_offsets must not decrease, but exclude_offsets[", b + 1, "] = ",
                 off[b + 1], " < exclude_offsets[", b, "] = ", off[b]);
  }
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < nnz; ++p) {
    UNIREC_CHECK(id[p] >= 0 && id[p] < N, "exclude_indices[", p, "] = ", id[p], " is outside [0, N) with N = ", N);
  }
  std::vector<int64_t> sorted(id, id + nnz);
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) std::sort(sorted.begin() + off[b], sorted.begin() + off[b + 1]);
  });
  return sorted;
}

template <typename scalar_t, typename acc_t>
void topk_kernel(const at::Tensor& queries, const at::Tensor& items, const at::Tensor& bias, const int64_t* xoff,
                 const int64_t* xids, const TopkShape& s, at::Tensor& values, at::Tensor& indices) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor q = queries.detach().to(acc_type).contiguous();
  const at::Tensor bias_acc = bias.defined() ? bias.detach().to(acc_type).contiguous() : at::Tensor();
  const acc_t* bp = bias_acc.defined() ? bias_acc.data_ptr<acc_t>() : nullptr;
  const int64_t B = s.B, N = s.N, k = s.k, D = s.D;
  const int64_t kk = std::min(k, N);  // a heap never holds more than the items there are
  // Tile of items per GEMM: the score buffer B x tile stays around 1 MB.
  const int64_t tile = std::max<int64_t>(64, std::min<int64_t>(4096, (int64_t(1) << 18) / std::max<int64_t>(B, 1)));
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + tile - 1) / tile));
  const int64_t chunk = (N + nchunks - 1) / nchunks;
  std::vector<Cand<acc_t>> heaps(static_cast<size_t>(nchunks * B * kk));
  std::vector<int64_t> sizes(static_cast<size_t>(nchunks * B), 0);
  const bool convert = !std::is_same<scalar_t, acc_t>::value;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    at::Tensor buf = at::empty({B * tile}, q.options());
    at::Tensor tbuf = convert ? at::empty({tile, D}, q.options()) : at::Tensor();
    for (int64_t c = cbegin; c < cend; ++c) {
      const int64_t lo = c * chunk, hi = std::min(N, lo + chunk);
      Cand<acc_t>* H = heaps.data() + c * B * kk;
      int64_t* S = sizes.data() + c * B;
      for (int64_t t0 = lo; t0 < hi; t0 += tile) {
        const int64_t len = std::min(tile, hi - t0);
        at::Tensor it = items.narrow(0, t0, len);
        if (convert) it = tbuf.narrow(0, 0, len).copy_(it);
        at::Tensor sc = buf.narrow(0, 0, B * len).view({B, len});
        at::mm_out(sc, q, it.t());
        acc_t* scp = sc.data_ptr<acc_t>();
        for (int64_t b = 0; b < B; ++b) {
          acc_t* row = scp + b * len;
          if (bp) {
            for (int64_t j = 0; j < len; ++j) row[j] += bp[t0 + j];
          }
          if (xids) {
            const int64_t* xb = xids + xoff[b];
            const int64_t* xe = xids + xoff[b + 1];
            for (const int64_t* x = std::lower_bound(xb, xe, t0); x != xe && *x < t0 + len; ++x) row[*x - t0] = nan;
          }
          Cand<acc_t>* h = H + b * kk;
          int64_t n = S[b];
          int64_t j = 0;
          for (; j < len && n < kk; ++j) {  // fill the heap
            if (std::isnan(row[j])) continue;
            h[n++] = {row[j], t0 + j};
            std::push_heap(h, h + n, better<acc_t>);
          }
          if (n == kk) {
            acc_t thr = h[0].v;
            for (; j < len; ++j) {
              if (row[j] > thr) {  // strictly: an equal score has a larger index than the heap's worst
                std::pop_heap(h, h + kk, better<acc_t>);
                h[kk - 1] = {row[j], t0 + j};
                std::push_heap(h, h + kk, better<acc_t>);
                thr = h[0].v;
              }
            }
          }
          S[b] = n;
        }
      }
    }
  });

  scalar_t* vout = values.data_ptr<scalar_t>();
  int64_t* iout = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<Cand<acc_t>> all;
    for (int64_t b = begin; b < end; ++b) {
      all.clear();
      for (int64_t c = 0; c < nchunks; ++c) {
        const Cand<acc_t>* h = heaps.data() + (c * B + b) * kk;
        all.insert(all.end(), h, h + sizes[c * B + b]);
      }
      const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
      std::partial_sort(all.begin(), all.begin() + m, all.end(), better<acc_t>);
      for (int64_t j = 0; j < m; ++j) {
        vout[b * k + j] = static_cast<scalar_t>(all[j].v);
        iout[b * k + j] = all[j].i;
      }
      for (int64_t j = m; j < k; ++j) {
        vout[b * k + j] = -std::numeric_limits<scalar_t>::infinity();
        iout[b * k + j] = -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_scores_cpu(const at::Tensor& queries, const at::Tensor& items, int64_t k,
                                                   const std::optional<at::Tensor>& item_bias,
                                                   const std::optional<at::Tensor>& exclude_offsets,
                                                   const std::optional<at::Tensor>& exclude_indices) {
  // Inner ATen calls must not record autograd: the inputs are detached (the
  // guard is thread-local and does not reach the pool's threads).
  at::AutoDispatchBelowADInplaceOrView guard;
  const TopkShape s = check_topk_args(queries, items, k, item_bias, exclude_offsets, exclude_indices);
  // A larger k than any catalogue can hold (N < 2^31) would only size [B, k] outputs past what can be allocated.
  UNIREC_CHECK(k < (int64_t(1) << 31), "k must be < 2^31 (items has fewer than 2^31 rows), got ", k);
  std::vector<int64_t> xsorted;
  at::Tensor xoff;
  if (s.exclude) {
    xoff = exclude_offsets->contiguous();
    xsorted = sorted_exclusions(xoff, exclude_indices->contiguous(), s.B, s.N);
  }
  at::Tensor values = at::empty({s.B, k}, queries.options());
  at::Tensor indices = at::empty({s.B, k}, queries.options().dtype(at::kLong));
  if (s.B == 0) return {values, indices};
  if (s.N == 0) {
    values.fill_(-std::numeric_limits<double>::infinity());
    indices.fill_(-1);
    return {values, indices};
  }
  const at::Tensor it = items.detach().contiguous();
  const at::Tensor bias = item_bias.has_value() ? item_bias->contiguous() : at::Tensor();
  const int64_t* xo = s.exclude ? xoff.data_ptr<int64_t>() : nullptr;
  const int64_t* xi = s.exclude ? xsorted.data() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queries.scalar_type(), "topk_scores_cpu", [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      topk_kernel<scalar_t, double>(queries, it, bias, xo, xi, s, values, indices);
    } else {
      topk_kernel<scalar_t, float>(queries, it, bias, xo, xi, s, values, indices);
    }
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) { m.impl("topk_scores", &topk_scores_cpu); }

}  // namespace unirec
