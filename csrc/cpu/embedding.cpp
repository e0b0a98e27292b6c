// Table-batched embedding bags on the CPU: OpenMP over bags (forward) and over
// unique rows (backward), inner loops over D that the compiler vectorises.
//
// The backward groups index positions by their row with a stable sort, then
// sums each row's contributions in position order: no two threads ever write
// the same row, so the result is deterministic and race-free.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "unirec/embedding.h"

namespace unirec {
namespace {

// Bags per parallel task: small bags are cheap, so hand out several at once.
constexpr int64_t kBagGrain = 16;

at::Tensor tbe_forward_cpu(const at::Tensor& weight_, const at::Tensor& table_offsets_, const at::Tensor& indices_,
                           const at::Tensor& offsets_, const std::optional<at::Tensor>& per_sample_weights,
                           std::string pooling) {
  const TbeShape s = check_tbe_args(weight_, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor weight = weight_.contiguous(), table_offsets = table_offsets_.contiguous(),
                   indices = indices_.contiguous(), offsets = offsets_.contiguous();
  check_tbe_values(table_offsets, indices, offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.B, s.T, s.D}, weight.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_forward_cpu", [&] {
      const scalar_t* w = weight.data_ptr<scalar_t>();
      const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      const int64_t* toff = table_offsets.data_ptr<int64_t>();
      const index_t* idx = indices.data_ptr<index_t>();
      const index_t* off = offsets.data_ptr<index_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t D = s.D;
      at::parallel_for(0, s.T * s.B, kBagGrain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(D);
        for (int64_t bag = begin; bag < end; ++bag) {
          const int64_t t = bag / s.B, b = bag % s.B;
          const scalar_t* table = w + toff[t] * D;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          acc_t* a = acc.data();
          const int64_t start = off[bag], stop = off[bag + 1];
          for (int64_t p = start; p < stop; ++p) {
            const scalar_t* row = table + static_cast<int64_t>(idx[p]) * D;
            const acc_t scale = ps ? static_cast<acc_t>(ps[p]) : acc_t(1);
            for (int64_t d = 0; d < D; ++d) a[d] += scale * static_cast<acc_t>(row[d]);
          }
          const acc_t norm = (mean && stop > start) ? acc_t(1) / acc_t(stop - start) : acc_t(1);
          scalar_t* dst = o + (b * s.T + t) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(a[d] * norm);
        }
      });
    });
  });
  return out;
}

// Position p -> its bag (t*B + b), and the linear row table_offsets[t] + indices[p].
template <typename index_t>
void positions_to_bags_and_rows(const int64_t* toff, const index_t* idx, const index_t* off, const TbeShape& s,
                                int64_t* bag_of, int64_t* row_of) {
  at::parallel_for(0, s.T * s.B, kBagGrain * 4, [&](int64_t begin, int64_t end) {
    for (int64_t bag = begin; bag < end; ++bag) {
      const int64_t base = toff[bag / s.B];
      for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
        bag_of[p] = bag;
        row_of[p] = base + static_cast<int64_t>(idx[p]);
      }
    }
  });
}

// The gradient of one row, summed over its positions in sorted (stable) order.
// Visits each unique row once, in parallel, and hands the summed gradient to
// `apply(row, grad)`.
template <typename scalar_t, typename acc_t, typename index_t, typename Apply>
void for_each_row_gradient(const at::Tensor& grad_output, const at::Tensor& psw, const index_t* off,
                           const TbeShape& s, bool mean, const int64_t* bag_of, const at::Tensor& sorted_rows,
                           const at::Tensor& order, Apply apply) {
  const int64_t nnz = s.nnz;
  if (nnz == 0) return;
  const int64_t* rows = sorted_rows.data_ptr<int64_t>();
  const int64_t* perm = order.data_ptr<int64_t>();
  // Segment starts: positions where the sorted row id changes.
  std::vector<int64_t> seg;
  seg.reserve(nnz / 2 + 2);
  seg.push_back(0);
  for (int64_t i = 1; i < nnz; ++i) {
    if (rows[i] != rows[i - 1]) seg.push_back(i);
  }
  seg.push_back(nnz);
  const int64_t segments = static_cast<int64_t>(seg.size()) - 1;
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  const scalar_t* ps = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
  const int64_t D = s.D;
  at::parallel_for(0, segments, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t g = begin; g < end; ++g) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* a = acc.data();
      for (int64_t i = seg[g]; i < seg[g + 1]; ++i) {
        const int64_t p = perm[i];
        const int64_t bag = bag_of[p];
        const int64_t t = bag / s.B, b = bag % s.B;
        acc_t scale = ps ? static_cast<acc_t>(ps[p]) : acc_t(1);
        if (mean) scale /= static_cast<acc_t>(off[bag + 1] - off[bag]);
        const scalar_t* src = go + (b * s.T + t) * D;
        for (int64_t d = 0; d < D; ++d) a[d] += scale * static_cast<acc_t>(src[d]);
      }
      apply(rows[seg[g]], a);
    }
  });
}

// d loss / d per_sample_weights[p] = <grad_output[b, t], weight[row_of[p]]>.
template <typename scalar_t, typename acc_t>
at::Tensor psw_gradient(const at::Tensor& grad_output, const at::Tensor& weight, const int64_t* bag_of,
                        const int64_t* row_of, const TbeShape& s) {
  at::Tensor grad = at::empty({s.nnz}, weight.options());
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* gp = grad.data_ptr<scalar_t>();
  const int64_t D = s.D;
  at::parallel_for(0, s.nnz, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t bag = bag_of[p];
      const scalar_t* g = go + ((bag % s.B) * s.T + bag / s.B) * D;
      const scalar_t* row = w + row_of[p] * D;
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(g[d]) * static_cast<acc_t>(row[d]);
      gp[p] = static_cast<scalar_t>(dot);
    }
  });
  return grad;
}

