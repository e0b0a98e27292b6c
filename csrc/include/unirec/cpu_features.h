// The instruction set the CPU kernels run with. Kernels compiled more than
// once (AVX-512, AVX2+FMA, baseline) pick a variant per call from cpu_isa():
// what the CPU supports, capped by UNIREC_CPU_ISA=avx512|avx2|baseline, so
// that every variant can be tested and compared on one machine.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "unirec/checks.h"

namespace unirec {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
    return CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

inline CpuIsa cpu_isa() {
  const char* cap = std::getenv("UNIREC_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return cpu_isa_supported();
  CpuIsa want = CpuIsa::kBaseline;
  if (std::strcmp(cap, "avx512") == 0) {
    want = CpuIsa::kAvx512;
  } else if (std::strcmp(cap, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else {
    UNIREC_CHECK(std::strcmp(cap, "baseline") == 0, "UNIREC_CPU_ISA must be avx512, avx2 or baseline, got '", cap,
                 "'");
  }
  return std::min(want, cpu_isa_supported());
}

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "baseline";
}

inline bool cpu_has_avx2_fma() { return cpu_isa() >= CpuIsa::kAvx2; }

}  // namespace unirec
