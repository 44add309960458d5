/*
 * Fused selective scan for the CPU (forward and backward), memory-bounded.
 *
 *   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          (per channel d, state n)
 *   y_t = (sum_n C_t[n] * h_t[n] + D * u_t) * silu(z_t)
 *   dt_t = softplus(delta_t + bias)  (or delta_t + bias without softplus)
 *
 * Each (batch, channel) sequence is scanned by one thread with its N-dimensional state in
 * registers/L1. Nothing of size L x D x N is ever materialised: the forward stores only the
 * state at the start of every chunk of K steps; the backward walks the chunks in reverse,
 * recomputes the chunk's states from its start state into a K x N buffer, and back-propagates
 * through it. Gradients w.r.t. B and C (shared by all channels of a batch element) are summed
 * in per-thread buffers, then reduced.
 *
 * Layouts (all contiguous, float32):
 *   u, delta, z, out, du, ddelta, dz, dout : (Bt, D, L)
 *   A, dA : (D, N)        Bm, Cm, dBm, dCm : (Bt, L, N)
 *   Dv, bias, dD, dbias : (D)      h0, last, dlast, dh0 : (Bt, D, N)
 *   states : (Bt, D, nchunks, N)   nchunks = ceil(L / K)
 * Optional inputs may be NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
/* Flush denormals to zero (FTZ + DAZ) inside the kernels: decaying states and state gradients
   otherwise sink into the denormal range over long sequences, where x86 arithmetic is ~100x
   slower. Values below 1.2e-38 are irrelevant here. The previous mode is restored on exit. */
#define FSG_FTZ_BEGIN const unsigned int fsg_csr_ = _mm_getcsr(); _mm_setcsr(fsg_csr_ | 0x8040);
#define FSG_FTZ_END _mm_setcsr(fsg_csr_);
#else
#define FSG_FTZ_BEGIN
#define FSG_FTZ_END
#endif

#define FSG_API __attribute__((visibility("default")))

/* exp(x) for float32, vectorisable (no libm call): Cephes-style range reduction
   x = k*ln2 + r, |r| <= ln2/2, degree-6 polynomial for exp(r), 2^k by exponent bits.
   Relative error about 2e-7 over the clamped range [-87.3, 88.7]; exp(x) ~ 1e-38 below. */
static inline float fsg_expf(float x) {
    x = x < -87.33654475f ? -87.33654475f : x;
    x = x > 88.72283905f ? 88.72283905f : x;
    /* k = round(x / ln 2) with the 1.5·2^23 trick (no libm call, vectorises everywhere) */
    const float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    const int32_t ei = ((int32_t)k + 127) << 23; /* 2^k; memcpy bit casts vectorise, unions may not */
    float ef;
    memcpy(&ef, &ei, sizeof ef);
    return p * ef;
}

/* log(x) for x > 0, vectorisable (Cephes logf): x = m * 2^e, m in [sqrt(1/2), sqrt(2)). */
static inline float fsg_logf(float x) {
    int32_t bi;
    memcpy(&bi, &x, sizeof bi);
    float e = (float)(((bi >> 23) & 0xff) - 126);
    bi = (bi & 0x807fffff) | 0x3f000000; /* m in [0.5, 1) */
    float m;
    memcpy(&m, &bi, sizeof m);
    const float small = (float)(m < 0.707106781186547524f); /* 1 or 0, branch-free */
    e -= small;
    m = m + m * small - 1.f;
    const float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    float y = p * m * z;
    y += e * -2.12194440e-4f;
    y += -0.5f * z;
    return m + y + e * 0.693359375f;
}

/* softplus(x) = max(x, 0) + log(1 + exp(-|x|)), returning x above 20 like torch. */
static inline float softplus_f(float x) {
    const float ax = x < 0.f ? -x : x;
    const float sp = (x > 0.f ? x : 0.f) + fsg_logf(1.f + fsg_expf(-ax));
    const float big = (float)(x > 20.f);
    return big * x + (1.f - big) * sp;
}
static inline float sigmoid_f(float x) { return 1.f / (1.f + fsg_expf(-x)); }

FSG_API int fsg_scan_version(void) { return 5; }

/* Per-chunk pre-pass, vectorised over time: dt = softplus(delta + bias) (or delta + bias),
   dsp = d softplus / d input (1 without softplus), gate = silu(z), sz = sigmoid(z). */
