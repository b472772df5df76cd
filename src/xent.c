// The decoder's softmax cross-entropy on the CPU, one row of scores at a time, in place:
// each row of logits becomes the gradient of its loss (softmax − one-hot), and its loss
// (log-sum-exp − the target's score) is written out. A 10,000-word row is 40 KB, so the
// three passes over it (max; exp and sum; scale) run in the core's cache: the (N, V) scores
// cross memory once, where log_softmax + nll_loss and their backward cross it six times.
// Used by src/cpu.cpp (the autograd node); compiled by build.rs with AVX2 and FMA, and
// called only when the CPU has them (src/xent.rs checks).
//
// exp is the Cephes single-precision polynomial (Moshier, Cephes Math Library, expf.c),
// vectorised as in Pommier's avx_mathfun: relative error below 2e-7 on [-87, 0], which is
// all it sees here (scores minus their row's maximum).
//
// Non-finite scores give what log_softmax gives: a row holding a NaN or +inf, or nothing
// but -inf, has a NaN loss and gradient (so that the divergence guard sees it); a -inf
// score among finite ones has probability 0 (and the loss is +inf when it is the target's).

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m256 exp_ps(__m256 x) {
  // Below ln(FLT_MIN) the result is a denormal or zero; clamp so that 2^n stays a normal.
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654475f));
  // x = n ln 2 + r, |r| <= ln2 / 2, with ln 2 split in two for an exact product n * C1.
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

static inline double hsum(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// One row: x (v scores) becomes softmax(x) with 1 subtracted at t, which is added into
// acc (v doubles) unless it is null; returns the loss.
static float row(float* x, int64_t t, int64_t v, double* acc) {
  const int64_t vv = v - v % 8;
  // Pass 1: the maximum, and whether any score is NaN.
  __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < vv; i += 8) {
    __m256 a = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(mx, a);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  float m = hmax(mx);
  int bad = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = vv; i < v; i++) {
    if (isnan(x[i])) bad = 1;
    if (x[i] > m) m = x[i];
  }
  // A maximum of +inf or -inf leaves no finite shift (inf - inf).
  if (bad || !isfinite(m)) {
    for (int64_t i = 0; i < v; i++) x[i] = NAN;
    if (acc != NULL)
      for (int64_t i = 0; i < v; i++) acc[i] = NAN;
    return NAN;
  }
  const float xt = x[t];
  // Pass 2: x <- exp(x - max), summed in double.
  const __m256 mv = _mm256_set1_ps(m);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (int64_t i = 0; i < vv; i += 8) {
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double sum = hsum(_mm256_add_pd(s0, s1));
  for (int64_t i = vv; i < v; i++) {
    x[i] = expf(x[i] - m);
    sum += x[i];
  }
  // Pass 3: normalise; subtract the one-hot; add the row into acc.
  const __m256 inv = _mm256_set1_ps((float)(1.0 / sum));
  for (int64_t i = 0; i < vv; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  for (int64_t i = vv; i < v; i++) x[i] *= (float)(1.0 / sum);
  x[t] -= 1.0f;
  if (acc != NULL) {
    for (int64_t i = 0; i < vv; i += 8) {
      __m256 g = _mm256_loadu_ps(x + i);
      _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), _mm256_cvtps_pd(_mm256_castps256_ps128(g))));
      _mm256_storeu_pd(acc + i + 4, _mm256_add_pd(_mm256_loadu_pd(acc + i + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1))));
    }
    for (int64_t i = vv; i < v; i++) acc[i] += x[i];
  }
  // The difference first: with scores of 1e20, log(sum) + m would round away the log.
  return (float)(log(sum) + ((double)m - (double)xt));
}

// x: n rows of v scores (row-major); t: n targets in [0, v); loss: n losses out; colsum
// (v floats, or null): the sum of the rows' gradients, the bias's gradient. Rows are shared
// among the OpenMP threads libtorch uses (the same runtime: build.rs links it); each thread
// sums its rows into a vector of its own, added up in thread order at the end, so the
// result does not depend on how the threads were scheduled.
int ptb_xent_rows_avx2(float* x, const int64_t* t, float* loss, float* colsum, int64_t n, int64_t v) {
  const int parallel = n > 1 && n * v >= 32768;
  const int threads = parallel ? omp_get_max_threads() : 1;
  double* acc = NULL;
  if (colsum != NULL) {
    acc = calloc((size_t)threads * (size_t)v, sizeof(double));
    if (acc == NULL) return 1;
  }
#pragma omp parallel num_threads(threads) if (parallel)
  {
    double* mine = acc == NULL ? NULL : acc + (size_t)omp_get_thread_num() * (size_t)v;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) loss[r] = row(x + r * v, t[r], v, mine);
  }
  if (acc != NULL) {
    for (int64_t i = 0; i < v; i++) {
      double s = 0.0;
      for (int k = 0; k < threads; k++) s += acc[(size_t)k * (size_t)v + i];
      colsum[i] = (float)s;
    }
    free(acc);
  }
  return 0;
}
