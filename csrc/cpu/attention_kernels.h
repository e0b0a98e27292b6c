// Per-sequence, per-head jagged attention kernels on contiguous float32 or
// float64 buffers. This file is included three times by attention.cpp: under
// `#pragma GCC target` for AVX-512 and for AVX2+FMA, and for the baseline ISA,
// each time inside its own namespace after simd.h (the vector types for
// UNIREC_VEC_BYTES, 64 or 32), so it has no include guard and includes
// nothing (attention.cpp includes <algorithm>, <cmath>, <cstdint>, <cstring>
// first). Every length a vector loop runs over (kBK, kSub, the padded head
// dims) is a multiple of 16 floats, so one code serves both widths.
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
constexpr int kSub = 32;   // on the causal diagonal, row blocks that see < kSub keys compute only kSub columns
constexpr int kRows = 30;  // rows of such a block (a multiple of the micro-kernels' 3 and 6 rows)

// Register-blocked C[MR rows][NV vectors] (+)= A[MR][K] B[K][NV*W]; with TA,
// A is stored transposed (element (r, k) at A[k * lda + r]).
template <typename T, int NV, int MR, bool ACC, bool TA>
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
      const V a = vbroadcast<T>(TA ? A[k * lda + r] : A[r * lda + k]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
}

// C[M][N] (+)= op(A)[M][K] B[K][N], N a compile-time multiple of the vector
// width; op(A) = A [M][K] (row stride lda) or, with TA, A^T for A [K][M].
template <typename T, int N, bool ACC, bool TA = false>
static inline void gemm(int M, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc) {
  constexpr int W = Vec<T>::W;
  constexpr int NC = (N % (4 * W) == 0) ? 4 * W : ((N % (2 * W) == 0) ? 2 * W : W);
  constexpr int NV = NC / W;
  constexpr int MR = NV == 4 ? 3 : (NV == 2 ? 6 : 8);
  for (int n0 = 0; n0 < N; n0 += NC) {
    int i = 0;
    for (; i + MR <= M; i += MR)
      micro<T, NV, MR, ACC, TA>(K, TA ? A + i : A + i * lda, lda, B + n0, ldb, C + i * ldc + n0, ldc);
    for (; i < M; ++i)
      micro<T, NV, 1, ACC, TA>(K, TA ? A + i : A + i * lda, lda, B + n0, ldb, C + i * ldc + n0, ldc);
  }
}

// exp on n (a multiple of the vector width) floats in place: x <- exp(x - shift) (simd.h's vexp).
static inline void exp_shift(float* x, int n, float shift) {
  for (int j = 0; j < n; j += Vec<float>::W) vstore(x + j, vexp(vload(x + j) - shift));
}
static inline void exp_shift(double* x, int n, double shift) {
  for (int j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// max and sum of n (a multiple of the vector width) values, vectorised.
template <typename T>
static inline T vmax(const T* x, int n) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V m = vload(x);
  for (int j = W; j < n; j += W) {
    const V v = vload(x + j);
    m = m > v ? m : v;
  }
  T r = m[0];
  for (int w = 1; w < W; ++w) r = r > m[w] ? r : m[w];
  return r;
}
template <typename T>
static inline T vsum(const T* x, int n) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V a = vload(x), b = V{};
  int j = W;
  for (; j + W < n; j += 2 * W) {
    a += vload(x + j);
    b += vload(x + j + W);
  }
  for (; j < n; j += W) a += vload(x + j);
  a += b;
  T r = 0;
  for (int w = 0; w < W; ++w) r += a[w];
  return r;
}

// sg <- sigmoid(x) on n (a multiple of the vector width) values.
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