static inline void prepass(int64_t len, const float *dd, float bs, int softplus, const float *zd,
                           float *dtv, float *dsp, float *gate, float *sz) {
    if (softplus) {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) dtv[i] = softplus_f(dd[i] + bs);
        if (dsp) {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) dsp[i] = sigmoid_f(dd[i] + bs);
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) dtv[i] = dd[i] + bs;
        if (dsp) {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) dsp[i] = 1.f;
        }
    }
    if (zd) {
        if (sz) {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) sz[i] = sigmoid_f(zd[i]);
#pragma omp simd
            for (int64_t i = 0; i < len; i++) gate[i] = zd[i] * sz[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < len; i++) gate[i] = zd[i] * sigmoid_f(zd[i]);
        }
    }
}

/* Static split of `total` work items over the threads of the current team: [*lo, *hi). */
static inline void thread_range(int64_t total, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int64_t tid = 0, nth = 1;
#endif
    const int64_t base = total / nth, rem = total % nth;
    *lo = tid * base + (tid < rem ? tid : rem);
    *hi = *lo + base + (tid < rem ? 1 : 0);
}

/* Forward over one chunk [t0, t0+len) of one (batch, channel) sequence; h is the running
   state (updated in place). N is a parameter so that callers can pass the constant 16. */
static inline void fwd_chunk(int64_t t0, int64_t len, const int64_t N, const float *ud, const float *dd,
                             const float *Ad, const float *Bb, const float *Cb, float Dd, const float *zd,
                             float bs, int softplus, float *hio, float *od, float *dtv, float *gate) {
    prepass(len, dd + t0, bs, softplus, zd ? zd + t0 : NULL, dtv, NULL, gate, NULL);
    float h[N];
    memcpy(h, hio, N * sizeof(float));
    for (int64_t i = 0; i < len; i++) {
        const int64_t t = t0 + i;
        const float dt = dtv[i], ut = ud[t], dtu = dt * ut;
        const float *Bt_ = Bb + t * N, *Ct_ = Cb + t * N;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; n++) {
            const float hn = fsg_expf(dt * Ad[n]) * h[n] + dtu * Bt_[n];
            h[n] = hn;
            acc += Ct_[n] * hn;
        }
        const float y = acc + Dd * ut;
        od[t] = zd ? y * gate[i] : y;
    }
    memcpy(hio, h, N * sizeof(float));
}

/* The loops run chunk-major: every thread takes a fixed range of (batch, channel) sequences and
   advances all of them chunk by chunk, so the chunk's rows of B and C (shared by all channels)
   are read from cache rather than streamed from memory once per channel. */
FSG_API void fsg_scan_fwd(int64_t Bt, int64_t D, int64_t L, int64_t N, int64_t K,
                          const float *u, const float *delta, const float *A, const float *Bm,
                          const float *Cm, const float *Dv, const float *z, const float *bias,
                          int softplus, const float *h0, float *out, float *states, float *last,
                          int nthreads) {
    const int64_t nchunks = (L + K - 1) / K;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        FSG_FTZ_BEGIN
        int64_t lo, hi;
        thread_range(Bt * D, &lo, &hi);
        float *hs = (float *)malloc((size_t)((hi - lo) * N + 2 * K) * sizeof(float));
        float *dtv = hs + (hi - lo) * N, *gate = dtv + K;
        for (int64_t bd = lo; bd < hi; bd++)
            for (int64_t n = 0; n < N; n++) hs[(bd - lo) * N + n] = h0 ? h0[bd * N + n] : 0.f;
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t t0 = c * K, len = (t0 + K < L) ? K : L - t0;
            for (int64_t bd = lo; bd < hi; bd++) {
                const int64_t b = bd / D, d = bd % D;
                float *hio = hs + (bd - lo) * N;
                memcpy(states + (bd * nchunks + c) * N, hio, N * sizeof(float));
                const float *zd = z ? z + bd * L : NULL;
                const float bs = bias ? bias[d] : 0.f, Dd = Dv ? Dv[d] : 0.f;
                if (N == 16)
                    fwd_chunk(t0, len, 16, u + bd * L, delta + bd * L, A + d * N, Bm + b * L * N, Cm + b * L * N,
                              Dd, zd, bs, softplus, hio, out + bd * L, dtv, gate);
                else
                    fwd_chunk(t0, len, N, u + bd * L, delta + bd * L, A + d * N, Bm + b * L * N, Cm + b * L * N,
                              Dd, zd, bs, softplus, hio, out + bd * L, dtv, gate);
            }
        }
        if (last) memcpy(last + lo * N, hs, (size_t)(hi - lo) * N * sizeof(float));
        free(hs);
        FSG_FTZ_END
    }
}

