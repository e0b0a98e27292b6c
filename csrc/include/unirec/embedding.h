// Argument checks and shapes of the table-batched embedding ops, shared by
// the CPU and CUDA kernels. Value checks (offsets order, index range) need
// the data and live with each backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "unirec/checks.h"

namespace unirec {

// Asks Linux to back the whole 2 MiB pages inside [data, data + nbytes) with
// transparent huge pages (madvise MADV_HUGEPAGE): random rows of a large
// table then miss the TLB far less. Takes effect for pages not yet touched.
// Regions under 16 MiB are left alone; UNIREC_HUGE_PAGES=0 turns it off.
// Returns whether the advice was given.
bool advise_huge_pages(void* data, int64_t nbytes);

enum class Pooling { kSum, kMean };

inline Pooling parse_pooling(const std::string& pooling) {
  if (pooling == "sum") return Pooling::kSum;
  if (pooling == "mean") return Pooling::kMean;
  UNIREC_CHECK(false, "pooling must be \"sum\" or \"mean\", got \"", pooling, "\"");
  return Pooling::kSum;
}

struct TbeShape {
  int64_t T;  // tables
  int64_t B;  // batch
  int64_t D;  // embedding dim
  int64_t R;  // rows of all tables
  int64_t nnz;
};

inline TbeShape check_tbe_args(const at::Tensor& weight, const at::Tensor& table_offsets,
                               const at::Tensor& indices, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& per_sample_weights,
                               const std::string& pooling) {
  check_dim(weight, 2, "weight");
  check_float_dtype(weight, "weight");
  check_dim(table_offsets, 1, "table_offsets");
  check_dtype(table_offsets, at::kLong, "table_offsets");
  check_dim(indices, 1, "indices");
  check_index_dtype(indices, "indices");
  check_dim(offsets, 1, "offsets");
  UNIREC_CHECK(offsets.scalar_type() == indices.scalar_type(), "offsets must have the dtype of indices (",
               indices.scalar_type(), "), got ", offsets.scalar_type());
  check_same_device(table_offsets, weight, "table_offsets", "weight");
  check_same_device(indices, weight, "indices", "weight");
  check_same_device(offsets, weight, "offsets", "weight");
  const int64_t T = table_offsets.numel() - 1;
  UNIREC_CHECK(T >= 1, "table_offsets must have T+1 >= 2 entries, got ", table_offsets.numel());
  UNIREC_CHECK(offsets.numel() >= 1 && (offsets.numel() - 1) % T == 0,
               "offsets must have T*B+1 entries for T=", T, " tables, got ", offsets.numel());
  const Pooling mode = parse_pooling(pooling);
  if (per_sample_weights.has_value()) {
    const auto& psw = *per_sample_weights;
    UNIREC_CHECK(mode == Pooling::kSum, "per_sample_weights are only supported with pooling=\"sum\"");
    check_dim(psw, 1, "per_sample_weights");
    UNIREC_CHECK(psw.numel() == indices.numel(), "per_sample_weights must have one weight per index (",
                 indices.numel(), "), got ", psw.numel());
    UNIREC_CHECK(psw.scalar_type() == weight.scalar_type(), "per_sample_weights must have the dtype of weight (",
                 weight.scalar_type(), "), got ", psw.scalar_type());
    check_same_device(psw, weight, "per_sample_weights", "weight");
  }
  return {T, (offsets.numel() - 1) / T, weight.size(1), weight.size(0), indices.numel()};
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& weight, const TbeShape& s) {
  check_dim(grad_output, 3, "grad_output");
  UNIREC_CHECK(grad_output.size(0) == s.B && grad_output.size(1) == s.T && grad_output.size(2) == s.D,
               "grad_output must have shape [B, T, D] = [", s.B, ", ", s.T, ", ", s.D, "], got ",
               grad_output.sizes());
  UNIREC_CHECK(grad_output.scalar_type() == weight.scalar_type(), "grad_output must have the dtype of weight (",
               weight.scalar_type(), "), got ", grad_output.scalar_type());
  check_same_device(grad_output, weight, "grad_output", "weight");
}

// Checks every offset the kernels trust, on CPU tensors: table_offsets run
// from 0 to R and offsets from 0 to nnz without decreasing. O(T * B).
inline void check_tbe_offsets(const at::Tensor& table_offsets, const at::Tensor& offsets, const TbeShape& s) {
  const int64_t* toff = table_offsets.data_ptr<int64_t>();
  UNIREC_CHECK(toff[0] == 0, "table_offsets[0] must be 0, got ", toff[0]);
  for (int64_t t = 0; t < s.T; ++t) {
    UNIREC_CHECK(toff[t + 1] >= toff[t], "table_offsets must not decrease, but table_offsets[", t + 1, "] = ",
                 toff[t + 1], " < table_offsets[", t, "] = ", toff[t]);
  }
  UNIREC_CHECK(toff[s.T] == s.R, "table_offsets[-1] must equal the rows of weight (", s.R, "), got ", toff[s.T]);
  // Widened to int64 once: the checks then serve int32 and int64 inputs alike.
  const at::Tensor off_t = offsets.to(at::kLong);
  const int64_t* off = off_t.data_ptr<int64_t>();
  UNIREC_CHECK(off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  UNIREC_CHECK(off[s.T * s.B] == s.nnz, "offsets[-1] must equal len(indices) (", s.nnz, "), got ", off[s.T * s.B]);
  for (int64_t i = 0; i < s.T * s.B; ++i) {
    UNIREC_CHECK(off[i + 1] >= off[i], "offsets must not decrease, but offsets[", i + 1, "] = ", off[i + 1],
                 " < offsets[", i, "] = ", off[i]);
  }
}

// Checks that each index lies inside its table (offsets already checked).
inline void check_tbe_indices(const at::Tensor& table_offsets, const at::Tensor& indices, const at::Tensor& offsets,
                              const TbeShape& s) {
  const int64_t* toff = table_offsets.data_ptr<int64_t>();
  const at::Tensor off_t = offsets.to(at::kLong), idx_t = indices.to(at::kLong);
  const int64_t* off = off_t.data_ptr<int64_t>();
  const int64_t* idx = idx_t.data_ptr<int64_t>();
  for (int64_t bag = 0; bag < s.T * s.B; ++bag) {
    const int64_t t = bag / s.B;
    const int64_t rows = toff[t + 1] - toff[t];
    for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
      UNIREC_CHECK(idx[p] >= 0 && idx[p] < rows, "indices[", p, "] = ", idx[p], " is outside table ", t,
                   ", which has ", rows, " rows");
    }
  }
}

// Every value the kernels trust. The CUDA path runs it on CPU copies only
// after a device-side check failed, to name the culprit.
inline void check_tbe_values(const at::Tensor& table_offsets, const at::Tensor& indices, const at::Tensor& offsets,
                             const TbeShape& s) {
  check_tbe_offsets(table_offsets, offsets, s);
  check_tbe_indices(table_offsets, indices, offsets, s);
}

enum class Optimizer { kSgd, kRowwiseAdagrad };

inline Optimizer check_optimizer(const std::string& optimizer, const at::Tensor& state, const at::Tensor& weight) {
  if (optimizer == "sgd") return Optimizer::kSgd;
  UNIREC_CHECK(optimizer == "rowwise_adagrad", "optimizer must be \"sgd\" or \"rowwise_adagrad\", got \"",
               optimizer, "\"");
  check_dim(state, 1, "optimizer_state");
  check_dtype(state, at::kFloat, "optimizer_state");
  UNIREC_CHECK(state.numel() == weight.size(0), "optimizer_state must have one entry per row of weight (",
               weight.size(0), "), got ", state.numel());
  UNIREC_CHECK(state.is_contiguous(), "optimizer_state must be contiguous");
  check_same_device(state, weight, "optimizer_state", "weight");
  return Optimizer::kRowwiseAdagrad;
}

}  // namespace unirec
