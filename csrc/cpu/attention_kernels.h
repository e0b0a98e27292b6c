// Per-sequence, per-head jagged attention kernels on contiguous float32 or
// float64 buffers. This file is included twice by attention.cpp: once under
// `#pragma GCC target("avx2,fma")` and once for the baseline ISA, each time
// inside its own namespace, so it has no include guard and includes nothing
// (attention.cpp includes <algorithm>, <cmath>, <cstdint>, <cstring> first).
//
// Layout of one (sequence, head) work item, L tokens, head dim padded to DP
// (a multiple of 16, zero-filled), Lp = L rounded up to kBK:
//   Qs  [Lp][DP]        q * scale
//   K   [Lp][DP]        k                (backward only)
//   Ktb [Lp/kBK][DP][kBK] k, transposed tile by tile (scores are vectorised over keys)
//   V   [Lp][DP]        v                (forward)
//   Vtb [Lp/kBK][DP][kBK] v, transposed tile by tile (backward: dP = dO V^T)
// Token i sees the non-target keys j < hi(i) (a prefix, see `hi`) and, when it
// is a target (i >= t0), itself; that diagonal term is handled per row after
// the tiled loop, so every tile mask is a per-row prefix.

constexpr int kBQ = 64;  // query rows per tile
constexpr int kBK = 64;  // keys per tile

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32), aligned(4), may_alias));
  typedef int32_t itype __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr int W = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr int W = 4;
};

template <typename T>
static inline typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
static inline void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