typedef struct {
    float *hbuf, *abuf, *dtv, *dsp, *gate, *sz, *ys;
} work_t;

/* Backward over chunk c = [t0, t0+len) of one (batch, channel) sequence. g is dL/dh at the end
   of the chunk on entry and at its start on exit; accumulates into dBb, dCb (this thread's
   buffers), dA_d (N), *dD_d, *dbias_d. */
static inline void bwd_chunk(int64_t t0, int64_t len, const int64_t N, const float *ud, const float *dd,
                             const float *Ad, const float *Bb, const float *Cb, float Dd, const float *zd,
                             float bs, int softplus, const float *st_c, const float *dyd, float *dud,
                             float *ddd, float *dzd, float *dBb, float *dCb, float *gio, double *dA_d,
                             double *dD_d, double *dbias_d, work_t w) {
    prepass(len, dd + t0, bs, softplus, zd ? zd + t0 : NULL, w.dtv, w.dsp, w.gate, w.sz);
    /* recompute the chunk's states, decays and pre-gate outputs from its start state */
    const float *hp = st_c;
    for (int64_t i = 0; i < len; i++) {
        const int64_t t = t0 + i;
        const float dt = w.dtv[i], dtu = dt * ud[t];
        const float *Bt_ = Bb + t * N, *Ct_ = Cb + t * N;
        float *hc = w.hbuf + i * N, *ac = w.abuf + i * N;
        float ys = 0.f;
#pragma omp simd reduction(+ : ys)
        for (int64_t n = 0; n < N; n++) {
            const float a = fsg_expf(dt * Ad[n]);
            const float hn = a * hp[n] + dtu * Bt_[n];
            ac[n] = a;
            hc[n] = hn;
            ys += Ct_[n] * hn;
        }
        w.ys[i] = ys + Dd * ud[t];
        hp = hc;
    }
    float g[N], dAc[N];
    memcpy(g, gio, N * sizeof(float));
    for (int64_t n = 0; n < N; n++) dAc[n] = 0.f;
    float dDc = 0.f, dbc = 0.f;
    for (int64_t i = len - 1; i >= 0; i--) {
        const int64_t t = t0 + i;
        const float *hc = w.hbuf + i * N, *ac = w.abuf + i * N;
        const float *hprev = i > 0 ? hc - N : st_c;
        const float *Bt_ = Bb + t * N, *Ct_ = Cb + t * N;
        float *dBt = dBb + t * N, *dCt = dCb + t * N;
        const float ut = ud[t], dt = w.dtv[i], dtu = dt * ut;
        float dys = dyd[t];
        if (zd) {
            const float s = w.sz[i];
            dzd[t] = dys * w.ys[i] * s * (1.f + zd[t] * (1.f - s));
            dys *= w.gate[i];
        }
        dDc += dys * ut;
        float ddt = 0.f, gB = 0.f;
#pragma omp simd reduction(+ : ddt, gB)
        for (int64_t n = 0; n < N; n++) {
            const float gn = g[n] + dys * Ct_[n];
            dCt[n] += dys * hc[n];
            const float da = gn * hprev[n] * ac[n];
            ddt += da * Ad[n];
            dAc[n] += da * dt;
            gB += gn * Bt_[n];
            dBt[n] += gn * dtu;
            g[n] = gn * ac[n];
        }
        ddt += ut * gB;
        dud[t] = dys * Dd + dt * gB;
        const float ddl = ddt * w.dsp[i];
        ddd[t] = ddl;
        dbc += ddl;
    }
    memcpy(gio, g, N * sizeof(float));
    for (int64_t n = 0; n < N; n++) dA_d[n] += dAc[n];
    *dD_d += dDc;
    *dbias_d += dbc;
}

