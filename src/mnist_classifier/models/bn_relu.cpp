// Batch norm in training mode (each channel normalised by this batch's mean and variance, then scaled and
// shifted), followed by ReLU, for channels_last CPU tensors in fp32 or bf16 (autocast's: the maps in bf16, the
// weights, statistics and arithmetic in fp32, each result rounded to bf16 as torch rounds it): torch's
// batch_norm then relu, with the same running statistics and the same gradients to rounding (sums are taken in
// another order).
//
// Why: in the fast recipe's fp32 step (fast-cnn-centre-16, batch 256) torch's batch norm and ReLU took about a
// fifth of the step on a CPU held to AVX2. Alone, its training forward took 234 us on a (256, 32, 6, 6) map,
// whose sum over the batch takes 23 us. Here the forward reads the map twice (one pass for its mean and
// variance, one for the output) and writes it once; the backward reads it and its gradient twice and writes
// one gradient, with the ReLU's mask recomputed from the input as the forward computed it, which reads one map
// less than torch's mask from the output. BENCHMARKS.md has the figures.
//
// Layout: x, y, grad_y and grad_x are (rows, C) in memory, rows = B * H * W (channels_last); C % 16 == 0.
// Per-channel sums: fp32 over blocks of kBlockRows rows, fp64 across blocks and threads, so the variance of
// a whole batch keeps fp32's precision. Each thread takes one contiguous range of rows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vectors.h"

namespace {

using namespace vectors;

constexpr int64_t kChains = 4;  // rows summed into separate accumulators: one add's latency is ~4 cycles
constexpr int64_t kBlockRows = 128;  // rows summed in fp32 (32 per chain) before they join the fp64 sums

int64_t chunk_start(int64_t rows, int64_t chunks, int64_t k) { return rows * k / chunks; }

// sums[t * C + c] += the sum over rows [r0, r1) of term t for channel c = c0 + lane, where term(row, c0, acc)
// adds a row's T terms for channels c0 .. c0 + kLanes into acc[0 .. T)
template <int T, typename Term>
void chunk_sums(int64_t r0, int64_t r1, int64_t channels, double* sums, Term term) {
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    const int64_t b1 = std::min(b0 + kBlockRows, r1);
    for (int64_t c0 = 0; c0 < channels; c0 += kLanes) {
      VF acc[kChains][T] = {};
      int64_t r = b0;
      for (; r + kChains <= b1; r += kChains)
        for (int64_t u = 0; u < kChains; u++) term(r + u, c0, acc[u]);
      for (; r < b1; r++) term(r, c0, acc[0]);
      for (int t = 0; t < T; t++) {
        const VF block = (acc[0][t] + acc[1][t]) + (acc[2][t] + acc[3][t]);
        for (int64_t l = 0; l < kLanes; l++) sums[t * channels + c0 + l] += block[l];
      }
    }
  }
}

// The lambdas below capture raw pointers by value, and each thread works on its own copy of one: captured by
// reference, every pointer was loaded again for every vector, since the stores might have changed it (the
// output pass took 3.6x as long as a sum).

// the T per-channel sums of every row: term(row, c0, acc) adds a row's kLanes channels into acc[0..T)
template <int T, typename Term>
std::vector<double> row_sums(int64_t rows, int64_t channels, int threads, const Term& term) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, rows));
  std::vector<double> parts(chunks * T * channels, 0.0);
  double* out = parts.data();
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t k = 0; k < chunks; k++) {
    const Term own = term;
    chunk_sums<T>(chunk_start(rows, chunks, k), chunk_start(rows, chunks, k + 1), channels,
                  out + k * T * channels, own);
  }
  std::vector<double> total(T * channels, 0.0);
  for (int64_t k = 0; k < chunks; k++)  // in chunk order: the same result for the same thread count
    for (int64_t i = 0; i < T * channels; i++) total[i] += parts[k * T * channels + i];
  return total;
}

