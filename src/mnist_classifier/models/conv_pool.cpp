// 3x3 convolutions (padding 1, stride 1) followed by 2x2 max-pooling (stride 2, floor mode) and optionally ReLU,
// for CPU tensors in fp32 or bf16 (models/pooling.py calls them):
// - a first layer (one input channel) in one pass, forward and backward;
// - the backward of a wider layer (16k input channels) whose forward is torch's convolution and pool2x2.cpp.
//
// Why: the guide CNN's first convolution has one input channel, which oneDNN computes at about a sixth of the
// rate of the second (53 against 322 GFLOP/s in bf16 on a 2-core Zen 4, benchmarks/step_profile.py). Fused
// with the pool, its output never reaches memory at full size. And after a pool only each window's winner
// has a gradient, so both layers' backward passes sum over a quarter of the positions a dense backward visits.
//
// The first layer's layout: x is (B, H, W) (one channel: NCHW and channels_last are the same memory), weight
// (O, 9) taps, bias (O), y (B, H/2, W/2, O) channels_last, idx (B, H/2, W/2, O): 0-3 the window's winner
// (row-major), 4 zeroed by the ReLU. O % 16 == 0. Arithmetic is fp32; a bf16 convolution output is rounded to
// bf16 (round to nearest even) before the pool compares it, as the unfused layers store it.
//
// The channels of a block are one GCC vector (vector_size) as wide as the host's widest register: 16 fp32 with
// AVX-512, 8 with AVX2, 4 with SSE or NEON. A vector wider than the registers is kept in memory and split at
// every operation: with 16 lanes on AVX2 (-march=x86-64-v3) these kernels ran 12x slower than with 8, slower
// than torch's layers (BENCHMARKS.md, "CPU-4 held to AVX2"). Each channel's arithmetic is the same at any width.

#include <omp.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX2__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
constexpr int kTaps = 9;
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
inline void store(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
// fp32 -> bf16 in fp32's upper half, round to nearest even; NaN stays NaN (quiet)
inline VU bf16_bits(VF v) {
  const VU u = reinterpret_cast<VU>(v);
  const VU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return ((u & 0x7fffffffu) > 0x7f800000u) ? ((u | 0x00400000u) & 0xffff0000u) : rounded;
}
inline void store(uint16_t* p, VF v) {
  const VH h = __builtin_convertvector(bf16_bits(v) >> 16, VH);
  std::memcpy(p, &h, sizeof h);
}
// one value, as store() writes each of a vector's: unchanged for fp32, rounded to nearest even for bf16
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = static_cast<uint16_t>(bf16_bits(VF{} + v)[0] >> 16); }
// v as a tensor of type T holds it: unchanged for fp32, rounded to bf16 (exact in fp32) for bf16
inline VF as_stored(VF v, float) { return v; }
inline VF as_stored(VF v, uint16_t) { return reinterpret_cast<VF>(bf16_bits(v)); }

