// 2x2 max-pooling (stride 2, floor mode), optionally followed by ReLU, for channels_last CPU tensors in
// fp32 or bf16: the same outputs and gradients as torch's max_pool2d (and relu), ties and NaN included.
//
// Why: in the guide CNN's training step on a CPU, torch's pooling costs about a fifth of the step. It stores
// an int64 index per output and its backward scatters into a zero-filled buffer. Here each output keeps a
// one-byte index (0-3: which of its 4 inputs won, row-major; 4: zeroed by the ReLU), and the backward writes
// every input position once, with no fill and no scatter. The forward compares a block of channels as one fp32
// vector (vectors.h): a loop over 16 channels of mixed-width values (bf16 or fp32 values, fp32 maxima, uint8
// winners) made the forward take 1.2-2.5x as long at the guide CNN's shapes (BENCHMARKS.md, "CPU-6, a fourteenth
// session"). The backward's loop over 16 channels only moves bits, and the compiler vectorises it (built by
// models/native.py for the host's instruction set).
//
// Layout: x is (B, H, W, C) in memory (channels_last), y and idx are (B, H/2, W/2, C); C % 16 == 0.
// bf16 values are compared as the fp32 values they widen to, and written back as the same bits.

#include <cstdint>

#include "vectors.h"

namespace {

using namespace vectors;

template <typename T>
void forward(const T* __restrict x, T* __restrict y, uint8_t* __restrict idx, int64_t batch, int64_t height,
             int64_t width, int64_t channels, int relu, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2;
#pragma omp parallel for num_threads(threads)
  for (int64_t row = 0; row < batch * out_h; row++) {
    const int64_t b = row / out_h, oh = row % out_h;
    const T* top = x + ((b * height + 2 * oh) * width) * channels;
    const T* bottom = top + width * channels;
    for (int64_t ow = 0; ow < out_w; ow++) {
      for (int64_t c0 = 0; c0 < channels; c0 += kLanes) {
        const int64_t left = 2 * ow * channels + c0, right = left + channels;
        const T* window[4] = {top + left, top + right, bottom + left, bottom + right};  // row-major
        VF best = load(window[0]);
        VI arg = {};
        for (int j = 1; j < 4; j++) {
          const VF v = load(window[j]);
          const VI wins = (v > best) | (v != v);  // torch's rule: greater, or NaN, replaces
          best = wins ? v : best;
          arg = wins ? VI{} + j : arg;
        }
        const VI zeroed = relu ? (best <= 0.0f) : VI{};  // ReLU keeps NaN, and passes its gradient, as torch's does
        const int64_t at = (row * out_w + ow) * channels + c0;
        store_loaded(y + at, zeroed ? VF{} : best);  // a winner's own bits (a NaN's payload too), or +0
        store_winners(idx + at, zeroed ? VI{} + 4 : arg);
      }
    }
  }
}

constexpr int64_t kMoveLanes = 16;  // channels per inner loop of the backward

// T: the values' bit patterns (uint32_t for fp32, uint16_t for bf16); the backward only moves them
template <typename T>
void backward(const T* __restrict grad_y, const uint8_t* __restrict idx, T* __restrict grad_x, int64_t batch,
              int64_t height, int64_t width, int64_t channels, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = channels / kMoveLanes;
#pragma omp parallel for num_threads(threads)
  for (int64_t row = 0; row < batch * out_h; row++) {
    const int64_t b = row / out_h, oh = row % out_h;
    T* top = grad_x + ((b * height + 2 * oh) * width) * channels;
    T* bottom = top + width * channels;
    const T* g = grad_y + row * out_w * channels;
    const uint8_t* which = idx + row * out_w * channels;
    for (int64_t q = 0; q < out_w * blocks; q++) {
      const int64_t ow = q / blocks, c0 = (q % blocks) * kMoveLanes;
      T* a = top + 2 * ow * channels + c0;
      T* b2 = a + channels;
      T* c = bottom + 2 * ow * channels + c0;
      T* d = c + channels;
      const T* gg = g + ow * channels + c0;
      const uint8_t* w = which + ow * channels + c0;
#pragma GCC ivdep
      for (int64_t k = 0; k < kMoveLanes; k++) {
        const T grad = gg[k];
        const uint8_t won = w[k];
        a[k] = grad & -static_cast<T>(won == 0);  // all ones or all zeros: the gradient or +0
        b2[k] = grad & -static_cast<T>(won == 1);
        c[k] = grad & -static_cast<T>(won == 2);
        d[k] = grad & -static_cast<T>(won == 3);
      }
    }
  }
}

}  // namespace

extern "C" {

void pool2x2_forward_f32(const float* x, float* y, uint8_t* idx, int64_t b, int64_t h, int64_t w, int64_t c,
                         int relu, int threads) {
  forward(x, y, idx, b, h, w, c, relu, threads);
}

void pool2x2_forward_bf16(const uint16_t* x, uint16_t* y, uint8_t* idx, int64_t b, int64_t h, int64_t w, int64_t c,
                          int relu, int threads) {
  forward(x, y, idx, b, h, w, c, relu, threads);
}

void pool2x2_backward_f32(const float* gy, const uint8_t* idx, float* gx, int64_t b, int64_t h, int64_t w,
                          int64_t c, int threads) {
  backward(reinterpret_cast<const uint32_t*>(gy), idx, reinterpret_cast<uint32_t*>(gx), b, h, w, c, threads);
}

void pool2x2_backward_bf16(const uint16_t* gy, const uint8_t* idx, uint16_t* gx, int64_t b, int64_t h, int64_t w,
                           int64_t c, int threads) {
  backward(gy, idx, gx, b, h, w, c, threads);
}

}  // extern "C"
