// GCC vector types for the package's kernels (pool2x2.cpp, conv_pool.cpp): a block of channels is one vector as
// wide as the host's widest register, 16 fp32 lanes with AVX-512, 8 with AVX2, 4 with SSE or NEON. A vector
// wider than the registers is kept in memory and split at every operation: with 16 lanes on AVX2
// (-march=x86-64-v3) the kernels ran 12x slower than with 8 (BENCHMARKS.md, "CPU-4 held to AVX2"). Each
// channel's arithmetic is the same at any width. native.py hashes this file into the libraries' names.

#pragma once

#include <cstdint>
#include <cstring>

namespace vectors {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX2__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float VF __attribute__((vector_size(4 * kLanes)));     // kLanes x fp32
typedef int32_t VI __attribute__((vector_size(4 * kLanes)));   // kLanes x int32: masks and indices
typedef uint32_t VU __attribute__((vector_size(4 * kLanes)));  // kLanes x uint32: bit patterns
typedef uint16_t VH __attribute__((vector_size(2 * kLanes)));  // kLanes x bf16 bit patterns
typedef uint8_t VB __attribute__((vector_size(kLanes)));       // kLanes x uint8: winners

inline VF load(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline VF load(const uint16_t* p) {  // bf16 -> fp32 is exact: the bits are fp32's upper half
  VH h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<VF>(__builtin_convertvector(h, VU) << 16);
}
// a vector load() read, back to its type's bits unchanged (fp32 -> bf16 drops the lower half, which load() zeroed)
inline void store_loaded(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
inline void store_loaded(uint16_t* p, VF v) {
  const VH h = __builtin_convertvector(reinterpret_cast<VU>(v) >> 16, VH);
  std::memcpy(p, &h, sizeof h);
}
// a computed vector, rounded to the type as torch rounds: fp32 as it is; bf16 to nearest, ties to even, and any
// NaN as 0x7FC0 (c10's round_to_nearest_even)
inline void store_rounded(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
inline void store_rounded(uint16_t* p, VF v) {
  const VU bits = reinterpret_cast<VU>(v);
  const VU rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const VH h = __builtin_convertvector((v != v) ? VU{} + 0x7FC0u : rounded, VH);
  std::memcpy(p, &h, sizeof h);
}
inline void store_winners(uint8_t* p, VI which) {
  const VB narrow = __builtin_convertvector(which, VB);
  std::memcpy(p, &narrow, sizeof narrow);
}

}  // namespace vectors
