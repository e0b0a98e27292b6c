// Row kernels of the CPU softmax cross-entropy (loss.cpp): one pass over a row
// of n logits (any n), float32 vectorised with simd.h's exp, float64 with
// std::exp. Included three times by loss.cpp, inside each ISA's namespace
// after simd.h, like attention_kernels.h, so it has no include guard.
//
// ATen's exp (Sleef, 1-ulp) was a fifth of the loss's time on the CPU; simd.h's
// polynomial is ~1e-7 relative, and fusing the max / shift / exp / sum of a
// row into one or two passes keeps the row in L1 between them.

// exp(x), 0 below -87.33 (float's smallest normal is exp(-87.34)): a -inf logit has no mass.
static inline Vec<float>::type vexp0(Vec<float>::type v) {
  using V = Vec<float>::type;
  const V e = vexp(v);
  return v < -87.33f ? V{} : e;
}
static inline float exp0(float x) { return x < -87.33f ? 0.0f : std::exp(x); }

static inline float hmax(Vec<float>::type m) {
  float r = m[0];
  for (int w = 1; w < Vec<float>::W; ++w) r = r > m[w] ? r : m[w];
  return r;
}
static inline float hsum(Vec<float>::type a) {
  float r = 0;
  for (int w = 0; w < Vec<float>::W; ++w) r += a[w];
  return r;
}

// max_j z_j (n >= 1).
static inline float row_max(const float* z, int64_t n) {
  constexpr int W = Vec<float>::W;
  int64_t j = 0;
  float r = z[0];
  if (n >= W) {
    Vec<float>::type m = vload(z);
    for (j = W; j + W <= n; j += W) {
      const Vec<float>::type v = vload(z + j);
      m = m > v ? m : v;
    }
    r = hmax(m);
  }
  for (; j < n; ++j) r = r > z[j] ? r : z[j];
  return r;
}

// sum_j z_j.
static inline float row_sum(const float* z, int64_t n) {
  constexpr int W = Vec<float>::W;
  Vec<float>::type a{}, b{};
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    a += vload(z + j);
    b += vload(z + j + W);
  }
  for (; j + W <= n; j += W) a += vload(z + j);
  float r = hsum(a + b);
  for (; j < n; ++j) r += z[j];
  return r;
}

// sum_j exp(z_j - shift), z unchanged.
static inline float row_sum_exp(const float* z, int64_t n, float shift) {
  constexpr int W = Vec<float>::W;
  Vec<float>::type a{}, b{};
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    a += vexp0(vload(z + j) - shift);
    b += vexp0(vload(z + j + W) - shift);
  }
  for (; j + W <= n; j += W) a += vexp0(vload(z + j) - shift);
  float r = hsum(a + b);
  for (; j < n; ++j) r += exp0(z[j] - shift);
  return r;
}

// z_j <- exp(z_j - shift) * scale - offset; returns sum_j exp(z_j - shift).
static inline float row_exp(float* z, int64_t n, float shift, float scale, float offset) {
  constexpr int W = Vec<float>::W;
  Vec<float>::type a{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<float>::type e = vexp0(vload(z + j) - shift);
    a += e;
    vstore(z + j, e * scale - offset);
  }
  float r = hsum(a);
  for (; j < n; ++j) {
    const float e = exp0(z[j] - shift);
    r += e;
    z[j] = e * scale - offset;
  }
  return r;
}

// z_j <- z_j * scale - offset.
static inline void row_scale(float* z, int64_t n, float scale, float offset) {
  constexpr int W = Vec<float>::W;
  int64_t j = 0;
  for (; j + W <= n; j += W) vstore(z + j, vload(z + j) * scale - offset);
  for (; j < n; ++j) z[j] = z[j] * scale - offset;
}

static inline double row_max(const double* z, int64_t n) {
  double r = z[0];
  for (int64_t j = 1; j < n; ++j) r = r > z[j] ? r : z[j];
  return r;
}
static inline double row_sum(const double* z, int64_t n) {
  double r = 0;
  for (int64_t j = 0; j < n; ++j) r += z[j];
  return r;
}
static inline double row_sum_exp(const double* z, int64_t n, double shift) {
  double r = 0;
  for (int64_t j = 0; j < n; ++j) r += std::exp(z[j] - shift);
  return r;
}
static inline double row_exp(double* z, int64_t n, double shift, double scale, double offset) {
  double r = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(z[j] - shift);
    r += e;
    z[j] = e * scale - offset;
  }
  return r;
}
static inline void row_scale(double* z, int64_t n, double scale, double offset) {
  for (int64_t j = 0; j < n; ++j) z[j] = z[j] * scale - offset;
}
