// The whole op surface of unirec: every schema is declared here, backends
// register implementations in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu.
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include <ATen/Parallel.h>

#include <string>

#include "unirec/cpu_features.h"
#include "unirec/embedding.h"

namespace py = pybind11;

TORCH_LIBRARY(unirec, m) {
  // ---- embedding: table-batched embedding bags (FBGEMM's TBE layout) ----
  // weight [R, D] packs T tables; table_offsets [T+1]; indices [nnz] local row
  // ids; offsets [T*B+1], feature-major. Returns pooled [B, T, D].
  m.def("tbe_forward(Tensor weight, Tensor table_offsets, Tensor indices, Tensor offsets, "
        "Tensor? per_sample_weights, str pooling) -> Tensor");
  // Returns (grad_weight [R, D], grad_per_sample_weights [nnz] or [0]).
  m.def("tbe_backward(Tensor grad_output, Tensor weight, Tensor table_offsets, Tensor indices, "
        "Tensor offsets, Tensor? per_sample_weights, str pooling) -> (Tensor, Tensor)");
  // Fused backward + optimizer: updates the used rows of weight (and the
  // row-wise state [R] for rowwise_adagrad) in place; returns the gradient of
  // per_sample_weights ([nnz] or [0]), computed with the weights before the update.
  m.def("tbe_backward_update_(Tensor(a!) weight, Tensor(b!) optimizer_state, Tensor grad_output, "
        "Tensor table_offsets, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
        "str pooling, str optimizer, float lr, float eps) -> Tensor");

  // ---- attention: jagged (packed) multi-head attention ----
  // q, k, v [total, H, Dh]; offsets [B+1] int64; num_targets [B] int64;
  // rel_bias [H, max_seqlen]. Returns out [total, H, Dh] and lse [total, H]
  // (float32, float64 for float64 inputs; [0] for silu).
  m.def("jagged_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor offsets, int max_seqlen, bool causal, "
        "Tensor? num_targets, str activation, Tensor? rel_bias, float scale) -> (Tensor out, Tensor lse)");
  // Returns dq, dk, dv [total, H, Dh] and drel_bias ([H, max_seqlen], [0] without rel_bias).
  m.def("jagged_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor offsets, int max_seqlen, bool causal, Tensor? num_targets, str activation, Tensor? rel_bias, "
        "float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor drel_bias)");

  // ---- retrieval: top-k over the catalogue ----
  // queries [B, D], items [N, D], item_bias [N] or None; exclusions as CSR
  // (exclude_offsets [B+1] int64, exclude_indices [nnz] int64 item ids).
  // Returns (values [B, k] in queries' dtype, descending; indices [B, k] int64),
  // ties by the smaller item index, tail -inf / -1 when fewer than k remain.
  m.def("topk_scores(Tensor queries, Tensor items, int k, Tensor? item_bias, Tensor? exclude_offsets, "
        "Tensor? exclude_indices) -> (Tensor values, Tensor indices)");

  // ---- loss: full-catalogue softmax cross-entropy ----
  // hidden [M, D], items [N, D], targets [M] int64, item_bias [N] or None.
  // Returns (loss_per_row [M], lse [M], logit_grad), float32 (float64 for
  // float64 inputs); rows whose target is ignore_index have loss 0. With
  // keep_logit_grad (CPU kernel only) logit_grad is the [M, N] derivative of
  // loss_per_row[i] by logit [i, j], for the backward to reuse; else [0, N].
  m.def("softmax_ce_fwd(Tensor hidden, Tensor items, Tensor targets, Tensor? item_bias, int ignore_index, "
        "float label_smoothing, bool keep_logit_grad) -> (Tensor loss_per_row, Tensor lse, Tensor logit_grad)");
  // grad_loss [M] (float32/float64), logit_grad from the forward or None (the
  // logits are recomputed) -> (dhidden [M, D], ditems [N, D], dbias [N]) in the inputs' dtype.
  m.def("softmax_ce_bwd(Tensor grad_loss, Tensor hidden, Tensor items, Tensor targets, Tensor? item_bias, "
        "Tensor lse, Tensor? logit_grad, int ignore_index, float label_smoothing) "
        "-> (Tensor dhidden, Tensor ditems, Tensor dbias)");

  // ---- dropout: counter-based Bernoulli masks ----
  // out_i = input_i * (draw_i < threshold ? 65536 / threshold : 0), keep =
  // threshold / 65536, shaped like input, in its dtype (bfloat16/float16
  // computed in float). draw_i is a 16-bit value, a pure function of (seed, i):
  // half of a keyed 32-bit hash of a counter (reference/dropout.py defines it).
  // With row_keys (int64 [rows], input viewed as [rows, cols], cols = its last
  // dimension), draw (r, c) is a pure function of (seed, row_keys[r], c)
  // instead: a row's mask follows its key wherever the row sits.
  // The backward is this op on the gradient with the same (threshold, seed,
  // row_keys): the mask is regenerated, never stored.
  m.def("dropout(Tensor input, int threshold, int seed, Tensor? row_keys=None) -> Tensor");
}

namespace {

py::dict build_info() {
  py::dict info;
  py::list backends;
  backends.append("cpu");
#ifdef UNIREC_WITH_CUDA
  backends.append("cuda");
#endif
  info["backends"] = backends;
#ifdef UNIREC_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(UNIREC_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_isa"] = std::string(unirec::cpu_isa_name(unirec::cpu_isa()));
  info["threads"] = at::get_num_threads();
  info["parallel"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "unirec kernels: the ops live in torch.ops.unirec";
  module.def("build_info", &build_info,
             "Which backends were compiled, the CUDA architectures, the compiler and threads.");
  module.def(
      "advise_huge_pages",
      [](uintptr_t address, int64_t nbytes) {
        return unirec::advise_huge_pages(reinterpret_cast<void*>(address), nbytes);
      },
      "Back the untouched memory [address, address + nbytes) with transparent huge pages where Linux allows.");
}
