// Argument checks and shapes of the jagged attention ops (CPU kernels; the
// GPU path is Triton and repeats these checks in Python).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "unirec/checks.h"

namespace unirec {

struct AttnShape {
  int64_t total;  // packed tokens
  int64_t H;      // heads
  int64_t D;      // head dim
  int64_t B;      // sequences
};

inline bool parse_activation(const std::string& activation) {  // true: silu
  UNIREC_CHECK(activation == "softmax" || activation == "silu",
               "activation must be \"softmax\" or \"silu\", got \"", activation, "\"");
  return activation == "silu";
}

inline AttnShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& offsets, int64_t max_seqlen,
                                      const std::optional<at::Tensor>& num_targets,
                                      const std::optional<at::Tensor>& rel_bias) {
  check_dim(q, 3, "q");
  check_float_dtype(q, "q");
  UNIREC_CHECK(k.sizes() == q.sizes(), "k must have q's shape ", q.sizes(), ", got ", k.sizes());
  UNIREC_CHECK(v.sizes() == q.sizes(), "v must have q's shape ", q.sizes(), ", got ", v.sizes());
  UNIREC_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", q.scalar_type(), ", got ",
               k.scalar_type());
  UNIREC_CHECK(v.scalar_type() == q.scalar_type(), "v must have q's dtype ", q.scalar_type(), ", got ",
               v.scalar_type());
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_same_device(offsets, q, "offsets", "q");
  check_dim(offsets, 1, "offsets");
  check_dtype(offsets, at::kLong, "offsets");
  UNIREC_CHECK(offsets.size(0) >= 1, "offsets must hold B+1 >= 1 entries, got 0");
  UNIREC_CHECK(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
  UNIREC_CHECK(q.size(2) >= 1 && q.size(2) <= 256, "the head dim (q.shape[2]) must be in [1, 256], got ",
               q.size(2));
  const int64_t B = offsets.size(0) - 1;
  if (num_targets.has_value()) {
    const auto& nt = *num_targets;
    check_same_device(nt, q, "num_targets", "q");
    check_dim(nt, 1, "num_targets");
    check_dtype(nt, at::kLong, "num_targets");
    UNIREC_CHECK(nt.size(0) == B, "num_targets must hold one count per sequence (", B, "), got ", nt.size(0));
  }
  if (rel_bias.has_value()) {
    const auto& rb = *rel_bias;
    check_same_device(rb, q, "rel_bias", "q");
    UNIREC_CHECK(rb.dim() == 2 && rb.size(0) == q.size(1) && rb.size(1) == max_seqlen,
                 "rel_bias must be [H, max_seqlen] = [", q.size(1), ", ", max_seqlen, "], got ", rb.sizes());
    UNIREC_CHECK(rb.scalar_type() == q.scalar_type(), "rel_bias must have q's dtype ", q.scalar_type(), ", got ",
                 rb.scalar_type());
  }
  return AttnShape{q.size(0), q.size(1), q.size(2), B};
}

}  // namespace unirec