// out[row, c] = f(row, c0)[lane], rounded to T, for every row and block of channels
template <typename T, typename F>
void each_row(int64_t rows, int64_t channels, int threads, T* __restrict out, const F& f) {
#pragma omp parallel num_threads(threads)
  {
    const F own = f;
#pragma omp for
    for (int64_t r = 0; r < rows; r++)
      for (int64_t c0 = 0; c0 < channels; c0 += kLanes) store_rounded(out + r * channels + c0, own(r, c0));
  }
}

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {  // bf16 bits -> fp32, exactly
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The batch norm's output before the ReLU, for one row's block of channels: (x - mean) * scale + bias. torch
// computes x * scale + (bias - mean * scale), which loses the digits x and mean share (a mean of 1000 and a
// spread of 0.01: 5e-3 of the output's size, against 1e-6 here). The forward and the backward both call it,
// so the backward's mask is the forward's, bit for bit.
template <typename T>
inline VF normed(const T* x, const float* mean, const float* scale, const float* bias) {
  return (load(x) - load(mean)) * load(scale) + load(bias);
}

// y = relu((x - mean) * invstd * weight + bias). Writes stats (4 x C: the batch's mean and 1 / sqrt(biased
// variance + eps), scale = weight * invstd, and bias, for the backward) and updates
// the running statistics as torch does: running = (1 - momentum) * running + momentum * batch, with the
// variance unbiased there (rows / (rows - 1)). rows > 1. One pass sums x - x[0] and its square: taken from a
// value of its own channel, the variance keeps its precision whatever the mean (the classic shifted sums).
// T: the maps' element type, float or uint16_t (bf16 bits); y is rounded to it.
template <typename T>
void forward(const T* x, const float* weight, const float* bias, T* y, float* stats, float* running_mean,
             float* running_var, int64_t rows, int64_t channels, double eps, double momentum, int threads) {
  const T* first = x;  // row 0
  const std::vector<double> sums = row_sums<2>(rows, channels, threads, [=](int64_t r, int64_t c0, VF* acc) {
    const VF d = load(x + r * channels + c0) - load(first + c0);
    acc[0] += d;
    acc[1] += d * d;
  });
  float *mean = stats, *invstd = stats + channels, *scale = stats + 2 * channels, *beta = stats + 3 * channels;
  for (int64_t c = 0; c < channels; c++) {
    const double offset = sums[c] / rows, spread = sums[channels + c] / rows - offset * offset;
    const double var = spread < 0 ? 0.0 : spread;  // rounding's negative 0; a NaN stays NaN, as torch's
    const double batch_mean = widen(first[c]) + offset, inv = 1.0 / std::sqrt(var + eps);
    mean[c] = static_cast<float>(batch_mean);
    invstd[c] = static_cast<float>(inv);
    scale[c] = static_cast<float>(weight[c] * inv);
    beta[c] = bias[c];
    running_mean[c] = static_cast<float>((1 - momentum) * running_mean[c] + momentum * batch_mean);
    running_var[c] = static_cast<float>((1 - momentum) * running_var[c] + momentum * var * rows / (rows - 1));
  }
  const float *mu = mean, *sc = scale, *be = beta;
  each_row(rows, channels, threads, y, [=](int64_t r, int64_t c0) {
    const VF z = normed(x + r * channels + c0, mu + c0, sc + c0, be + c0);
    return (z <= 0.0f) ? VF{} : z;  // ReLU keeps NaN, as torch's does
  });
}

// The gradients of forward's output: grad_x (rows, C, rounded to T), grad_weight and grad_bias (C), from grad_y, x and
// the forward's stats. The ReLU passes grad_y where its input was not <= 0 (NaN included), as torch's
// threshold_backward does; that input is recomputed from x (normed), which reads one map less than the output.
template <typename T>
void backward(const T* grad_y, const T* x, const float* stats, T* grad_x, float* grad_weight, float* grad_bias,
              int64_t rows, int64_t channels, int threads) {
  const float *mean = stats, *invstd = stats + channels, *scale = stats + 2 * channels, *beta = stats + 3 * channels;
  const std::vector<double> sums = row_sums<2>(rows, channels, threads, [=](int64_t r, int64_t c0, VF* acc) {
    const int64_t at = r * channels + c0;
    const VF g = (normed(x + at, mean + c0, scale + c0, beta + c0) <= 0.0f) ? VF{} : load(grad_y + at);
    acc[0] += g;                                      // sum of g
    acc[1] += g * (load(x + at) - load(mean + c0));  // sum of g * (x - mean)
  });
  std::vector<float> k1_v(channels), k0_v(channels);
  float *k1 = k1_v.data(), *k0 = k0_v.data();
  for (int64_t c = 0; c < channels; c++) {
    const double inv = invstd[c], s = scale[c], gx_mean = sums[channels + c] / rows;
    grad_bias[c] = static_cast<float>(sums[c]);
    grad_weight[c] = static_cast<float>(sums[channels + c] * inv);
    // grad_x = s * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))) = g * s + (x - mean) * k1 + k0
    k1[c] = static_cast<float>(-s * inv * inv * gx_mean);
    k0[c] = static_cast<float>(-s * sums[c] / rows);
  }
  each_row(rows, channels, threads, grad_x, [=](int64_t r, int64_t c0) {
    const int64_t at = r * channels + c0;
    const VF g = (normed(x + at, mean + c0, scale + c0, beta + c0) <= 0.0f) ? VF{} : load(grad_y + at);
    return g * load(scale + c0) + (load(x + at) - load(mean + c0)) * load(k1 + c0) + load(k0 + c0);
  });
}

}  // namespace

extern "C" {

void bn_relu_forward_f32(const float* x, const float* weight, const float* bias, float* y, float* stats,
                         float* running_mean, float* running_var, int64_t rows, int64_t channels, double eps,
                         double momentum, int threads) {
  forward(x, weight, bias, y, stats, running_mean, running_var, rows, channels, eps, momentum, threads);
}

void bn_relu_forward_bf16(const uint16_t* x, const float* weight, const float* bias, uint16_t* y, float* stats,
                          float* running_mean, float* running_var, int64_t rows, int64_t channels, double eps,
                          double momentum, int threads) {
  forward(x, weight, bias, y, stats, running_mean, running_var, rows, channels, eps, momentum, threads);
}

void bn_relu_backward_f32(const float* grad_y, const float* x, const float* stats, float* grad_x, float* grad_weight,
                          float* grad_bias, int64_t rows, int64_t channels, int threads) {
  backward(grad_y, x, stats, grad_x, grad_weight, grad_bias, rows, channels, threads);
}

void bn_relu_backward_bf16(const uint16_t* grad_y, const uint16_t* x, const float* stats, uint16_t* grad_x,
                           float* grad_weight, float* grad_bias, int64_t rows, int64_t channels, int threads) {
  backward(grad_y, x, stats, grad_x, grad_weight, grad_bias, rows, channels, threads);
}

}  // extern "C"
