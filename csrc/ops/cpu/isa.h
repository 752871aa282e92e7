// Runtime choice of the CPU instruction set. The kernels of a family are compiled once per
// instruction set into their own namespace (see gram.cpp), so one binary runs fast on AVX-512
// and AVX2 machines and correctly everywhere else; this header says which one to call.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define PYX_X86_MULTIVERSION 1
#else
#define PYX_X86_MULTIVERSION 0
#endif

namespace pyxtask::cpu {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa detect_isa() {
#if PYX_X86_MULTIVERSION
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBase;
}

inline Isa current_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// AVX512-BF16 (vdpbf16ps) for the bfloat16 Gram, on top of kAvx512.
inline bool has_avx512_bf16() {
#if PYX_X86_MULTIVERSION
  static const bool yes = current_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return has_avx512_bf16() ? "avx512+bf16" : "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

}  // namespace pyxtask::cpu
