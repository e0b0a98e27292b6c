// GCC vector types of UNIREC_VEC_BYTES (32 or 64) bytes and the float32 exp
// the CPU kernels share. Included, with no include guard, inside each ISA's
// namespace before a kernel file (attention_kernels.h, loss_kernels.h), under
// that namespace's `#pragma GCC target`: the same code becomes AVX-512,
// AVX2+FMA or baseline instructions (a 32-byte vector is two SSE registers).
#ifndef UNIREC_VEC_BYTES
#error "set UNIREC_VEC_BYTES (32 or 64) before including simd.h"
#endif
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(UNIREC_VEC_BYTES), aligned(4), may_alias));
  typedef int32_t itype __attribute__((vector_size(UNIREC_VEC_BYTES), aligned(4), may_alias));
  static constexpr int W = UNIREC_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(UNIREC_VEC_BYTES), aligned(8), may_alias));
  static constexpr int W = UNIREC_VEC_BYTES / 8;
};

template <typename T>
static inline typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
static inline void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

template <typename T>
static inline typename Vec<T>::type vbroadcast(T x) {
  // vector + scalar broadcasts the scalar: one vbroadcastss (a lane-by-lane loop became 16 masked
  // broadcasts at 64 bytes)
  return typename Vec<T>::type{} + x;
}

// exp of each lane, inputs clamped to [-87, 88]: Cephes' polynomial after range reduction by 2^n,
// relative error ~1e-7 (below -87 it returns exp(-87) = 1.6e-38, not 0; NaN stays NaN).
static inline Vec<float>::type vexp(Vec<float>::type v) {
  using V = Vec<float>::type;
  using VI = Vec<float>::itype;
  v = v < -87.0f ? V{} - 87.0f : v;
  v = v > 88.0f ? V{} + 88.0f : v;
  V t = v * 1.44269504088896341f + 12582912.0f;
  V nn = t - 12582912.0f;
  V r = v - nn * 0.693359375f;
  r = r + nn * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  VI e = (__builtin_convertvector(nn, VI) + 127) << 23;
  V s;
  __builtin_memcpy(&s, &e, sizeof(s));
  return p * s;
}
