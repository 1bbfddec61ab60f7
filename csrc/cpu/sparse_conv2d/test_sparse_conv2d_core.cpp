// Checks the torch-free sparse_conv2d core against a naive direct convolution on odd
// shapes, for both ISA paths, both dtypes and both layouts (channels-first and
// channels-last x and out). Exit code 0 on success.
#include "sparse_conv2d.h"
#include "../core_test.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using pxkern::sparse_conv2d::Geometry;
using pxkern::sparse_conv2d::Isa;

struct Case {
  int64_t n, c_in, h, w, c_out, kh, kw, groups, sh, sw, ph, pw, dh, dw;
  double density;
  bool bias;
  bool ones_scale = false;  // add a per-output-channel constant to the weight (groups == 1)
};

// conv2d by definition, accumulated in double.
std::vector<double> naive_conv2d(const std::vector<double>& x, const std::vector<double>& wt,
                                 const std::vector<double>& bias, const Geometry& g) {
  std::vector<double> out(g.n * g.c_out * g.h_out * g.w_out);
  const int64_t cig = g.c_in_per_group();
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t co = 0; co < g.c_out; ++co) {
      const int64_t grp = co / g.c_out_per_group();
      for (int64_t oy = 0; oy < g.h_out; ++oy)
        for (int64_t ox = 0; ox < g.w_out; ++ox) {
          double acc = bias.empty() ? 0.0 : bias[co];
          for (int64_t ci = 0; ci < cig; ++ci)
            for (int64_t ky = 0; ky < g.kh; ++ky)
              for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
                const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
                if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
                const int64_t c = grp * cig + ci;
                acc += wt[((co * cig + ci) * g.kh + ky) * g.kw + kx] *
                       x[((n * g.c_in + c) * g.h + iy) * g.w + ix];
              }
          out[((n * g.c_out + co) * g.h_out + oy) * g.w_out + ox] = acc;
        }
    }
  return out;
}