FSG_API int fsg_scan_bwd(int64_t Bt, int64_t D, int64_t L, int64_t N, int64_t K,
                         const float *u, const float *delta, const float *A, const float *Bm,
                         const float *Cm, const float *Dv, const float *z, const float *bias,
                         int softplus, const float *states, const float *dout, const float *dlast,
                         float *du, float *ddelta, float *dA, float *dBm, float *dCm, float *dD,
                         float *dz, float *dbias, float *dh0, int nthreads) {
    const int64_t nchunks = (L + K - 1) / K;
    const int64_t bln = Bt * L * N;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > Bt * D) nthreads = (int)(Bt * D);
    /* per-thread accumulators: dB, dC (thread 0 writes into the outputs directly), and
       dA (D*N), dD, dbias (D) in double */
    float *bufBC = nthreads > 1 ? (float *)calloc((size_t)(nthreads - 1) * 2 * bln, sizeof(float)) : NULL;
    double *bufA = (double *)calloc((size_t)nthreads * (D * N + 2 * D), sizeof(double));
    if ((nthreads > 1 && !bufBC) || !bufA) {
        free(bufBC);
        free(bufA);
        return 1;
    }
    memset(dBm, 0, (size_t)bln * sizeof(float));
    memset(dCm, 0, (size_t)bln * sizeof(float));
#pragma omp parallel num_threads(nthreads)
    {
        FSG_FTZ_BEGIN
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        int64_t lo, hi;
        thread_range(Bt * D, &lo, &hi);
        float *tdB = tid == 0 ? dBm : bufBC + (size_t)(tid - 1) * 2 * bln;
        float *tdC = tid == 0 ? dCm : tdB + bln;
        double *tdA = bufA + (size_t)tid * (D * N + 2 * D), *tdD = tdA + D * N, *tdbias = tdD + D;
        work_t w;
        float *mem = (float *)malloc((size_t)(2 * K * N + 6 * K + (hi - lo) * N) * sizeof(float));
        w.hbuf = mem;
        w.abuf = mem + K * N;
        w.dtv = mem + 2 * K * N;
        w.dsp = w.dtv + K;
        w.gate = w.dsp + K;
        w.sz = w.gate + K;
        w.ys = w.sz + K;
        float *gs = w.ys + K;
        for (int64_t bd = lo; bd < hi; bd++)
            for (int64_t n = 0; n < N; n++) gs[(bd - lo) * N + n] = dlast ? dlast[bd * N + n] : 0.f;
        for (int64_t c = nchunks - 1; c >= 0; c--) {
            const int64_t t0 = c * K, len = (t0 + K < L) ? K : L - t0;
            for (int64_t bd = lo; bd < hi; bd++) {
                const int64_t b = bd / D, d = bd % D;
                const float bs = bias ? bias[d] : 0.f, Dd = Dv ? Dv[d] : 0.f;
                const float *zd = z ? z + bd * L : NULL;
                float *dzd = dz ? dz + bd * L : NULL;
                const float *st_c = states + (bd * nchunks + c) * N;
                float *gio = gs + (bd - lo) * N;
                if (N == 16)
                    bwd_chunk(t0, len, 16, u + bd * L, delta + bd * L, A + d * N, Bm + b * L * N, Cm + b * L * N,
                              Dd, zd, bs, softplus, st_c, dout + bd * L, du + bd * L, ddelta + bd * L, dzd,
                              tdB + b * L * N, tdC + b * L * N, gio, tdA + d * N, tdD + d, tdbias + d, w);
                else
                    bwd_chunk(t0, len, N, u + bd * L, delta + bd * L, A + d * N, Bm + b * L * N, Cm + b * L * N,
                              Dd, zd, bs, softplus, st_c, dout + bd * L, du + bd * L, ddelta + bd * L, dzd,
                              tdB + b * L * N, tdC + b * L * N, gio, tdA + d * N, tdD + d, tdbias + d, w);
            }
        }
        if (dh0) memcpy(dh0 + lo * N, gs, (size_t)(hi - lo) * N * sizeof(float));
        free(mem);
        FSG_FTZ_END
    }
    /* reduce the per-thread accumulators */
    if (nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < bln; i++) {
            float sb = dBm[i], sc = dCm[i];
            for (int th = 0; th < nthreads - 1; th++) {
                sb += bufBC[(size_t)th * 2 * bln + i];
                sc += bufBC[(size_t)th * 2 * bln + bln + i];
            }
            dBm[i] = sb;
            dCm[i] = sc;
        }
    }
    for (int64_t i = 0; i < D * N; i++) {
        double s = 0.0;
        for (int th = 0; th < nthreads; th++) s += bufA[(size_t)th * (D * N + 2 * D) + i];
        dA[i] = (float)s;
    }
    for (int64_t i = 0; i < D; i++) {
        double sd = 0.0, sb = 0.0;
        for (int th = 0; th < nthreads; th++) {
            sd += bufA[(size_t)th * (D * N + 2 * D) + D * N + i];
            sb += bufA[(size_t)th * (D * N + 2 * D) + D * N + D + i];
        }
        if (dD) dD[i] = (float)sd;
        if (dbias) dbias[i] = (float)sb;
    }
    free(bufBC);
    free(bufA);
    return 0;
}