// S[mq][kBK] = A[mq][DP] Bt, Bt one transposed tile [DP][kBK]. Rows see the
// keys before nvr[r] (non-decreasing in r; callers mask the rest): rows that
// see none are skipped, and leading blocks of kRows rows that see fewer than
// kSub keys compute only kSub columns.
template <typename T, int DP>
static inline void scores(int mq, const int* nvr, const T* A, const T* Bt, T* S) {
  int r = 0;
  while (r < mq && nvr[r] == 0) ++r;
  for (; r < mq; r += kRows) {
    const int e = std::min(r + kRows, mq);
    if (nvr[e - 1] > kSub) break;
    gemm<T, kSub, false>(e - r, DP, A + (int64_t)r * DP, DP, Bt, kBK, S + r * kBK, kBK);
  }
  if (r < mq) gemm<T, kBK, false>(mq - r, DP, A + (int64_t)r * DP, DP, Bt, kBK, S + r * kBK, kBK);
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
      int nvr[kBQ];  // visible keys of each row in this tile, non-decreasing in the row
      for (int r = 0; r < mq; ++r) nvr[r] = std::max(0, std::min(hi(a, q0 + r) - k0, kBK));
      scores<T, DP>(mq, nvr, Qs + (int64_t)q0 * DP, Ktb + (int64_t)k0 * DP, S);
      for (int r = 0; r < mq; ++r) {
        const int i = q0 + r;
        const int nv = nvr[r];
        T* row = S + r * kBK;
        if (a.rb) for (int j = 0; j < nv; ++j) row[j] += a.rb[std::abs(i - k0 - j)];
        if (a.silu) {
          T sg[kBK];
          sigmoid(row, sg, kBK);
          for (int j = 0; j < nv; ++j) row[j] = row[j] * sg[j] * a.inv_n;
        } else if (nv > 0) {
          for (int j = nv; j < kBK; ++j) row[j] = T(-1e30);
          const T mnew = std::max(m[r], vmax(row, kBK));
          const T alpha = std::exp(m[r] - mnew);
          exp_shift(row, kBK, mnew);
          for (int j = nv; j < kBK; ++j) row[j] = T(0);
          l[r] = l[r] * alpha + vsum(row, kBK);
          m[r] = mnew;
          if (alpha != T(1)) {
            T* o = Ot + r * DP;
            for (int d = 0; d < DP; ++d) o[d] *= alpha;
          }
        }
        for (int j = nv; j < kBK; ++j) row[j] = T(0);
      }
      gemm<T, DP, true>(mq, nvr[mq - 1], S, kBK, V + (int64_t)k0 * DP, DP, Ot, DP);  // O += P V
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
// Scratch: S (scores, then P) and dP (then dS), each kBQ*kBK.
template <typename T, int DP>
void bwd_seq(const SeqArgs<T>& a, const T* Qs, const T* K, const T* Ktb, const T* Vtb, const T* dO, const T* lse,
             const T* delta, T* dQ, T* dK, T* dV, T* drb, T* S, T* dP) {
  const int L = a.L;
  for (int k0 = 0; k0 < a.t0; k0 += kBK) {
    const int mk = std::min(kBK, a.t0 - k0);
    const int qstart = a.causal ? (k0 / kBQ) * kBQ : 0;
    for (int q0 = qstart; q0 < L; q0 += kBQ) {
      const int mq = std::min(kBQ, L - q0);
      if (hi(a, q0 + mq - 1) <= k0) continue;
      int nvr[kBQ];
      for (int r = 0; r < mq; ++r) nvr[r] = std::max(0, std::min(hi(a, q0 + r) - k0, mk));
      scores<T, DP>(mq, nvr, Qs + (int64_t)q0 * DP, Ktb + (int64_t)k0 * DP, S);
      scores<T, DP>(mq, nvr, dO + (int64_t)q0 * DP, Vtb + (int64_t)k0 * DP, dP);
      for (int r = 0; r < mq; ++r) {
        const int i = q0 + r;
        const int nv = nvr[r];
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
      // dV += P^T dO, dK += dS^T Qs
      gemm<T, DP, true, true>(mk, mq, S, kBK, dO + (int64_t)q0 * DP, DP, dV + (int64_t)k0 * DP, DP);
      gemm<T, DP, true, true>(mk, mq, dP, kBK, Qs + (int64_t)q0 * DP, DP, dK + (int64_t)k0 * DP, DP);
      // dQ += dS K
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
      case 48: return fwd_seq<T, 48>(a, Qs, Ktb, V, O, lse, S);                                                  \
      case 64: return fwd_seq<T, 64>(a, Qs, Ktb, V, O, lse, S);                                                  \
      case 96: return fwd_seq<T, 96>(a, Qs, Ktb, V, O, lse, S);                                                  \
      case 128: return fwd_seq<T, 128>(a, Qs, Ktb, V, O, lse, S);                                                \
      default: return fwd_seq<T, 256>(a, Qs, Ktb, V, O, lse, S);                                                 \
    }                                                                                                            \
  }                                                                                                              \
  inline void bwd(int DP, const SeqArgs<T>& a, const T* Qs, const T* K, const T* Ktb, const T* Vtb, const T* dO, \
                  const T* lse, const T* delta, T* dQ, T* dK, T* dV, T* drb, T* S, T* dP) {               \
    switch (DP) {                                                                                                \
      case 16: return bwd_seq<T, 16>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);            \
      case 32: return bwd_seq<T, 32>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);            \
      case 48: return bwd_seq<T, 48>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);            \
      case 64: return bwd_seq<T, 64>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);            \
      case 96: return bwd_seq<T, 96>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);            \
      case 128: return bwd_seq<T, 128>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);          \
      default: return bwd_seq<T, 256>(a, Qs, K, Ktb, Vtb, dO, lse, delta, dQ, dK, dV, drb, S, dP);           \
    }                                                                                                            \
  }
UNIREC_ATTN_ENTRIES(float)
UNIREC_ATTN_ENTRIES(double)
#undef UNIREC_ATTN_ENTRIES
