// 3x3 convolutions (padding 1, stride 1) followed by 2x2 max-pooling (stride 2, floor mode) and optionally ReLU,
// for CPU tensors in fp32 or bf16 (models/pooling.py calls them):
// - a first layer (a few input channels: 1 for the guide CNN, 4 for the fast models' unshuffled image) in one
//   pass, forward and backward;
// - the backward of a wider layer (16k input channels) whose forward is torch's convolution and pool2x2.cpp.
//
// Why: the guide CNN's first convolution has one input channel, which oneDNN computes at about a sixth of the
// rate of the second (53 against 322 GFLOP/s in bf16 on a 2-core Zen 4, benchmarks/step_profile.py); the fast
// models' has four (54 GFLOP/s in fp32 on a 2-core Xeon held to AVX-512, against 122-126 for the others). Fused
// with the pool, its output never reaches memory at full size. And after a pool only each window's winner
// has a gradient, so both layers' backward passes sum over a quarter of the positions a dense backward visits.
//
// The first layer's layout: x is (B, C, H, W), NCHW (for one channel, the same memory as channels_last; any C,
// pooling.py sends first layers of up to 16), weight (O, C * 9) taps, bias (O), y (B, H/2, W/2, O) channels_last,
// idx (B, H/2, W/2, O): 0-3 the window's winner (row-major), 4 zeroed by the ReLU. O % 16 == 0. Arithmetic is
// fp32; a bf16 convolution output is rounded to bf16 (round to nearest even) before the pool compares it, as the
// unfused layers store it.
//
// The channels of a block are one vector (vectors.h).

#include <omp.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "vectors.h"

namespace {

using namespace vectors;
constexpr int kTaps = 9;

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

// The input rows that output row ``row`` (= b * H/2 + oh) of the first layer reads: for each channel, rows
// 2oh-1..2oh+2 of image b, in fp32, columns -1..2*(W/2)+2 (zero outside the image): rows[(ch * 4 + r) * pitch + c]
// holds x[b, ch, 2oh-1+r, c-1]. Converted once per output row, so the windows read them without bounds checks
// (and a bf16 input is widened once, not once per window that reads it). The two columns past the last window
// are read, and discarded, by the forward's second window when a row has an odd number of windows.
inline int64_t row_pitch(int64_t width) { return 2 * (width / 2) + 4; }

template <typename T>
void load_rows(const T* x, int64_t channels, int64_t height, int64_t width, int64_t row, float* rows) {
  const int64_t oh = row % (height / 2), pitch = row_pitch(width);
  const T* image = x + row / (height / 2) * channels * height * width;
  for (int64_t ch = 0; ch < channels; ch++) {
    for (int r = 0; r < 4; r++) {
      const int64_t h = 2 * oh - 1 + r;
      float* out = rows + (ch * 4 + r) * pitch;
      for (int64_t c = 0; c < pitch; c++) {
        const int64_t w = c - 1;
        out[c] = (h >= 0 && h < height && w >= 0 && w < width) ? scalar(image[(ch * height + h) * width + w]) : 0.0f;
      }
    }
  }
}

template <typename T>
void forward(const T* x, const T* weight, const T* bias, T* y, uint8_t* idx, int64_t batch, int64_t channels,
             int64_t height, int64_t width, int64_t out_channels, int relu, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = out_channels / kLanes, taps_per = channels * kTaps;
  const int64_t pitch = row_pitch(width);
  std::vector<VF> taps(blocks * taps_per), shift(blocks);  // taps[block][ch * 9 + k]: the block's weights
  for (int64_t o = 0; o < out_channels; o++) {
    for (int64_t k = 0; k < taps_per; k++)
      taps[(o / kLanes) * taps_per + k][o % kLanes] = scalar(weight[o * taps_per + k]);
    shift[o / kLanes][o % kLanes] = scalar(bias[o]);
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> rows(channels * 4 * pitch);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < batch * out_h; row++) {
      load_rows(x, channels, height, width, row, rows.data());
      for (int64_t ow = 0; ow < out_w; ow += 2) {  // two windows at a time: 8 independent sums keep both FMA
        for (int64_t blk = 0; blk < blocks; blk++) {  // units busy (4 would wait on the FMAs' latency)
          const VF* tap = &taps[blk * taps_per];
          VF acc[2][4] = {};  // each window's 4 convolution outputs (row-major); a tap is loaded once for all 8
          for (int64_t ch = 0; ch < channels; ch++) {
            const float* p = &rows[ch * 4 * pitch + 2 * ow];  // the first window's 4x4 patch of this channel
            for (int kh = 0; kh < 3; kh++) {
              for (int kw = 0; kw < 3; kw++) {
                const VF t = tap[ch * kTaps + kh * 3 + kw];
                for (int q = 0; q < 2; q++) {  // the second window's patch starts 2 columns on
                  acc[q][0] += p[kh * pitch + kw + 2 * q] * t;
                  acc[q][1] += p[kh * pitch + kw + 1 + 2 * q] * t;
                  acc[q][2] += p[(kh + 1) * pitch + kw + 2 * q] * t;
                  acc[q][3] += p[(kh + 1) * pitch + kw + 1 + 2 * q] * t;
                }
              }
            }
          }
          for (int q = 0; q < 2 && ow + q < out_w; q++) {
            VF best = as_stored(acc[q][0] + shift[blk], T(0));  // as the tensor would hold it
            VI arg = {};
            for (int j = 1; j < 4; j++) {
              const VF v = as_stored(acc[q][j] + shift[blk], T(0));
              const VI wins = (v > best) | (v != v);  // torch's rule: greater, or NaN, replaces
              best = wins ? v : best;
              arg = wins ? VI{} + j : arg;
            }
            const VI zeroed = relu ? (best <= 0.0f) : VI{};  // ReLU keeps NaN, as torch's does
            const int64_t at = (row * out_w + ow + q) * out_channels + blk * kLanes;
            store(y + at, zeroed ? VF{} : best);
            store_winners(idx + at, zeroed ? VI{} + 4 : arg);
          }
        }
      }
    }
  }
}

