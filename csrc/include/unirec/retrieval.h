// Argument checks of topk_scores, shared by the CPU and CUDA kernels. The
// exclusion lists' values (offsets order, id range) are checked by each backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "unirec/checks.h"

namespace unirec {

struct TopkShape {
  int64_t B, N, D, k, nnz;
  bool bias, exclude;
};

inline TopkShape check_topk_args(const at::Tensor& queries, const at::Tensor& items, int64_t k,
                                 const std::optional<at::Tensor>& item_bias,
                                 const std::optional<at::Tensor>& exclude_offsets,
                                 const std::optional<at::Tensor>& exclude_indices) {
  check_dim(queries, 2, "queries");
  check_dim(items, 2, "items");
  check_float_dtype(queries, "queries");
  UNIREC_CHECK(items.scalar_type() == queries.scalar_type(), "items must have the dtype of queries (",
               queries.scalar_type(), "), got ", items.scalar_type());
  check_same_device(items, queries, "items", "queries");
  UNIREC_CHECK(queries.size(1) == items.size(1), "queries [B, D] and items [N, D] must share D, got queries ",
               queries.sizes(), " and items ", items.sizes());
  UNIREC_CHECK(k >= 1, "k must be >= 1, got ", k);
  TopkShape s{queries.size(0), items.size(0), queries.size(1), k, 0, false, false};
  UNIREC_CHECK(s.N < (int64_t(1) << 31), "items must have fewer than 2^31 rows, got ", s.N);
  if (item_bias.has_value()) {
    const at::Tensor& b = *item_bias;
    check_dim(b, 1, "item_bias");
    UNIREC_CHECK(b.size(0) == s.N, "item_bias must have N = ", s.N, " entries (one per item), got ", b.size(0));
    UNIREC_CHECK(b.scalar_type() == queries.scalar_type(), "item_bias must have the dtype of queries (",
                 queries.scalar_type(), "), got ", b.scalar_type());
    check_same_device(b, queries, "item_bias", "queries");
    s.bias = true;
  }
  UNIREC_CHECK(exclude_offsets.has_value() == exclude_indices.has_value(),
               "exclude_offsets and exclude_indices must be given together");
  if (exclude_offsets.has_value()) {
    const at::Tensor& o = *exclude_offsets;
    const at::Tensor& i = *exclude_indices;
    check_dim(o, 1, "exclude_offsets");
    check_dim(i, 1, "exclude_indices");
    check_dtype(o, at::kLong, "exclude_offsets");
    check_dtype(i, at::kLong, "exclude_indices");
    check_same_device(o, queries, "exclude_offsets", "queries");
    check_same_device(i, queries, "exclude_indices", "queries");
    UNIREC_CHECK(o.numel() == s.B + 1, "exclude_offsets must have B + 1 = ", s.B + 1, " entries, got ", o.numel());
    s.nnz = i.numel();
    s.exclude = true;
  }
  return s;
}

}  // namespace unirec
