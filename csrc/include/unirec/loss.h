// Argument checks of the full-catalogue softmax cross-entropy, shared by
// backends. Target values are range-checked by each backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "unirec/checks.h"

namespace unirec {

struct CeShape {
  int64_t M, N, D;
  bool bias;
};

inline CeShape check_ce_args(const at::Tensor& hidden, const at::Tensor& items, const at::Tensor& targets,
                             const std::optional<at::Tensor>& item_bias, double label_smoothing) {
  check_dim(hidden, 2, "hidden");
  check_dim(items, 2, "items");
  check_float_dtype(hidden, "hidden");
  UNIREC_CHECK(items.scalar_type() == hidden.scalar_type(), "items must have the dtype of hidden (",
               hidden.scalar_type(), "), got ", items.scalar_type());
  check_same_device(items, hidden, "items", "hidden");
  UNIREC_CHECK(hidden.size(1) == items.size(1), "hidden [M, D] and items [N, D] must share D, got hidden ",
               hidden.sizes(), " and items ", items.sizes());
  check_dim(targets, 1, "targets");
  check_dtype(targets, at::kLong, "targets");
  check_same_device(targets, hidden, "targets", "hidden");
  UNIREC_CHECK(targets.size(0) == hidden.size(0), "targets must have M = ", hidden.size(0),
               " entries (one per row of hidden), got ", targets.size(0));
  UNIREC_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must lie in [0, 1], got ",
               label_smoothing);
  CeShape s{hidden.size(0), items.size(0), hidden.size(1), false};
  if (item_bias.has_value()) {
    const at::Tensor& b = *item_bias;
    check_dim(b, 1, "item_bias");
    UNIREC_CHECK(b.size(0) == s.N, "item_bias must have N = ", s.N, " entries (one per item), got ", b.size(0));
    UNIREC_CHECK(b.scalar_type() == hidden.scalar_type(), "item_bias must have the dtype of hidden (",
                 hidden.scalar_type(), "), got ", b.scalar_type());
    check_same_device(b, hidden, "item_bias", "hidden");
    s.bias = true;
  }
  return s;
}

}  // namespace unirec