struct Prepared {
  at::Tensor bag_of, row_of, sorted_rows, order;
};

template <typename index_t>
Prepared prepare_backward(const at::Tensor& table_offsets, const at::Tensor& indices, const at::Tensor& offsets,
                          const TbeShape& s) {
  Prepared p;
  const auto opts = indices.options().dtype(at::kLong);
  p.bag_of = at::empty({s.nnz}, opts);
  p.row_of = at::empty({s.nnz}, opts);
  positions_to_bags_and_rows<index_t>(table_offsets.data_ptr<int64_t>(), indices.data_ptr<index_t>(),
                                      offsets.data_ptr<index_t>(), s, p.bag_of.data_ptr<int64_t>(),
                                      p.row_of.data_ptr<int64_t>());
  // Stable: equal rows keep position order, which fixes the summation order.
  std::tie(p.sorted_rows, p.order) = at::sort(p.row_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return p;
}

std::tuple<at::Tensor, at::Tensor> tbe_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& weight_,
                                                    const at::Tensor& table_offsets_, const at::Tensor& indices_,
                                                    const at::Tensor& offsets_,
                                                    const std::optional<at::Tensor>& per_sample_weights,
                                                    std::string pooling) {
  const TbeShape s = check_tbe_args(weight_, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  check_grad_output(grad_output_, weight_, s);
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor weight = weight_.contiguous(), table_offsets = table_offsets_.contiguous(),
                   indices = indices_.contiguous(), offsets = offsets_.contiguous(),
                   grad_output = grad_output_.contiguous();
  check_tbe_values(table_offsets, indices, offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_psw = at::empty({0}, weight.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_backward_cpu", [&] {
      const Prepared prep = prepare_backward<index_t>(table_offsets, indices, offsets, s);
      scalar_t* gw = grad_weight.data_ptr<scalar_t>();
      const int64_t D = s.D;
      for_each_row_gradient<scalar_t, acc_t, index_t>(
          grad_output, psw, offsets.data_ptr<index_t>(), s, mean, prep.bag_of.data_ptr<int64_t>(),
          prep.sorted_rows, prep.order, [&](int64_t row, const acc_t* g) {
            scalar_t* dst = gw + row * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(g[d]);
          });
      if (psw.defined()) {
        grad_psw = psw_gradient<scalar_t, acc_t>(grad_output, weight, prep.bag_of.data_ptr<int64_t>(),
                                                 prep.row_of.data_ptr<int64_t>(), s);
      }
    });
  });
  return {grad_weight, grad_psw};
}

at::Tensor tbe_backward_update_cpu(at::Tensor& weight, at::Tensor& state, const at::Tensor& grad_output_,
                                   const at::Tensor& table_offsets_, const at::Tensor& indices_,
                                   const at::Tensor& offsets_, const std::optional<at::Tensor>& per_sample_weights,
                                   std::string pooling, std::string optimizer, double lr, double eps) {
  const TbeShape s = check_tbe_args(weight, table_offsets_, indices_, offsets_, per_sample_weights, pooling);
  check_grad_output(grad_output_, weight, s);
  const Optimizer opt = check_optimizer(optimizer, state, weight);
  UNIREC_CHECK(weight.is_contiguous(), "weight must be contiguous to be updated in place");
  const bool mean = parse_pooling(pooling) == Pooling::kMean;
  const at::Tensor table_offsets = table_offsets_.contiguous(), indices = indices_.contiguous(),
                   offsets = offsets_.contiguous(), grad_output = grad_output_.contiguous();
  check_tbe_values(table_offsets, indices, offsets, s);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor grad_psw = at::empty({0}, weight.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tbe_backward_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tbe_backward_update_cpu", [&] {
      const Prepared prep = prepare_backward<index_t>(table_offsets, indices, offsets, s);
      // The per-sample-weight gradient needs the weights before the update.
      if (psw.defined()) {
        grad_psw = psw_gradient<scalar_t, acc_t>(grad_output, weight, prep.bag_of.data_ptr<int64_t>(),
                                                 prep.row_of.data_ptr<int64_t>(), s);
      }
      scalar_t* w = weight.data_ptr<scalar_t>();
      float* st = opt == Optimizer::kRowwiseAdagrad ? state.data_ptr<float>() : nullptr;
      const int64_t D = s.D;
      const acc_t step = static_cast<acc_t>(lr), epsilon = static_cast<acc_t>(eps);
      for_each_row_gradient<scalar_t, acc_t, index_t>(
          grad_output, psw, offsets.data_ptr<index_t>(), s, mean, prep.bag_of.data_ptr<int64_t>(),
          prep.sorted_rows, prep.order, [&](int64_t row, const acc_t* g) {
            scalar_t* dst = w + row * D;
            acc_t mult = step;
            if (st) {
              // Row-wise Adagrad (FBGEMM): one accumulator per row, the mean of g^2.
              acc_t sq = 0;
              for (int64_t d = 0; d < D; ++d) sq += g[d] * g[d];
              const acc_t h = static_cast<acc_t>(st[row]) + sq / static_cast<acc_t>(D);
              st[row] = static_cast<float>(h);
              mult = step / (std::sqrt(h) + epsilon);
            }
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) - mult * g[d]);
          });
    });
  });
  return grad_psw;
}

}  // namespace

TORCH_LIBRARY_IMPL(unirec, CPU, m) {
  m.impl("tbe_forward", &tbe_forward_cpu);
  m.impl("tbe_backward", &tbe_backward_cpu);
  m.impl("tbe_backward_update_", &tbe_backward_update_cpu);
}

}  // namespace unirec