// Register-blocked C[MR rows][NV vectors] (+)= A[MR][K] B[K][NV*W].
template <typename T, int NV, int MR, bool ACC>
static inline void micro(int K, const T* __restrict A, int lda, const T* __restrict B, int ldb, T* __restrict C,
                         int ldc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? vload(C + r * ldc + v * W) : V{};
  for (int k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V a = V{} + A[r * lda + k];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
}

// C[M][N] (+)= A[M][K] B[K][N], N a compile-time multiple of the vector width.
template <typename T, int N, bool ACC>
static inline void gemm(int M, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc) {
  constexpr int W = Vec<T>::W;
  constexpr int NC = (N % (4 * W) == 0) ? 4 * W : ((N % (2 * W) == 0) ? 2 * W : W);
  constexpr int NV = NC / W;
  constexpr int MR = NV == 4 ? 3 : (NV == 2 ? 6 : 8);
  for (int n0 = 0; n0 < N; n0 += NC) {
    int i = 0;
    for (; i + MR <= M; i += MR) micro<T, NV, MR, ACC>(K, A + i * lda, lda, B + n0, ldb, C + i * ldc + n0, ldc);
    for (; i < M; ++i) micro<T, NV, 1, ACC>(K, A + i * lda, lda, B + n0, ldb, C + i * ldc + n0, ldc);
  }
}

// exp on n (a multiple of 8) floats in place: x <- exp(x - shift). Cephes
// polynomial after range reduction by 2^n; relative error ~1e-7.
static inline void exp_shift(float* x, int n, float shift) {
  using V = Vec<float>::type;
  using VI = Vec<float>::itype;
  for (int j = 0; j < n; j += 8) {
    V v = vload(x + j) - shift;
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
    vstore(x + j, p * s);
  }
}
static inline void exp_shift(double* x, int n, double shift) {
  for (int j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// sg <- sigmoid(x) on n (a multiple of 8) values.
static inline void sigmoid(const float* x, float* sg, int n) {
  for (int j = 0; j < n; ++j) sg[j] = -x[j];
  exp_shift(sg, n, 0.0f);
  for (int j = 0; j < n; ++j) sg[j] = 1.0f / (1.0f + sg[j]);
}
static inline void sigmoid(const double* x, double* sg, int n) {
  for (int j = 0; j < n; ++j) sg[j] = 1.0 / (1.0 + std::exp(-x[j]));
}

template <typename T>
struct SeqArgs {
  int L;        // tokens
  int t0;       // first target token (L without targets)
  bool causal;
  bool silu;
  T inv_n;      // 1 / max_seqlen (silu)
  const T* rb;  // rel_bias row of this head [max_seqlen] or nullptr
};

template <typename T>
static inline int hi(const SeqArgs<T>& a, int i) {
  return i < a.t0 ? (a.causal ? i + 1 : a.t0) : a.t0;
}

// Forward of one (sequence, head). O [Lp][DP] receives the normalised output,
// lse [L] the log-sum-exp (softmax). S is a kBQ*kBK scratch tile.
template <typename T, int DP>
void fwd_seq(const SeqArgs<T>& a, const T* Qs, const T* Ktb, const T* V, T* O, T* lse, T* S) {
  const int L = a.L;
  T m[kBQ], l[kBQ];
  for (int q0 = 0; q0 < L; q0 += kBQ) {
    const int mq = std::min(kBQ, L - q0);
    const int kend = hi(a, q0 + mq - 1);
    T* Ot = O + (int64_t)q0 * DP;
    std::fill(Ot, Ot + (int64_t)mq * DP, T(0));
    for (int r = 0; r < mq; ++r) { m[r] = T(-1e30); l[r] = T(0); }
    for (int k0 = 0; k0 < kend; k0 += kBK) {
      gemm<T, kBK, false>(mq, DP, Qs + (int64_t)q0 * DP, DP, Ktb + (int64_t)k0 * DP, kBK, S, kBK);
      for (int r = 0; r < mq; ++r) {
        const int i = q0 + r;
        const int nv = std::max(0, std::min(hi(a, i) - k0, kBK));
        T* row = S + r * kBK;
        if (a.rb) for (int j = 0; j < nv; ++j) row[j] += a.rb[std::abs(i - k0 - j)];
        if (a.silu) {
          T sg[kBK];
          sigmoid(row, sg, kBK);
          for (int j = 0; j < nv; ++j) row[j] = row[j] * sg[j] * a.inv_n;
        } else if (nv > 0) {
          T mx = row[0];
          for (int j = 1; j < nv; ++j) mx = std::max(mx, row[j]);
          const T mnew = std::max(m[r], mx);
          const T alpha = std::exp(m[r] - mnew);
          exp_shift(row, kBK, mnew);
          T sum = 0;
          for (int j = 0; j < nv; ++j) sum += row[j];
          l[r] = l[r] * alpha + sum;
          m[r] = mnew;
          if (alpha != T(1)) {
            T* o = Ot + r * DP;
            for (int d = 0; d < DP; ++d) o[d] *= alpha;
          }
        }
        for (int j = nv; j < kBK; ++j) row[j] = T(0);
      }
      gemm<T, DP, true>(mq, std::min(kBK, kend - k0), S, kBK, V + (int64_t)k0 * DP, DP, Ot, DP);
    }
    for (int r = 0; r < mq; ++r) {
      const int i = q0 + r;
      T* o = Ot + r * DP;
      if (i >= a.t0) {  // a target also sees itself
        const T* q = Qs + (int64_t)i * DP;
        const T* kt = Ktb + (int64_t)(i / kBK) * kBK * DP + (i % kBK);
        T s = 0;
        for (int d = 0; d < DP; ++d) s += q[d] * kt[d * kBK];
        if (a.rb) s += a.rb[0];
        const T* v = V + (int64_t)i * DP;
        if (a.silu) {
          const T p = s / (T(1) + std::exp(-s)) * a.inv_n;
          for (int d = 0; d < DP; ++d) o[d] += p * v[d];
        } else {
          const T mnew = std::max(m[r], s);
          const T alpha = std::exp(m[r] - mnew), p = std::exp(s - mnew);
          l[r] = l[r] * alpha + p;
          m[r] = mnew;
          for (int d = 0; d < DP; ++d) o[d] = o[d] * alpha + p * v[d];
        }
      }
      if (!a.silu) {
        const T inv = T(1) / l[r];
        for (int d = 0; d < DP; ++d) o[d] *= inv;
        lse[i] = m[r] + std::log(l[r]);
      }
    }
  }
}

// Backward of one (sequence, head), flash-attention-2 order: for each key
// tile, every query tile that sees it; probabilities are recomputed from lse.
// dQ, dK, dV [Lp][DP] must be zero on entry; dQ comes out without the scale
// factor (the caller multiplies). drb [max_seqlen] accumulates d rel_bias.
// Scratch: S, P, dS each kBQ*kBK, Tr kBK*kBQ.
template <typename T, int DP>
void bwd_seq(const SeqArgs<T>& a, const T* Qs, const T* K, const T* Ktb, const T* Vtb, const T* dO, const T* lse,
             const T* delta, T* dQ, T* dK, T* dV, T* drb, T* S, T* dP, T* Tr) {
  const int L = a.L;
  for (int k0 = 0; k0 < a.t0; k0 += kBK) {
    const int mk = std::min(kBK, a.t0 - k0);
    const int qstart = a.causal ? (k0 / kBQ) * kBQ : 0;
    for (int q0 = qstart; q0 < L; q0 += kBQ) {
      const int mq = std::min(kBQ, L - q0);
      if (hi(a, q0 + mq - 1) <= k0) continue;
      gemm<T, kBK, false>(mq, DP, Qs + (int64_t)q0 * DP, DP, Ktb + (int64_t)k0 * DP, kBK, S, kBK);
      gemm<T, kBK, false>(mq, DP, dO + (int64_t)q0 * DP, DP, Vtb + (int64_t)k0 * DP, kBK, dP, kBK);
      for (int r = 0; r < mq; ++r) {
        const int i = q0 + r;
        const int nv = std::max(0, std::min(hi(a, i) - k0, mk));
        T* s = S + r * kBK;
        T* dp = dP + r * kBK;
        if (a.rb) for (int j = 0; j < nv; ++j) s[j] += a.rb[std::abs(i - k0 - j)];
        if (a.silu) {
          T sg[kBK];
          sigmoid(s, sg, kBK);
          for (int j = 0; j < nv; ++j) {
            const T x = s[j];
            s[j] = x * sg[j] * a.inv_n;
            dp[j] = dp[j] * sg[j] * (T(1) + x * (T(1) - sg[j])) * a.inv_n;
          }
        } else {
          exp_shift(s, kBK, lse[i]);
          const T dl = delta[i];
          for (int j = 0; j < nv; ++j) dp[j] = s[j] * (dp[j] - dl);
        }
        for (int j = nv; j < kBK; ++j) { s[j] = T(0); dp[j] = T(0); }
        if (drb) for (int j = 0; j < nv; ++j) drb[std::abs(i - k0 - j)] += dp[j];
      }
      // dV += P^T dO, dK += dS^T Qs, dQ += dS K
      for (int j = 0; j < mk; ++j)
        for (int r = 0; r < mq; ++r) Tr[j * kBQ + r] = S[r * kBK + j];
      gemm<T, DP, true>(mk, mq, Tr, kBQ, dO + (int64_t)q0 * DP, DP, dV + (int64_t)k0 * DP, DP);
      for (int j = 0; j < mk; ++j)
        for (int r = 0; r < mq; ++r) Tr[j * kBQ + r] = dP[r * kBK + j];
      gemm<T, DP, true>(mk, mq, Tr, kBQ, Qs + (int64_t)q0 * DP, DP, dK + (int64_t)k0 * DP, DP);
      gemm<T, DP, true>(mq, mk, dP, kBK, K + (int64_t)k0 * DP, DP, dQ + (int64_t)q0 * DP, DP);
    }
  }
  for (int i = a.t0; i < L; ++i) {  // targets: the diagonal term
    const T* q = Qs + (int64_t)i * DP;
    const T* k = K + (int64_t)i * DP;
    const T* vt = Vtb + (int64_t)(i / kBK) * kBK * DP + (i % kBK);
    const T* g = dO + (int64_t)i * DP;
    T s = 0, dp = 0;
    for (int d = 0; d < DP; ++d) { s += q[d] * k[d]; dp += g[d] * vt[d * kBK]; }
    if (a.rb) s += a.rb[0];
    T p, ds;
    if (a.silu) {
      const T sg = T(1) / (T(1) + std::exp(-s));
      p = s * sg * a.inv_n;
      ds = dp * sg * (T(1) + s * (T(1) - sg)) * a.inv_n;
    } else {
      p = std::exp(s - lse[i]);
      ds = p * (dp - delta[i]);
    }
    if (drb) drb[0] += ds;
    T* dq = dQ + (int64_t)i * DP;
    T* dk = dK + (int64_t)i * DP;
    T* dv = dV + (int64_t)i * DP;
    for (int d = 0; d < DP; ++d) {
      dv[d] += p * g[d];
      dk[d] += ds * q[d];
      dq[d] += ds * k[d];
    }
  }
}

// Entry points, one per padded head dim, called by attention.cpp.
#define UNIREC_ATTN_ENTRIES(T)                                                                                   \
  inline void fwd(int DP, const SeqArgs<T>& a, const T* Qs, const T* Ktb, const T* V, T* O, T* lse, T* S) {     \
    switch (DP) {                                                                                                \
      case 16: return fwd_seq<T, 16>(a, Qs, Ktb, V, O, lse, S);                                                  \
      case 32: return fwd_seq<T, 32>(a, Qs, Ktb, V, O, lse, S);                                                  \
      case 64: return fwd_seq<T, 64>(a, Qs, Ktb, V, O, lse, S);                                                  \
      case 128: return fwd_seq<T, 128>(a, Qs, Ktb, V, O, lse, S);                                                \
      default: return fwd_seq<T, 256>(a, Qs, Ktb, V, O, lse, S);                                                 \
    }                                                                                                            \
  }                                                                                                              \
  inline void bwd(int DP, const SeqArgs<T>& a, const T* Qs, const T* K, const T* Ktb, const T* Vtb, const T* dO, \
                  const T* lse, const T* delta, T* dQ, T* dK, T* dV, T* drb, T* S, T* dP, T* Tr) {               \
    switch (DP) {                                                                                                \
      case 16: return bwd_seq<T, 16>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP, Tr);            \
      case 32: return bwd_seq<T, 32>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP, Tr);            \
      case 64: return bwd_seq<T, 64>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP, Tr);            \
      case 128: return bwd_seq<T, 128>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP, Tr);          \
      default: return bwd_seq<T, 256>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP, Tr);           \
    }                                                                                                            \
  }
UNIREC_ATTN_ENTRIES(float)
UNIREC_ATTN_ENTRIES(double)
#undef UNIREC_ATTN_ENTRIES
