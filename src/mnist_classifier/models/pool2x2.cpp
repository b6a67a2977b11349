// 2x2 max-pooling (stride 2, floor mode), optionally followed by ReLU, for channels_last CPU tensors in
// fp32 or bf16: the same outputs and gradients as torch's max_pool2d (and relu), ties and NaN included.
//
// Why: in the guide CNN's training step on a CPU, torch's pooling costs about a fifth of the step. It stores
// an int64 index per output and its backward scatters into a zero-filled buffer. Here each output keeps a
// one-byte index (0-3: which of its 4 inputs won, row-major; 4: zeroed by the ReLU), and the backward writes
// every input position once, with no fill and no scatter. The loops over channels are 16 wide, so the
// compiler vectorises them (built by models/native.py with the host's instruction set).
//
// Layout: x is (B, H, W, C) in memory (channels_last), y and idx are (B, H/2, W/2, C); C % 16 == 0.
// bf16 values travel as their 16-bit patterns and are compared as floats.

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;  // channels per inner loop

inline float as_float(float v) { return v; }
inline float as_float(uint16_t bits) {  // bf16 -> fp32 is exact: the bits are fp32's upper half
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// torch's rule: a later input wins if it is greater, or if it is NaN (v != v)
template <typename T>
inline void update(float& m, T& best, uint8_t& arg, T candidate, uint8_t j) {
  const float v = as_float(candidate);
  const bool wins = v > m || v != v;
  m = wins ? v : m;
  best = wins ? candidate : best;
  arg = wins ? j : arg;
}

template <typename T>
void forward(const T* __restrict x, T* __restrict y, uint8_t* __restrict idx, int64_t batch, int64_t height,
             int64_t width, int64_t channels, int relu, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = channels / kLanes;
#pragma omp parallel for num_threads(threads)
  for (int64_t row = 0; row < batch * out_h; row++) {
    const int64_t b = row / out_h, oh = row % out_h;
    const T* top = x + ((b * height + 2 * oh) * width) * channels;
    const T* bottom = top + width * channels;
    T* out = y + row * out_w * channels;
    uint8_t* which = idx + row * out_w * channels;
    for (int64_t q = 0; q < out_w * blocks; q++) {
      const int64_t ow = q / blocks, c0 = (q % blocks) * kLanes;
      const T* a = top + 2 * ow * channels + c0;  // the window's four inputs, row-major
      const T* b2 = a + channels;
      const T* c = bottom + 2 * ow * channels + c0;
      const T* d = c + channels;
      T* o = out + ow * channels + c0;
      uint8_t* w = which + ow * channels + c0;
#pragma GCC ivdep
      for (int64_t k = 0; k < kLanes; k++) {
        T best = a[k];
        float m = as_float(best);
        uint8_t arg = 0;
        update(m, best, arg, b2[k], 1);
        update(m, best, arg, c[k], 2);
        update(m, best, arg, d[k], 3);
        const bool zeroed = relu && m <= 0.0f;  // ReLU keeps NaN, and passes its gradient, as torch's does
        o[k] = zeroed ? T(0) : best;
        w[k] = zeroed ? 4 : arg;
      }
    }
  }
}

// T: the values' bit patterns (uint32_t for fp32, uint16_t for bf16); the backward only moves them
template <typename T>
void backward(const T* __restrict grad_y, const uint8_t* __restrict idx, T* __restrict grad_x, int64_t batch,
              int64_t height, int64_t width, int64_t channels, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = channels / kLanes;
#pragma omp parallel for num_threads(threads)
  for (int64_t row = 0; row < batch * out_h; row++) {
    const int64_t b = row / out_h, oh = row % out_h;
    T* top = grad_x + ((b * height + 2 * oh) * width) * channels;
    T* bottom = top + width * channels;
    const T* g = grad_y + row * out_w * channels;
    const uint8_t* which = idx + row * out_w * channels;
    for (int64_t q = 0; q < out_w * blocks; q++) {
      const int64_t ow = q / blocks, c0 = (q % blocks) * kLanes;
      T* a = top + 2 * ow * channels + c0;
      T* b2 = a + channels;
      T* c = bottom + 2 * ow * channels + c0;
      T* d = c + channels;
      const T* gg = g + ow * channels + c0;
      const uint8_t* w = which + ow * channels + c0;
#pragma GCC ivdep
      for (int64_t k = 0; k < kLanes; k++) {
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