template <typename T>
bool check_case(const Case& k, Isa isa, bool channels_last, int threads, double tol,
                std::mt19937& rng) {
  const Geometry g = pxkern::sparse_conv2d::make_geometry(
      k.n, k.c_in, k.h, k.w, k.c_out, k.kh, k.kw, k.groups, k.sh, k.sw, k.ph, k.pw, k.dh, k.dw,
      channels_last);
  std::uniform_real_distribution<double> value(-1.0, 1.0);
  std::bernoulli_distribution keep(k.density);
  std::vector<double> x(g.n * g.c_in * g.h * g.w), wt(g.c_out * g.c_in_per_group() * g.kh * g.kw);
  std::vector<double> bias(k.bias ? g.c_out : 0), ones_scale(k.ones_scale ? g.c_out : 0);
  for (double& v : x) v = static_cast<T>(value(rng));
  for (double& v : wt) v = keep(rng) ? static_cast<T>(value(rng)) : 0.0;
  for (double& v : bias) v = static_cast<T>(value(rng));
  for (double& v : ones_scale) v = static_cast<T>(value(rng));

  const std::vector<T> wtt(wt.begin(), wt.end()), biast(bias.begin(), bias.end());
  const std::vector<T> ones_scalet(ones_scale.begin(), ones_scale.end());
  // The reference sees the weight the kernel computes with: W + ones_scale (x) 1.
  std::vector<double> effective = wt;
  const int64_t per_channel = g.c_in_per_group() * g.kh * g.kw;
  for (size_t i = 0; i < effective.size(); ++i)
    if (k.ones_scale) effective[i] += ones_scale[i / per_channel];
  // Flat index of element (n, c, pixel) of a [N, C, P] tensor in the kernel's layout.
  auto in_layout = [&](int64_t i, int64_t channels, int64_t pixels) {
    const int64_t n = i / (channels * pixels), c = i / pixels % channels, p = i % pixels;
    return channels_last ? (n * pixels + p) * channels + c : i;
  };
  std::vector<T> xt(x.size());
  for (size_t i = 0; i < x.size(); ++i) xt[in_layout(i, g.c_in, g.h * g.w)] = x[i];
  std::vector<T> out(g.n * g.c_out * g.h_out * g.w_out, T(-12345));
  pxkern::sparse_conv2d::sparse_conv2d<T>(xt.data(), wtt.data(), k.bias ? biast.data() : nullptr,
                                          k.ones_scale ? ones_scalet.data() : nullptr, out.data(),
                                          g, isa, threads);
  const std::vector<double> ref = naive_conv2d(x, effective, bias, g);
  for (size_t i = 0; i < ref.size(); ++i) {
    const double got = out[in_layout(i, g.c_out, g.h_out * g.w_out)];
    const double err = std::fabs(got - ref[i]);
    if (!(err <= tol * (1.0 + std::fabs(ref[i])))) {
      std::printf(
          "FAIL %s isa=%s%s threads=%d n=%lld c_in=%lld h=%lld w=%lld c_out=%lld k=%lldx%lld "
          "groups=%lld "
          "stride=%lld,%lld pad=%lld,%lld dil=%lld,%lld density=%.2f bias=%d ones_scale=%d: flat index %zu "
          "got %.9g expected %.9g (abs err %.3g)\n",
          sizeof(T) == 4 ? "float32" : "float64", isa == Isa::kAvx2 ? "avx2" : "portable",
          channels_last ? " channels-last" : "", threads,
          (long long)k.n, (long long)k.c_in, (long long)k.h, (long long)k.w, (long long)k.c_out,
          (long long)k.kh, (long long)k.kw, (long long)k.groups, (long long)k.sh,
          (long long)k.sw, (long long)k.ph, (long long)k.pw, (long long)k.dh, (long long)k.dw,
          k.density, (int)k.bias, (int)k.ones_scale, i, got, ref[i], err);
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  const Case cases[] = {
      // n, c_in, h, w, c_out, kh, kw, groups, sh, sw, ph, pw, dh, dw, density, bias
      {3, 5, 11, 13, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.3, true},
      {3, 5, 11, 13, 7, 3, 3, 1, 2, 2, 1, 1, 1, 1, 1.0, false},
      {2, 6, 13, 11, 4, 5, 5, 2, 1, 1, 2, 2, 1, 1, 0.5, true},
      {2, 4, 17, 19, 6, 3, 3, 2, 2, 2, 2, 2, 2, 2, 0.7, true},
      {1, 3, 9, 41, 5, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1.0, false},
      {1, 3, 9, 41, 5, 1, 1, 1, 2, 2, 0, 0, 1, 1, 1.0, true},
      {2, 3, 7, 5, 3, 3, 2, 1, 3, 1, 0, 1, 1, 2, 0.8, false},
      {1, 4, 5, 3, 2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.0, true},
      {2, 3, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.0, false},
      {4, 16, 32, 32, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.05, false},
      {2, 16, 32, 32, 32, 3, 3, 1, 2, 2, 1, 1, 1, 1, 0.2, true},
      {2, 8, 37, 70, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.4, true},
      // Stride 1 with padding on one axis only: the channels-last preparation zeroes just
      // the padding, a different band per axis.
      {2, 5, 7, 9, 3, 3, 3, 1, 1, 1, 0, 2, 1, 1, 0.6, true},
      {2, 5, 9, 6, 4, 3, 3, 1, 1, 1, 2, 0, 1, 1, 0.6, false},
      // Channels-last transposition in 8x8 blocks with ragged edges: 12 input channels,
      // 21 columns, 11 output channels.
      {2, 12, 9, 21, 11, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.5, true},
      // ones_scale: the box filter of the channel sum under padding, stride, dilation and
      // the in-place path (stride 1, no padding), with an all-zero weight too.
      {3, 5, 11, 13, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.3, true, true},
      {2, 4, 17, 19, 6, 3, 3, 1, 2, 2, 2, 2, 2, 2, 0.2, false, true},
      {2, 6, 9, 10, 4, 3, 3, 1, 1, 1, 0, 0, 1, 1, 0.0, true, true},
      {2, 16, 32, 32, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0.1, false, true},
  };
  const std::vector<Isa> isas = pxkern::core_test::tested_isas();

  std::mt19937 rng(0);
  int failures = 0, checks = 0;
  // Threads: the OpenMP default, one, and three (more than this project's two cores;
  // the ranges of samples the slower threads own are taken over by the others).
  for (const Case& k : cases)
    for (Isa isa : isas)
      for (bool channels_last : {false, true})
        for (int threads : {0, 1, 3}) {
          failures += !check_case<float>(k, isa, channels_last, threads, 1e-5, rng);
          failures += !check_case<double>(k, isa, channels_last, threads, 1e-12, rng);
          checks += 2;
        }
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
