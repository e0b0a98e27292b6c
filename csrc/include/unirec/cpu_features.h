// Run-time CPU feature checks for kernels compiled twice (AVX2+FMA and baseline).
#pragma once

namespace unirec {

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace unirec