// Gradients of the weight (O, C * 9) and bias (O), summed in fp32: per thread over a fixed share of the rows, then
// the threads' sums in thread order, so the same thread count gives the same bits every run. Within an output
// row, each (block, channel)'s 9 sums stay in registers across the row's windows.
template <typename T>
void backward(const T* x, const uint8_t* idx, const T* grad_y, T* grad_weight, T* grad_bias, int64_t batch,
              int64_t channels, int64_t height, int64_t width, int64_t out_channels, int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = out_channels / kLanes, taps_per = channels * kTaps;
  const int64_t pitch = row_pitch(width);
  const int64_t per = blocks * (taps_per + 1);  // per thread and block: C * 9 taps, then the bias
  std::vector<VF> partial(threads * per, VF{});
#pragma omp parallel num_threads(threads)
  {
    VF* acc = &partial[omp_get_thread_num() * per];
    std::vector<float> rows(channels * 4 * pitch);
    std::vector<VF> grads(out_w * 4);  // this row's windows: the gradient of each of the 4 outputs (0 if lost)
#pragma omp for schedule(static)
    for (int64_t row = 0; row < batch * out_h; row++) {
      load_rows(x, channels, height, width, row, rows.data());
      for (int64_t blk = 0; blk < blocks; blk++) {
        VF* sum = acc + blk * (taps_per + 1);
        VF bias_sum = sum[taps_per];
        for (int64_t ow = 0; ow < out_w; ow++) {
          const int64_t at = (row * out_w + ow) * out_channels + blk * kLanes;
          const VF g = load(grad_y + at);
          VB which8;
          std::memcpy(&which8, idx + at, sizeof which8);
          const VI which = __builtin_convertvector(which8, VI);
          for (int j = 0; j < 4; j++) grads[ow * 4 + j] = (which == j) ? g : VF{};  // the winner's only
          bias_sum += (which < 4) ? g : VF{};  // lost to the ReLU (4): no gradient
        }
        sum[taps_per] = bias_sum;
        for (int64_t ch = 0; ch < channels; ch++) {
          VF s[kTaps];
          for (int k = 0; k < kTaps; k++) s[k] = sum[ch * kTaps + k];
          for (int64_t ow = 0; ow < out_w; ow++) {
            const float* p = &rows[ch * 4 * pitch + 2 * ow];
            for (int j = 0; j < 4; j++) {
              const VF gj = grads[ow * 4 + j];
              for (int kh = 0; kh < 3; kh++)
                for (int kw = 0; kw < 3; kw++) s[kh * 3 + kw] += gj * p[(j / 2 + kh) * pitch + j % 2 + kw];
            }
          }
          for (int k = 0; k < kTaps; k++) sum[ch * kTaps + k] = s[k];
        }
      }
    }
  }
  for (int64_t blk = 0; blk < blocks; blk++) {
    for (int64_t k = 0; k <= taps_per; k++) {
      VF total = {};
      for (int t = 0; t < threads; t++) total += partial[t * per + blk * (taps_per + 1) + k];
      T out[kLanes];
      store(out, total);
      for (int64_t lane = 0; lane < kLanes; lane++) {
        const int64_t o = blk * kLanes + lane;
        if (k < taps_per)
          grad_weight[o * taps_per + k] = out[lane];
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
//
// The image and its gradient sit in buffers with a zero border of one pixel, so a winner's 9 taps need no bounds
// checks, and the windows are walked by row and column, with no division per window. With both, what the kernel
// buys the guide's fp32 step over oneDNN went from 1.02-1.15x to 1.20-1.28x (step_variants.py, BENCHMARKS.md,
// "CPU-6, a fourteenth session"); the sums are the same ones in the same order, so the bits are the same.
// Each output channel's live winners are listed first, without a branch, and the loops walk that list: a window
// zeroed by the ReLU (30-70 % of them in training) was a branch the data decided. On real gradients that made the
// kernel 1.08-1.46x faster in fp32, 1.11-1.34x in bf16 and 1.28-1.78x in an AVX2 build (benchmarks/kernel_ab.py,
// BENCHMARKS.md, "CPU-6, a fifteenth session"), with the same bits.
// Each block of channels then got a bordered plane of its own, so a tap's neighbours in the row are the next
// vectors (offsets the compiler folds into the addresses), and a channel's 9 weight-gradient vectors of a block
// sit side by side; each window's corner is listed once. Same sums, same order, same bits: 1.11-1.28x in fp32,
// 1.24-1.27x in bf16 and 1.18-1.23x in an AVX2 build on real gradients (kernel_ab.py), the step 1.01-1.07x
// (step_variants.py --variants kept kept+before; BENCHMARKS.md, "CPU-6, a sixteenth session").
template <typename T>
void backward_wide(const T* x, const T* weight, const uint8_t* idx, const T* grad_y, T* grad_x, T* grad_weight,
                   T* grad_bias, int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t out_channels,
                   int threads) {
  const int64_t out_h = height / 2, out_w = width / 2, blocks = channels / kLanes;
  const int64_t pitch = width + 2, plane = (height + 2) * pitch;  // one block's bordered map, in vectors
  // per thread: the weight gradient as vectors, (O, C/16, 9): a channel's 9 taps of one block side by side
  const int64_t per = out_channels * kTaps * blocks;
  const auto at_tap = [blocks](int64_t o, int64_t blk, int k) { return (o * blocks + blk) * kTaps + k; };
  std::vector<VF> partial(threads * per, VF{});
  std::vector<float> partial_bias(threads * out_channels, 0.0f);
  std::vector<VF> taps(per);  // the weight (O, 3, 3, C) as fp32 vectors in the same (O, C/16, 9) order
  for (int64_t o = 0; o < out_channels; o++)
    for (int k = 0; k < kTaps; k++)
      for (int64_t blk = 0; blk < blocks; blk++)
        taps[at_tap(o, blk, k)] = load(weight + ((o * kTaps + k) * blocks + blk) * kLanes);
  const auto inside = [pitch](int64_t h, int64_t w) { return (h + 1) * pitch + w + 1; };  // pixel (h, w)
  std::vector<int64_t> corner(out_h * out_w);  // each window's top-left pixel in a plane
  for (int64_t ph = 0; ph < out_h; ph++)
    for (int64_t pw = 0; pw < out_w; pw++) corner[ph * out_w + pw] = inside(2 * ph, 2 * pw);
  const int64_t step[4] = {0, 1, pitch, pitch + 1};  // winner j (row-major in its window) from the corner
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    VF* gw = &partial[t * per];
    float* gb = &partial_bias[t * out_channels];
    // this image and its gradient in fp32, one bordered plane per block of channels (C/16, H+2, W+2), so that a
    // tap's neighbour in the row is the next vector: its offset a constant the compiler folds into the address
    std::vector<VF> gx(plane * blocks, VF{}), in(plane * blocks, VF{});  // the borders stay zero in `in`
    std::vector<int64_t> won(out_h * out_w);  // one channel's live winners: where, in a plane
    std::vector<float> g_won(out_h * out_w);  // and their gradients
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; b++) {
      const T* image = x + b * height * width * channels;
      std::fill(gx.begin(), gx.end(), VF{});
      for (int64_t h = 0; h < height; h++)
        for (int64_t w = 0; w < width; w++)
          for (int64_t blk = 0; blk < blocks; blk++)
            in[blk * plane + inside(h, w)] = load(image + (h * width + w) * channels + blk * kLanes);
      const uint8_t* which = idx + b * out_h * out_w * out_channels;
      const T* grads = grad_y + b * out_h * out_w * out_channels;
      for (int64_t o = 0; o < out_channels; o++) {
        // This channel's live winners, in window order, listed without a branch: a window zeroed by the ReLU
        // (4) is written and then overwritten, so the loops below take no branch that the data decides.
        int64_t live = 0;
        for (int64_t win = 0; win < out_h * out_w; win++) {
          const int64_t at = win * out_channels + o;
          won[live] = corner[win] + step[which[at] & 3];
          g_won[live] = scalar(grads[at]);
          live += which[at] < 4;
        }
        float bias_sum = gb[o];  // one add per winner, in the same order as into gb[o]
        for (int64_t i = 0; i < live; i++) bias_sum += g_won[i];
        gb[o] = bias_sum;
        for (int64_t blk = 0; blk < blocks; blk++) {
          VF acc[kTaps], tap[kTaps];  // this channel's weight gradient and weight, in registers over the image
          VF* gw_here = gw + at_tap(o, blk, 0);
          for (int k = 0; k < kTaps; k++) {
            acc[k] = gw_here[k];
            tap[k] = taps[at_tap(o, blk, k)];
          }
          const VF* in_blk = &in[blk * plane];
          VF* gx_blk = &gx[blk * plane];
          for (int64_t i = 0; i < live; i++) {
            const float g = g_won[i];
            for (int dy = 0; dy < 3; dy++) {  // tap k = 3 dy + dx reads the pixel (dy - 1, dx - 1) from the winner
              const VF* row = in_blk + won[i] + (dy - 1) * pitch;
              VF* grad_row = gx_blk + won[i] + (dy - 1) * pitch;
              for (int dx = 0; dx < 3; dx++) {
                acc[3 * dy + dx] += g * row[dx - 1];
                grad_row[dx - 1] += g * tap[3 * dy + dx];
              }
            }
          }
          for (int k = 0; k < kTaps; k++) gw_here[k] = acc[k];
        }
      }
      T* out = grad_x + b * height * width * channels;
      for (int64_t h = 0; h < height; h++)
        for (int64_t w = 0; w < width; w++)
          for (int64_t blk = 0; blk < blocks; blk++)
            store(out + (h * width + w) * channels + blk * kLanes, gx[blk * plane + inside(h, w)]);
    }
  }
  for (int64_t o = 0; o < out_channels; o++)
    for (int k = 0; k < kTaps; k++)
      for (int64_t blk = 0; blk < blocks; blk++) {
        VF total = {};
        for (int t = 0; t < threads; t++) total += partial[t * per + at_tap(o, blk, k)];
        store(grad_weight + ((o * kTaps + k) * blocks + blk) * kLanes, total);
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
                           int64_t c, int64_t h, int64_t wd, int64_t o, int relu, int threads) {
  forward(x, w, b, y, idx, n, c, h, wd, o, relu, threads);
}

void conv_pool_forward_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y, uint8_t* idx,
                            int64_t n, int64_t c, int64_t h, int64_t wd, int64_t o, int relu, int threads) {
  forward(x, w, b, y, idx, n, c, h, wd, o, relu, threads);
}

void conv_pool_backward_f32(const float* x, const uint8_t* idx, const float* gy, float* gw, float* gb, int64_t n,
                            int64_t c, int64_t h, int64_t wd, int64_t o, int threads) {
  backward(x, idx, gy, gw, gb, n, c, h, wd, o, threads);
}

void conv_pool_backward_bf16(const uint16_t* x, const uint8_t* idx, const uint16_t* gy, uint16_t* gw, uint16_t* gb,
                             int64_t n, int64_t c, int64_t h, int64_t wd, int64_t o, int threads) {
  backward(x, idx, gy, gw, gb, n, c, h, wd, o, threads);
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
