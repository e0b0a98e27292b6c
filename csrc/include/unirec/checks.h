// Input checks shared by every backend. Messages name the argument and say
// what was expected, so a user can fix the call without reading kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define UNIREC_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace unirec {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  UNIREC_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  UNIREC_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  UNIREC_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
               name, " must be int64 or int32, got ", t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  UNIREC_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble,
               name, " must be float32, bfloat16, float16 or float64, got ", s);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  UNIREC_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
               " is on ", ref.device(), "; all inputs must be on one device");
}

}  // namespace unirec