inline float scalar(float v) { return v; }
inline float scalar(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// The 4x4 input patch around output row ``row`` (= b * H/2 + oh), column ow: the window at (2*oh, 2*ow) of
// image b, rows 2oh-1..2oh+2 and columns 2ow-1..2ow+2, zero outside the image.
template <typename T>
inline void load_patch(const T* x, int64_t height, int64_t width, int64_t row, int64_t ow, float patch[4][4]) {
  const int64_t oh = row % (height / 2);
  const T* image = x + row / (height / 2) * height * width;
  for (int r = 0; r < 4; r++) {
    const int64_t h = 2 * oh - 1 + r;
    for (int c = 0; c < 4; c++) {
      const int64_t w = 2 * ow - 1 + c;
      patch[r][c] = (h >= 0 && h < height && w >= 0 && w < width) ? scalar(image[h * width + w]) : 0.0f;
    }
  }
}

template <typename T>
void forward(const T* x, const T* weight, const T* bias, T* y, uint8_t* idx, int64_t batch, int64_t height,
             int64_t width, int64_t out_channels, int relu, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = out_channels / kLanes;
  std::vector<VF> taps(blocks * kTaps), shift(blocks);  // taps[block][k]: the block's weights of tap k
  for (int64_t o = 0; o < out_channels; o++) {
    for (int k = 0; k < kTaps; k++) taps[(o / kLanes) * kTaps + k][o % kLanes] = scalar(weight[o * kTaps + k]);
    shift[o / kLanes][o % kLanes] = scalar(bias[o]);
  }
#pragma omp parallel for num_threads(threads)
  for (int64_t row = 0; row < batch * out_h; row++) {
    for (int64_t ow = 0; ow < out_w; ow++) {
      float patch[4][4];
      load_patch(x, height, width, row, ow, patch);
      for (int64_t blk = 0; blk < blocks; blk++) {
        const VF* tap = &taps[blk * kTaps];
        auto output = [&](int j) {  // the window's convolution output j (row-major), as the tensor holds it
          VF acc = {};
          for (int kh = 0; kh < 3; kh++)
            for (int kw = 0; kw < 3; kw++) acc += patch[j / 2 + kh][j % 2 + kw] * tap[kh * 3 + kw];
          return as_stored(acc + shift[blk], T(0));
        };
        VF best = output(0);
        VI arg = {};
        for (int j = 1; j < 4; j++) {
          const VF v = output(j);
          const VI wins = (v > best) | (v != v);  // torch's rule: greater, or NaN, replaces
          best = wins ? v : best;
          arg = wins ? VI{} + j : arg;
        }
        const VI zeroed = relu ? (best <= 0.0f) : VI{};  // ReLU keeps NaN, as torch's does
        const int64_t at = (row * out_w + ow) * out_channels + blk * kLanes;
        store(y + at, zeroed ? VF{} : best);
        const VB which = __builtin_convertvector(zeroed ? VI{} + 4 : arg, VB);
        std::memcpy(idx + at, &which, sizeof which);
      }
    }
  }
}

// Gradients of the weight (O, 9) and bias (O), summed in fp32: per thread over a fixed share of the rows, then
// the threads' sums in thread order, so the same thread count gives the same bits every run.
template <typename T>
void backward(const T* x, const uint8_t* idx, const T* grad_y, T* grad_weight, T* grad_bias, int64_t batch,
              int64_t height, int64_t width, int64_t out_channels, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = out_channels / kLanes;
  const int64_t per = blocks * (kTaps + 1);  // per thread and block: 9 taps, then the bias
  std::vector<VF> partial(threads * per, VF{});
#pragma omp parallel num_threads(threads)
  {
    VF* acc = &partial[omp_get_thread_num() * per];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < batch * out_h; row++) {
      for (int64_t ow = 0; ow < out_w; ow++) {
        float patch[4][4];
        load_patch(x, height, width, row, ow, patch);
        for (int64_t blk = 0; blk < blocks; blk++) {
          const int64_t at = (row * out_w + ow) * out_channels + blk * kLanes;
          const VF g = load(grad_y + at);
          VB which8;
          std::memcpy(&which8, idx + at, sizeof which8);
          const VI which = __builtin_convertvector(which8, VI);
          VF* sum = acc + blk * (kTaps + 1);
          for (int j = 0; j < 4; j++) {  // the winner's gradient flows through its own 3x3 patch
            const VF gj = (which == j) ? g : VF{};
            for (int kh = 0; kh < 3; kh++)
              for (int kw = 0; kw < 3; kw++) sum[kh * 3 + kw] += gj * patch[j / 2 + kh][j % 2 + kw];
            sum[kTaps] += gj;
          }
        }
      }
    }
  }
  for (int64_t blk = 0; blk < blocks; blk++) {
    for (int k = 0; k <= kTaps; k++) {
      VF total = {};
      for (int t = 0; t < threads; t++) total += partial[t * per + blk * (kTaps + 1) + k];
      T out[kLanes];
      store(out, total);
      for (int64_t lane = 0; lane < kLanes; lane++) {
        const int64_t o = blk * kLanes + lane;
        if (k < kTaps)
          grad_weight[o * kTaps + k] = out[lane];
        else
          grad_bias[o] = out[lane];
      }
    }
  }
}