/*
 * Causal depthwise 1-D convolution, x (Bt, D, L) -> out (Bt, D, L), optionally followed by SiLU:
 *   pre[b,d,t] = bias[d] + sum_k w[d,k] * x[b,d,t-(K-1)+k]   (x = 0 before t = 0)
 *   out = silu(pre) if silu else pre
 * and its backward, which recomputes pre (nothing but x is kept). One (batch, channel) row per
 * work item; FTZ as above.
 */
static inline void conv_row(int64_t L, int64_t K, const float *xd, const float *wd, float b0, float *od) {
#pragma omp simd
    for (int64_t t = 0; t < L; t++) od[t] = b0;
    for (int64_t k = 0; k < K; k++) {
        const int64_t s = K - 1 - k; /* pre[t] += w[k] * x[t - s] */
        if (s >= L) continue;
        const float wk = wd[k];
#pragma omp simd
        for (int64_t t = s; t < L; t++) od[t] += wk * xd[t - s];
    }
}

FSG_API void fsg_conv_fwd(int64_t Bt, int64_t D, int64_t L, int64_t K, const float *x, const float *w,
                          const float *bias, float *out, int silu, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        FSG_FTZ_BEGIN
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < Bt * D; bd++) {
            const int64_t d = bd % D;
            float *od = out + bd * L;
            conv_row(L, K, x + bd * L, w + d * K, bias ? bias[d] : 0.f, od);
            if (silu) {
#pragma omp simd
                for (int64_t t = 0; t < L; t++) od[t] = od[t] * sigmoid_f(od[t]);
            }
        }
        FSG_FTZ_END
    }
}

FSG_API int fsg_conv_bwd(int64_t Bt, int64_t D, int64_t L, int64_t K, const float *x, const float *w,
                         const float *bias, const float *dout, int silu, float *dx, float *dw, float *dbias,
                         int nthreads) {
    if (nthreads < 1) nthreads = 1;
    double *acc = (double *)calloc((size_t)nthreads * D * (K + 1), sizeof(double));
    if (!acc) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FSG_FTZ_BEGIN
#ifdef _OPENMP
        double *tacc = acc + (size_t)omp_get_thread_num() * D * (K + 1);
#else
        double *tacc = acc;
#endif
        float *gpre = silu ? (float *)malloc((size_t)L * sizeof(float)) : NULL;
        if (silu && !gpre) failed = 1;
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < Bt * D; bd++) {
            if (silu && !gpre) continue;
            const int64_t d = bd % D;
            const float *xd = x + bd * L, *wd = w + d * K;
            const float *gd = dout + bd * L;
            if (silu) { /* dpre = dout * silu'(pre), pre recomputed */
                conv_row(L, K, xd, wd, bias ? bias[d] : 0.f, gpre);
#pragma omp simd
                for (int64_t t = 0; t < L; t++) {
                    const float p = gpre[t], sg = sigmoid_f(p);
                    gpre[t] = gd[t] * sg * (1.f + p * (1.f - sg));
                }
                gd = gpre;
            }
            float *dxd = dx + bd * L;
#pragma omp simd
            for (int64_t t = 0; t < L; t++) dxd[t] = 0.f;
            float sb = 0.f;
#pragma omp simd reduction(+ : sb)
            for (int64_t t = 0; t < L; t++) sb += gd[t];
            tacc[d * (K + 1) + K] += sb;
            for (int64_t k = 0; k < K; k++) {
                const int64_t s = K - 1 - k;
                if (s >= L) continue;
                const float wk = wd[k];
                float sw = 0.f;
#pragma omp simd reduction(+ : sw)
                for (int64_t t = s; t < L; t++) {
                    dxd[t - s] += wk * gd[t];
                    sw += gd[t] * xd[t - s];
                }
                tacc[d * (K + 1) + k] += sw;
            }
        }
        free(gpre);
        FSG_FTZ_END
    }
    for (int64_t d = 0; d < D; d++) {
        for (int64_t k = 0; k <= K; k++) {
            double s = 0.0;
            for (int th = 0; th < nthreads; th++) s += acc[(size_t)th * D * (K + 1) + d * (K + 1) + k];
            if (k < K) dw[d * K + k] = (float)s;
            else if (dbias) dbias[d] = (float)s;
        }
    }
    free(acc);
    return failed;
}