// The backward of any 3x3 convolution (padding 1, stride 1; C input channels, C % 16 == 0) followed by the pool
// above, from the pool's winners alone: only a window's winner has a gradient, so the convolution's gradients
// need a quarter of the positions that a dense backward visits. The forward stays torch's (oneDNN is fast there).
// x (B, H, W, C) and weight (O, 3, 3, C) are channels_last; grad_x (B, H, W, C) is written whole. Per image, the
// input gradient is summed in an fp32 buffer of one thread; the weight and bias gradients per thread, in a fixed
// share of the images, then in thread order: the same thread count gives the same bits every run.
template <typename T>
void backward_wide(const T* x, const T* weight, const uint8_t* idx, const T* grad_y, T* grad_x, T* grad_weight,
                   T* grad_bias, int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t out_channels,
                   int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = channels / kLanes;
  const int64_t per = out_channels * kTaps * blocks;  // per thread: the weight gradient, (O, 9, C) as vectors
  std::vector<VF> partial(threads * per, VF{});
  std::vector<float> partial_bias(threads * out_channels, 0.0f);
  std::vector<VF> taps(per);  // the weight as fp32 vectors, (O, 9, C)
  for (int64_t i = 0; i < per; i++) taps[i] = load(weight + i * kLanes);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    VF* gw = &partial[t * per];
    float* gb = &partial_bias[t * out_channels];
    std::vector<VF> gx(height * width * blocks), in(height * width * blocks);  // this image's, in fp32
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
      std::fill(gx.begin(), gx.end(), VF{});
      for (int64_t i = 0; i < height * width * blocks; i++)
        in[i] = load(x + b * height * width * channels + i * kLanes);
      for (int64_t o = 0; o < out_channels; o++) {
        for (int64_t blk = 0; blk < blocks; blk++) {
          VF acc[kTaps];  // this channel's weight gradient, kept in registers over the image's windows
          const VF* tap = &taps[o * kTaps * blocks + blk];
          for (int k = 0; k < kTaps; k++) acc[k] = gw[(o * kTaps + k) * blocks + blk];
          for (int64_t p = 0; p < out_h * out_w; p++) {
            const int64_t at = (b * out_h * out_w + p) * out_channels + o;
            const uint8_t j = idx[at];
            if (j > 3) continue;  // zeroed by the ReLU: no gradient
            const float g = scalar(grad_y[at]);
            const int64_t h = 2 * (p / out_w) + j / 2, w = 2 * (p % out_w) + j % 2;  // the winner
            if (blk == 0) gb[o] += g;
            for (int kh = 0; kh < 3; kh++) {
              const int64_t hh = h + kh - 1;
              if (hh < 0 || hh >= height) continue;
              for (int kw = 0; kw < 3; kw++) {
                const int64_t ww = w + kw - 1;
                if (ww < 0 || ww >= width) continue;
                const int64_t pixel = (hh * width + ww) * blocks + blk;
                acc[kh * 3 + kw] += g * in[pixel];
                gx[pixel] += g * tap[(kh * 3 + kw) * blocks];
              }
            }
          }
          for (int k = 0; k < kTaps; k++) gw[(o * kTaps + k) * blocks + blk] = acc[k];
        }
      }
      for (int64_t i = 0; i < height * width * blocks; i++)
        store(grad_x + b * height * width * channels + i * kLanes, gx[i]);
    }
  }
  for (int64_t i = 0; i < per; i++) {
    VF total = {};
    for (int t = 0; t < threads; t++) total += partial[t * per + i];
    store(grad_weight + i * kLanes, total);
  }
  for (int64_t o = 0; o < out_channels; o++) {
    float total = 0.0f;
    for (int t = 0; t < threads; t++) total += partial_bias[t * out_channels + o];
    put(grad_bias + o, total);
  }
}

}  // namespace

extern "C" {

void conv_pool_forward_f32(const float* x, const float* w, const float* b, float* y, uint8_t* idx, int64_t n,
                           int64_t h, int64_t wd, int64_t o, int relu, int threads) {
  forward(x, w, b, y, idx, n, h, wd, o, relu, threads);
}

void conv_pool_forward_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y, uint8_t* idx,
                            int64_t n, int64_t h, int64_t wd, int64_t o, int relu, int threads) {
  forward(x, w, b, y, idx, n, h, wd, o, relu, threads);
}

void conv_pool_backward_f32(const float* x, const uint8_t* idx, const float* gy, float* gw, float* gb, int64_t n,
                            int64_t h, int64_t wd, int64_t o, int threads) {
  backward(x, idx, gy, gw, gb, n, h, wd, o, threads);
}

void conv_pool_backward_bf16(const uint16_t* x, const uint8_t* idx, const uint16_t* gy, uint16_t* gw, uint16_t* gb,
                             int64_t n, int64_t h, int64_t wd, int64_t o, int threads) {
  backward(x, idx, gy, gw, gb, n, h, wd, o, threads);
}

void conv_pool_backward_wide_f32(const float* x, const float* w, const uint8_t* idx, const float* gy, float* gx,
                                 float* gw, float* gb, int64_t n, int64_t h, int64_t wd, int64_t c, int64_t o,
                                 int threads) {
  backward_wide(x, w, idx, gy, gx, gw, gb, n, h, wd, c, o, threads);
}

void conv_pool_backward_wide_bf16(const uint16_t* x, const uint16_t* w, const uint8_t* idx, const uint16_t* gy,
                                  uint16_t* gx, uint16_t* gw, uint16_t* gb, int64_t n, int64_t h, int64_t wd,
                                  int64_t c, int64_t o, int threads) {
  backward_wide(x, w, idx, gy, gx, gw, gb, n, h, wd, c, o, threads);
}

}  // extern "C"
