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
#ifdef __F16C__
#include <immintrin.h>
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

FSG_API int fsg_scan_version(void) { return 13; }

/* ---------------------------------------------------------------------------------------------
 * 16-bit storage of the streaming state (the step kernels only): `fmt` 0 = float32, 1 = bfloat16,
 * 2 = float16 (IEEE binary16). The arithmetic stays float32: a row of old states is widened on
 * load (exact) and the new row is rounded to nearest, ties to even, on store, bit for bit as
 * PyTorch's `.to(torch.bfloat16)` / `.to(torch.float16)` (NaN stays NaN; float32 inputs below
 * 2^-126 are flushed to zero by the kernels' FTZ/DAZ mode before they get here). float16 uses
 * the F16C instructions where the compiler targets them (they ignore FTZ/DAZ, so float16
 * subnormals are kept), else the portable integer routines below. */
#define FSG_F32 0
#define FSG_BF16 1
#define FSG_F16 2

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16; /* round to nearest even */
    return (uint16_t)((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r); /* NaN: a quiet NaN */
}

static inline float f16_to_f32_portable(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t b;
    if (e == 0x1Fu) {
        b = sign | 0x7F800000u | (m << 13); /* inf, NaN */
    } else if (e != 0) {
        b = sign | ((e + 112u) << 23) | (m << 13);
    } else { /* zero or subnormal: m · 2^-24, a normal float32 (exact) */
        const float v = (float)m * 5.9604644775390625e-8f;
        memcpy(&b, &v, sizeof b);
        b |= sign;
    }
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t f32_to_f16_portable(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);  /* NaN */
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: inf */
    if (ax >= 0x38800000u) /* a float16 normal: rebias the exponent, round the 13 dropped bits */
        return (uint16_t)(sign | ((ax - 0x38000000u + 0xFFFu + ((ax >> 13) & 1u)) >> 13));
    const uint32_t e = ax >> 23;
    if (e < 102u) return (uint16_t)sign; /* below 2^-25: rounds to zero */
    /* a float16 subnormal: q = round_even(mantissa · 2^(e - 126)), shift 14..24 */
    const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u, shift = 126u - e;
    const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return (uint16_t)(sign | (q + (rem > half || (rem == half && (q & 1u)))));
}

/* widen / round one row of N states (element offset i0 of the 16-bit or float32 array) */
static inline void load_state_row(const int fmt, const void *src, int64_t i0, const int64_t N, float *restrict dst) {
    if (fmt == FSG_BF16) {
        const uint16_t *s = (const uint16_t *)src + i0;
#pragma omp simd
        for (int64_t n = 0; n < N; n++) dst[n] = bf16_to_f32(s[n]);
    } else if (fmt == FSG_F16) {
        const uint16_t *s = (const uint16_t *)src + i0;
        int64_t n = 0;
#ifdef __F16C__
        for (; n + 8 <= N; n += 8) _mm256_storeu_ps(dst + n, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + n))));
        for (; n < N; n++) dst[n] = _cvtsh_ss(s[n]);
#else
        for (; n < N; n++) dst[n] = f16_to_f32_portable(s[n]);
#endif
    } else {
        memcpy(dst, (const float *)src + i0, (size_t)N * sizeof(float));
    }
}

static inline void store_state_row(const int fmt, void *dst, int64_t i0, const int64_t N, const float *restrict src) {
    if (fmt == FSG_BF16) {
        uint16_t *d = (uint16_t *)dst + i0;
#pragma omp simd
        for (int64_t n = 0; n < N; n++) d[n] = f32_to_bf16(src[n]);
    } else if (fmt == FSG_F16) {
        uint16_t *d = (uint16_t *)dst + i0;
        int64_t n = 0;
#ifdef __F16C__
        for (; n + 8 <= N; n += 8)
            _mm_storeu_si128((__m128i *)(d + n), _mm256_cvtps_ph(_mm256_loadu_ps(src + n), _MM_FROUND_TO_NEAREST_INT));
        for (; n < N; n++) d[n] = _cvtss_sh(src[n], _MM_FROUND_TO_NEAREST_INT);
#else
        for (; n < N; n++) d[n] = f32_to_f16_portable(src[n]);
#endif
    } else {
        memcpy((float *)dst + i0, src, (size_t)N * sizeof(float));
    }
}

/* The conversions on their own, for the tests: n values src -> dst; to16 = 1: float32 -> fmt,
   0: fmt -> float32; portable = 1: float16 through the integer routines even where F16C is used. */
FSG_API void fsg_state_convert(int64_t n, int fmt, int to16, int portable, const void *src, void *dst) {
    if (portable && fmt == FSG_F16) {
        for (int64_t i = 0; i < n; i++) {
            if (to16) ((uint16_t *)dst)[i] = f32_to_f16_portable(((const float *)src)[i]);
            else ((float *)dst)[i] = f16_to_f32_portable(((const uint16_t *)src)[i]);
        }
    } else if (to16) {
        store_state_row(fmt, dst, 0, n, (const float *)src);
    } else {
        load_state_row(fmt, src, 0, n, (float *)dst);
    }
}

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

/* ---------------------------------------------------------------------------------------------
 * Channel-blocked path (d_state = 16): 16 channels of one batch element advance together, one
 * channel per vector lane, so every operation of the recurrence is a full-width vector operation
 * with no horizontal sums (the 16 states of the 16 channels are 16 vectors). The rows of u,
 * delta, z, dout of the block are transposed chunk by chunk into [K][16] tiles in cache.
 * ------------------------------------------------------------------------------------------- */
#define CW 16 /* channels per block (vector lanes) */
#define CN 16 /* d_state of the blocked path */

static inline void load_tile(const float *rows, int64_t L, int64_t t0, int64_t len, float *tile) {
    for (int l = 0; l < CW; l++) {
        const float *r = rows + l * L + t0;
        for (int64_t i = 0; i < len; i++) tile[i * CW + l] = r[i];
    }
}

static inline void store_tile(float *rows, int64_t L, int64_t t0, int64_t len, const float *tile) {
    for (int l = 0; l < CW; l++) {
        float *r = rows + l * L + t0;
        for (int64_t i = 0; i < len; i++) r[i] = tile[i * CW + l];
    }
}

typedef struct {
    float *tu, *tdt, *tdsp, *tz, *tsz, *tg, *to, *tdy, *tdu, *tdd, *tdz, *ys, *hbuf, *abuf, *dBl, *dCl;
} tiles_t;

/* A rank-1 factored input v[b, d, t] = w[d] * x[b, t] (d_model = 1 or dt_rank = 1 in Mamba):
   w points at the block's first channel, x at the batch element's row. */
static inline void fac_tile(const float *fw, const float *fx, int64_t t0, int64_t len, float *tile) {
    for (int64_t i = 0; i < len; i++) {
        const float xv = fx[t0 + i];
#pragma omp simd
        for (int l = 0; l < CW; l++) tile[i * CW + l] = fw[l] * xv;
    }
}

/* The gradient of a factored input: dw[l] += sum_t g[t, l] x[t], dx[t] += sum_l g[t, l] w[l]. */
static inline void fac_grad_tile(const float *tile, const float *fw, const float *fx, int64_t t0, int64_t len,
                                 double *dw, float *dx) {
    float acc[CW];
    for (int l = 0; l < CW; l++) acc[l] = 0.f;
    for (int64_t i = 0; i < len; i++) {
        const float xv = fx[t0 + i];
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int l = 0; l < CW; l++) {
            s += tile[i * CW + l] * fw[l];
            acc[l] += tile[i * CW + l] * xv;
        }
        dx[t0 + i] += s;
    }
    for (int l = 0; l < CW; l++) dw[l] += acc[l];
}

/* dt tile = softplus(delta + bias) (dsp = its derivative), gate tile = silu(z) (sz = sigmoid). */
static inline void block_prepass(int64_t len, const float *bs, int softplus, int has_z, tiles_t *w, int grads) {
    for (int64_t i = 0; i < len; i++) {
#pragma omp simd
        for (int l = 0; l < CW; l++) w->tdt[i * CW + l] += bs[l];
    }
    const int64_t m = len * CW;
    if (softplus) {
        if (grads) {
#pragma omp simd
            for (int64_t j = 0; j < m; j++) w->tdsp[j] = sigmoid_f(w->tdt[j]);
        }
#pragma omp simd
        for (int64_t j = 0; j < m; j++) w->tdt[j] = softplus_f(w->tdt[j]);
    } else if (grads) {
#pragma omp simd
        for (int64_t j = 0; j < m; j++) w->tdsp[j] = 1.f;
    }
    if (has_z) {
#pragma omp simd
        for (int64_t j = 0; j < m; j++) w->tsz[j] = sigmoid_f(w->tz[j]);
#pragma omp simd
        for (int64_t j = 0; j < m; j++) w->tg[j] = w->tz[j] * w->tsz[j];
    }
}

/* delta: drows, or (if drows is NULL) the factors dfw, dfx; z likewise (no z if all NULL). */
static void fwd_block(int64_t t0, int64_t len, int64_t L, const float *urows, const float *drows,
                      const float *zrows, float *orows, const float *At, const float *Dv, const float *bs,
                      int softplus, const float *Bb, const float *Cb, float *h, tiles_t *w,
                      const float *dfw, const float *dfx, const float *zfw, const float *zfx) {
    const int has_z = zrows != NULL || zfx != NULL;
    load_tile(urows, L, t0, len, w->tu);
    if (drows) load_tile(drows, L, t0, len, w->tdt);
    else fac_tile(dfw, dfx, t0, len, w->tdt);
    if (zrows) load_tile(zrows, L, t0, len, w->tz);
    else if (zfx) fac_tile(zfw, zfx, t0, len, w->tz);
    block_prepass(len, bs, softplus, has_z, w, 0);
    for (int64_t i = 0; i < len; i++) {
        const float *Bt_ = Bb + (t0 + i) * CN, *Ct_ = Cb + (t0 + i) * CN;
        const float *dt = w->tdt + i * CW, *uu = w->tu + i * CW;
        float acc[CW], du[CW];
#pragma omp simd
        for (int l = 0; l < CW; l++) {
            du[l] = dt[l] * uu[l];
            acc[l] = Dv[l] * uu[l];
        }
        for (int n = 0; n < CN; n++) {
            const float b = Bt_[n], c = Ct_[n];
            float *hn = h + n * CW;
            const float *An = At + n * CW;
#pragma omp simd
            for (int l = 0; l < CW; l++) {
                const float v = fsg_expf(dt[l] * An[l]) * hn[l] + du[l] * b;
                hn[l] = v;
                acc[l] += c * v;
            }
        }
        float *o = w->to + i * CW;
        if (has_z) {
#pragma omp simd
            for (int l = 0; l < CW; l++) o[l] = acc[l] * w->tg[i * CW + l];
        } else {
#pragma omp simd
            for (int l = 0; l < CW; l++) o[l] = acc[l];
        }
    }
    store_tile(orows, L, t0, len, w->to);
}

/* Backward of one block over chunk [t0, t0+len). hst: the chunk's start states [CN][CW];
   g: dL/dh [CN][CW] (end of chunk in, start of chunk out). dB/dC contributions are accumulated
   per lane into w->dBl / w->dCl ([K][CN][CW]), summed over lanes later. */
typedef struct { /* factored delta / z of one block: inputs, and where their gradients go */
    const float *dfw, *dfx, *zfw, *zfx;
    double *ddw, *dzw; /* per-lane (channel) weight gradients */
    float *ddx, *dzx;  /* the batch element's row of the x gradients */
} facs_t;

static void bwd_block(int64_t t0, int64_t len, int64_t L, const float *urows, const float *drows,
                      const float *zrows, const float *dyrows, float *durows, float *ddrows, float *dzrows,
                      const float *At, const float *Dv, const float *bs, int softplus, const float *Bb,
                      const float *Cb, const float *hst, float *g, float *dAc, float *dDc, float *dbc,
                      float *yrows, tiles_t *w, facs_t f) {
    const int has_z = zrows != NULL || f.zfx != NULL;
    load_tile(urows, L, t0, len, w->tu);
    if (drows) load_tile(drows, L, t0, len, w->tdt);
    else fac_tile(f.dfw, f.dfx, t0, len, w->tdt);
    load_tile(dyrows, L, t0, len, w->tdy);
    if (zrows) load_tile(zrows, L, t0, len, w->tz);
    else if (f.zfx) fac_tile(f.zfw, f.zfx, t0, len, w->tz);
    block_prepass(len, bs, softplus, has_z, w, 1);
    /* recompute states, decays and pre-gate outputs */
    for (int64_t i = 0; i < len; i++) {
        const float *Bt_ = Bb + (t0 + i) * CN, *Ct_ = Cb + (t0 + i) * CN;
        const float *dt = w->tdt + i * CW, *uu = w->tu + i * CW;
        const float *hp = i > 0 ? w->hbuf + (i - 1) * CN * CW : hst;
        float *hc = w->hbuf + i * CN * CW, *ac = w->abuf + i * CN * CW;
        float acc[CW], du[CW];
#pragma omp simd
        for (int l = 0; l < CW; l++) {
            du[l] = dt[l] * uu[l];
            acc[l] = Dv[l] * uu[l];
        }
        for (int n = 0; n < CN; n++) {
            const float b = Bt_[n], c = Ct_[n];
#pragma omp simd
            for (int l = 0; l < CW; l++) {
                const float a = fsg_expf(dt[l] * At[n * CW + l]);
                const float v = a * hp[n * CW + l] + du[l] * b;
                ac[n * CW + l] = a;
                hc[n * CW + l] = v;
                acc[l] += c * v;
            }
        }
#pragma omp simd
        for (int l = 0; l < CW; l++) w->ys[i * CW + l] = acc[l];
        if (yrows) {
            float *o = w->to + i * CW;
            if (has_z) {
#pragma omp simd
                for (int l = 0; l < CW; l++) o[l] = acc[l] * w->tg[i * CW + l];
            } else {
#pragma omp simd
                for (int l = 0; l < CW; l++) o[l] = acc[l];
            }
        }
    }
    if (yrows) store_tile(yrows, L, t0, len, w->to);
    /* back-propagate through the chunk */
    for (int64_t i = len - 1; i >= 0; i--) {
        const float *Bt_ = Bb + (t0 + i) * CN, *Ct_ = Cb + (t0 + i) * CN;
        const float *dt = w->tdt + i * CW, *uu = w->tu + i * CW;
        const float *hc = w->hbuf + i * CN * CW, *ac = w->abuf + i * CN * CW;
        const float *hp = i > 0 ? hc - CN * CW : hst;
        float *dBi = w->dBl + i * CN * CW, *dCi = w->dCl + i * CN * CW;
        float dys[CW], dtu[CW], ddt[CW], gB[CW];
        if (has_z) {
#pragma omp simd
            for (int l = 0; l < CW; l++) {
                const float s = w->tsz[i * CW + l], dy = w->tdy[i * CW + l];
                w->tdz[i * CW + l] = dy * w->ys[i * CW + l] * s * (1.f + w->tz[i * CW + l] * (1.f - s));
                dys[l] = dy * w->tg[i * CW + l];
            }
        } else {
#pragma omp simd
            for (int l = 0; l < CW; l++) dys[l] = w->tdy[i * CW + l];
        }
#pragma omp simd
        for (int l = 0; l < CW; l++) {
            dDc[l] += dys[l] * uu[l];
            dtu[l] = dt[l] * uu[l];
            ddt[l] = 0.f;
            gB[l] = 0.f;
        }
        int any_dy = 0;
        for (int l = 0; l < CW; l++) any_dy |= dys[l] != 0.f;
        if (any_dy) {
            for (int n = 0; n < CN; n++) {
                const float b = Bt_[n], c = Ct_[n];
                float *gn_ = g + n * CW;
#pragma omp simd
                for (int l = 0; l < CW; l++) {
                    const float gn = gn_[l] + dys[l] * c;
                    dCi[n * CW + l] += dys[l] * hc[n * CW + l];
                    const float da = gn * hp[n * CW + l] * ac[n * CW + l];
                    ddt[l] += da * At[n * CW + l];
                    dAc[n * CW + l] += da * dt[l];
                    gB[l] += gn * b;
                    dBi[n * CW + l] += gn * dtu[l];
                    gn_[l] = gn * ac[n * CW + l];
                }
            }
        } else { /* no output gradient at t (e.g. history positions of the flat layout): no dC term */
            for (int n = 0; n < CN; n++) {
                const float b = Bt_[n];
                float *gn_ = g + n * CW;
#pragma omp simd
                for (int l = 0; l < CW; l++) {
                    const float gn = gn_[l];
                    const float da = gn * hp[n * CW + l] * ac[n * CW + l];
                    ddt[l] += da * At[n * CW + l];
                    dAc[n * CW + l] += da * dt[l];
                    gB[l] += gn * b;
                    dBi[n * CW + l] += gn * dtu[l];
                    gn_[l] = gn * ac[n * CW + l];
                }
            }
        }
#pragma omp simd
        for (int l = 0; l < CW; l++) {
            w->tdu[i * CW + l] = dys[l] * Dv[l] + dt[l] * gB[l];
            const float ddl = (ddt[l] + uu[l] * gB[l]) * w->tdsp[i * CW + l];
            w->tdd[i * CW + l] = ddl;
            dbc[l] += ddl;
        }
    }
    store_tile(durows, L, t0, len, w->tdu);
    if (ddrows) store_tile(ddrows, L, t0, len, w->tdd);
    else fac_grad_tile(w->tdd, f.dfw, f.dfx, t0, len, f.ddw, f.ddx);
    if (dzrows) store_tile(dzrows, L, t0, len, w->tdz);
    else if (f.zfx) fac_grad_tile(w->tdz, f.zfw, f.zfx, t0, len, f.dzw, f.dzx);
}

static inline int tiles_alloc(tiles_t *w, int64_t K) {
    const size_t kt = (size_t)K * CW, kb = (size_t)K * CN * CW;
    float *m = (float *)calloc(13 * kt + 4 * kb, sizeof(float));
    if (!m) return 1;
    w->tu = m; w->tdt = m + kt; w->tdsp = m + 2 * kt; w->tz = m + 3 * kt; w->tsz = m + 4 * kt;
    w->tg = m + 5 * kt; w->to = m + 6 * kt; w->tdy = m + 7 * kt; w->tdu = m + 8 * kt; w->tdd = m + 9 * kt;
    w->tdz = m + 10 * kt; w->ys = m + 11 * kt;
    w->hbuf = m + 13 * kt; w->abuf = w->hbuf + kb; w->dBl = w->abuf + kb; w->dCl = w->dBl + kb;
    return 0;
}

/* Work units of the blocked layout: per batch element, D/CW blocks then D%CW single channels.
   Threads get contiguous unit ranges of about equal cost (a block costs ~6 single channels). */
#define BLOCK_COST 6
static inline void unit_range(int64_t Bt, int64_t nblk, int64_t tail, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int64_t tid = 0, nth = 1;
#endif
    const int64_t per = nblk + tail, total = Bt * per;
    const int64_t cost_per_b = nblk * BLOCK_COST + tail, total_cost = Bt * cost_per_b;
    int64_t bounds[2];
    for (int e = 0; e < 2; e++) {
        const int64_t target = total_cost * (tid + e) / nth;
        /* first unit whose cumulative cost start >= target */
        int64_t b = cost_per_b ? target / cost_per_b : 0, rem = target - b * cost_per_b, k;
        if (rem <= nblk * BLOCK_COST)
            k = (rem + BLOCK_COST - 1) / BLOCK_COST;
        else
            k = nblk + (rem - nblk * BLOCK_COST);
        int64_t u = b * per + k;
        bounds[e] = u > total ? total : u;
    }
    *lo = bounds[0];
    *hi = (tid == nth - 1) ? total : bounds[1];
}

/* Per-thread unit states ([CN][CW] per channel block, [N] per single channel) from / to the
   (Bt, D, N) row layout of h0, last, dlast, dh0 (src NULL: zeros). */
static void rows_to_units(const float *src, int64_t lo, int64_t hi, int64_t per, int64_t nblk, int64_t D,
                          int64_t N, int64_t ssz, float *units) {
    for (int64_t un = lo; un < hi; un++) {
        const int64_t b = un / per, k = un % per;
        float *hu = units + (un - lo) * ssz;
        if (k < nblk) {
            for (int n = 0; n < CN; n++)
                for (int l = 0; l < CW; l++) hu[n * CW + l] = src ? src[(b * D + k * CW + l) * N + n] : 0.f;
        } else {
            const int64_t bd = b * D + nblk * CW + (k - nblk);
            for (int64_t n = 0; n < N; n++) hu[n] = src ? src[bd * N + n] : 0.f;
        }
    }
}

static void units_to_rows(const float *units, int64_t lo, int64_t hi, int64_t per, int64_t nblk, int64_t D,
                          int64_t N, int64_t ssz, float *dst) {
    for (int64_t un = lo; un < hi; un++) {
        const int64_t b = un / per, k = un % per;
        const float *hu = units + (un - lo) * ssz;
        if (k < nblk) {
            for (int l = 0; l < CW; l++)
                for (int n = 0; n < CN; n++) dst[(b * D + k * CW + l) * N + n] = hu[n * CW + l];
        } else {
            memcpy(dst + (b * D + nblk * CW + (k - nblk)) * N, hu, N * sizeof(float));
        }
    }
}

/* The gradient of one factored row (channel d of batch element b) over [t0, t0+len):
   dw += sum_t g[t] x[t], dx[t] += g[t] w. */
static inline void fac_grad_row(const float *g, float w, const float *x, int64_t t0, int64_t len, double *dw,
                                float *dx) {
    double a = 0.0;
    for (int64_t i = 0; i < len; i++) {
        a += (double)g[t0 + i] * x[t0 + i];
        dx[t0 + i] += g[t0 + i] * w;
    }
    *dw += a;
}

/* The loops run chunk-major: every thread takes a fixed range of work units (channel blocks or
   single channels) and advances all of them chunk by chunk, so the chunk's rows of B and C
   (shared by all channels) are read from cache rather than streamed from memory per channel. */

/* Transposed A and the per-lane D / bias of every channel block: [nblk][CN][CW], [nblk][CW]. */
static float *block_params(int64_t nblk, const float *A, const float *Dv, const float *bias) {
    float *p = (float *)malloc((size_t)nblk * (CN * CW + 2 * CW) * sizeof(float));
    if (!p) return NULL;
    for (int64_t k = 0; k < nblk; k++) {
        float *At = p + k * (CN * CW + 2 * CW), *Dk = At + CN * CW, *bk = Dk + CW;
        for (int l = 0; l < CW; l++) {
            const int64_t d = k * CW + l;
            for (int n = 0; n < CN; n++) At[n * CW + l] = A[d * CN + n];
            Dk[l] = Dv ? Dv[d] : 0.f;
            bk[l] = bias ? bias[d] : 0.f;
        }
    }
    return p;
}

/* states may be NULL when L <= K: the only chunk-start state is h0 itself (the caller passes h0
   as `states` to the backward) or, without h0, zero (the caller passes NULL to the backward). */
/* delta (or, if delta is NULL, its factors dfw (D), dfx (Bt, L): delta[b,d,t] = dfw[d] dfx[b,t]),
   z likewise (z NULL and zfx NULL: no gate). */
FSG_API int fsg_scan_fwd(int64_t Bt, int64_t D, int64_t L, int64_t N, int64_t K,
                         const float *u, const float *delta, const float *A, const float *Bm,
                         const float *Cm, const float *Dv, const float *z, const float *bias,
                         int softplus, const float *h0, float *out, float *states, float *last,
                         const float *dfw, const float *dfx, const float *zfw, const float *zfx,
                         int nthreads) {
    const int64_t nchunks = (L + K - 1) / K;
    const int64_t nblk = (N == CN) ? D / CW : 0, tail = D - nblk * CW, per = nblk + tail;
    if (nthreads < 1) nthreads = 1;
    float *bp = nblk ? block_params(nblk, A, Dv, bias) : NULL;
    if (nblk && !bp) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FSG_FTZ_BEGIN
        int64_t lo, hi;
        unit_range(Bt, nblk, tail, &lo, &hi);
        const int64_t ssz = (nblk && CN * CW > N) ? CN * CW : N; /* state slots per unit */
        float *hs = (float *)malloc((size_t)((hi - lo) * ssz + 2 * K + 2 * L) * sizeof(float));
        tiles_t w;
        const int tfail = tiles_alloc(&w, K);
        if (!hs || tfail) {
            failed = 1;
        } else {
            float *dtv = hs + (hi - lo) * ssz, *gate = dtv + K;
            float *rowd = gate + K, *rowz = rowd + L; /* factored rows of single channels */
            rows_to_units(h0, lo, hi, per, nblk, D, N, ssz, hs);
            for (int64_t c = 0; c < nchunks; c++) {
                const int64_t t0 = c * K, len = (t0 + K < L) ? K : L - t0;
                for (int64_t un = lo; un < hi; un++) {
                    const int64_t b = un / per, k = un % per;
                    float *hu = hs + (un - lo) * ssz;
                    const float *Bb = Bm + b * L * N, *Cb = Cm + b * L * N;
                    if (k < nblk) {
                        const int64_t bd0 = b * D + k * CW;
                        if (states)
                            for (int l = 0; l < CW; l++)
                                for (int n = 0; n < CN; n++) states[((bd0 + l) * nchunks + c) * N + n] = hu[n * CW + l];
                        const float *At = bp + k * (CN * CW + 2 * CW);
                        fwd_block(t0, len, L, u + bd0 * L, delta ? delta + bd0 * L : NULL, z ? z + bd0 * L : NULL,
                                  out + bd0 * L, At, At + CN * CW, At + CN * CW + CW, softplus, Bb, Cb, hu, &w,
                                  dfw ? dfw + k * CW : NULL, dfx ? dfx + b * L : NULL, zfw ? zfw + k * CW : NULL,
                                  zfx ? zfx + b * L : NULL);
                    } else {
                        const int64_t d = nblk * CW + (k - nblk), bd = b * D + d;
                        if (states) memcpy(states + (bd * nchunks + c) * N, hu, N * sizeof(float));
                        const float *dd = delta ? delta + bd * L : rowd;
                        const float *zd = z ? z + bd * L : (zfx ? rowz : NULL);
                        if (!delta)
                            for (int64_t i = 0; i < len; i++) rowd[t0 + i] = dfw[d] * dfx[b * L + t0 + i];
                        if (!z && zfx)
                            for (int64_t i = 0; i < len; i++) rowz[t0 + i] = zfw[d] * zfx[b * L + t0 + i];
                        const float bs = bias ? bias[d] : 0.f, Dd = Dv ? Dv[d] : 0.f;
                        if (N == 16)
                            fwd_chunk(t0, len, 16, u + bd * L, dd, A + d * N, Bb, Cb, Dd, zd, bs,
                                      softplus, hu, out + bd * L, dtv, gate);
                        else
                            fwd_chunk(t0, len, N, u + bd * L, dd, A + d * N, Bb, Cb, Dd, zd, bs,
                                      softplus, hu, out + bd * L, dtv, gate);
                    }
                }
            }
            if (last) units_to_rows(hs, lo, hi, per, nblk, D, N, ssz, last);
        }
        free(hs);
        if (!tfail) free(w.tu);
        FSG_FTZ_END
    }
    free(bp);
    return failed;
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
                             double *dD_d, double *dbias_d, float *yd, work_t w) {
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
        if (yd) yd[t] = zd ? w.ys[i] * w.gate[i] : w.ys[i];
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

/* Factored delta / z as in fsg_scan_fwd; their gradients then go to ddw (D), ddx (Bt, L) and
   dzw (D), dzx (Bt, L) instead of ddelta / dz. */
FSG_API int fsg_scan_bwd(int64_t Bt, int64_t D, int64_t L, int64_t N, int64_t K,
                         const float *u, const float *delta, const float *A, const float *Bm,
                         const float *Cm, const float *Dv, const float *z, const float *bias,
                         int softplus, const float *states, const float *dout, const float *dlast,
                         float *du, float *ddelta, float *dA, float *dBm, float *dCm, float *dD,
                         float *dz, float *dbias, float *dh0, float *yout,
                         const float *dfw, const float *dfx, const float *zfw, const float *zfx,
                         float *ddw, float *ddx, float *dzw, float *dzx, int nthreads) {
    /* yout (optional, (Bt, D, L)): the forward output y, recomputed on the way */
    const int64_t nchunks = (L + K - 1) / K;
    const int64_t bln = Bt * L * N;
    const int64_t nblk = (N == CN) ? D / CW : 0, tail = D - nblk * CW, per = nblk + tail;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > Bt * per) nthreads = (int)(Bt * per);
    /* per-thread accumulators: dB, dC and the factors' ddx, dzx (thread 0 writes into the outputs
       directly), and dA (D*N), dD, dbias, ddw, dzw (D) in double */
    const int64_t BL = Bt * L, fsz = 2 * bln + 2 * BL, asz = D * N + 4 * D;
    float *bufBC = nthreads > 1 ? (float *)calloc((size_t)(nthreads - 1) * fsz, sizeof(float)) : NULL;
    double *bufA = (double *)calloc((size_t)nthreads * asz, sizeof(double));
    float *bp = nblk ? block_params(nblk, A, Dv, bias) : NULL;
    if ((nthreads > 1 && !bufBC) || !bufA || (nblk && !bp)) {
        free(bufBC);
        free(bufA);
        free(bp);
        return 1;
    }
    memset(dBm, 0, (size_t)bln * sizeof(float));
    memset(dCm, 0, (size_t)bln * sizeof(float));
    if (dfx) memset(ddx, 0, (size_t)BL * sizeof(float));
    if (zfx) memset(dzx, 0, (size_t)BL * sizeof(float));
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FSG_FTZ_BEGIN
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        int64_t lo, hi;
        unit_range(Bt, nblk, tail, &lo, &hi);
        float *tb = tid == 0 ? NULL : bufBC + (size_t)(tid - 1) * fsz;
        float *tdB = tid == 0 ? dBm : tb, *tdC = tid == 0 ? dCm : tb + bln;
        float *tddx = tid == 0 ? ddx : tb + 2 * bln, *tdzx = tid == 0 ? dzx : tb + 2 * bln + BL;
        double *tdA = bufA + (size_t)tid * asz, *tdD = tdA + D * N, *tdbias = tdD + D, *tddw = tdbias + D,
               *tdzw = tddw + D;
        const int64_t ssz = (nblk && CN * CW > N) ? CN * CW : N;
        work_t w;
        tiles_t tw;
        const int tfail = tiles_alloc(&tw, K);
        float *mem = (float *)malloc((size_t)(2 * K * N + 6 * K + (hi - lo) * ssz + 3 * CN * CW + N + 4 * L) *
                                     sizeof(float));
        if (!mem || tfail) {
            failed = 1;
        } else {
            w.hbuf = mem;
            w.abuf = mem + K * N;
            w.dtv = mem + 2 * K * N;
            w.dsp = w.dtv + K;
            w.gate = w.dsp + K;
            w.sz = w.gate + K;
            w.ys = w.sz + K;
            float *gs = w.ys + K, *hst = gs + (hi - lo) * ssz, *dAc = hst + CN * CW, *dvec = dAc + CN * CW;
            float *zero_state = dvec + 2 * CW; /* N zeros: the start state when states == NULL */
            for (int64_t n = 0; n < N; n++) zero_state[n] = 0.f;
            /* rows of single channels with factored inputs: delta, z in; their gradients out */
            float *rowd = zero_state + N, *rowz = rowd + L, *rowdd = rowz + L, *rowdz = rowdd + L;
            rows_to_units(dlast, lo, hi, per, nblk, D, N, ssz, gs);
            for (int64_t c = nchunks - 1; c >= 0; c--) {
                const int64_t t0 = c * K, len = (t0 + K < L) ? K : L - t0;
                int64_t pending_b = -1; /* batch element whose lane-accumulated dB/dC await a flush */
                for (int64_t un = lo; un <= hi; un++) {
                    const int64_t b = un < hi ? un / per : -2, k = un < hi ? un % per : 0;
                    if (pending_b >= 0 && (b != pending_b || un == hi)) {
                        /* sum the lane accumulators of batch element pending_b into its dB / dC rows */
                        float *dBr = tdB + (pending_b * L + t0) * N, *dCr = tdC + (pending_b * L + t0) * N;
                        for (int64_t j = 0; j < len * CN; j++) {
                            float sb = 0.f, sc = 0.f;
#pragma omp simd reduction(+ : sb, sc)
                            for (int l = 0; l < CW; l++) {
                                sb += tw.dBl[j * CW + l];
                                sc += tw.dCl[j * CW + l];
                            }
                            dBr[j] += sb;
                            dCr[j] += sc;
                        }
                        pending_b = -1;
                    }
                    if (un == hi) break;
                    float *gu = gs + (un - lo) * ssz;
                    const float *Bb = Bm + b * L * N, *Cb = Cm + b * L * N;
                    if (k < nblk) {
                        const int64_t bd0 = b * D + k * CW;
                        if (pending_b < 0) {
                            memset(tw.dBl, 0, (size_t)len * CN * CW * sizeof(float));
                            memset(tw.dCl, 0, (size_t)len * CN * CW * sizeof(float));
                            pending_b = b;
                        }
                        for (int l = 0; l < CW; l++)
                            for (int n = 0; n < CN; n++)
                                hst[n * CW + l] = states ? states[((bd0 + l) * nchunks + c) * N + n] : 0.f;
                        memset(dAc, 0, (size_t)(CN * CW + 2 * CW) * sizeof(float));
                        float *dDc = dvec, *dbc = dvec + CW;
                        const float *At = bp + k * (CN * CW + 2 * CW);
                        facs_t f = {dfw ? dfw + k * CW : NULL, dfx ? dfx + b * L : NULL, zfw ? zfw + k * CW : NULL,
                                    zfx ? zfx + b * L : NULL, tddw + k * CW, tdzw + k * CW,
                                    dfx ? tddx + b * L : NULL, zfx ? tdzx + b * L : NULL};
                        bwd_block(t0, len, L, u + bd0 * L, delta ? delta + bd0 * L : NULL, z ? z + bd0 * L : NULL,
                                  dout + bd0 * L, du + bd0 * L, delta ? ddelta + bd0 * L : NULL,
                                  z ? dz + bd0 * L : NULL, At, At + CN * CW, At + CN * CW + CW, softplus, Bb, Cb,
                                  hst, gu, dAc, dDc, dbc, yout ? yout + bd0 * L : NULL, &tw, f);
                        for (int l = 0; l < CW; l++) {
                            const int64_t d = k * CW + l;
                            for (int n = 0; n < CN; n++) tdA[d * N + n] += dAc[n * CW + l];
                            tdD[d] += dDc[l];
                            tdbias[d] += dbc[l];
                        }
                    } else {
                        const int64_t d = nblk * CW + (k - nblk), bd = b * D + d;
                        const float bs = bias ? bias[d] : 0.f, Dd = Dv ? Dv[d] : 0.f;
                        if (!delta)
                            for (int64_t i = 0; i < len; i++) rowd[t0 + i] = dfw[d] * dfx[b * L + t0 + i];
                        if (!z && zfx)
                            for (int64_t i = 0; i < len; i++) rowz[t0 + i] = zfw[d] * zfx[b * L + t0 + i];
                        const float *dd = delta ? delta + bd * L : rowd;
                        const float *zd = z ? z + bd * L : (zfx ? rowz : NULL);
                        float *ddd = delta ? ddelta + bd * L : rowdd;
                        float *dzd = z ? dz + bd * L : (zfx ? rowdz : NULL);
                        const float *st_c = states ? states + (bd * nchunks + c) * N : zero_state;
                        if (N == 16)
                            bwd_chunk(t0, len, 16, u + bd * L, dd, A + d * N, Bb, Cb, Dd, zd, bs,
                                      softplus, st_c, dout + bd * L, du + bd * L, ddd, dzd,
                                      tdB + b * L * N, tdC + b * L * N, gu, tdA + d * N, tdD + d, tdbias + d,
                                      yout ? yout + bd * L : NULL, w);
                        else
                            bwd_chunk(t0, len, N, u + bd * L, dd, A + d * N, Bb, Cb, Dd, zd, bs,
                                      softplus, st_c, dout + bd * L, du + bd * L, ddd, dzd,
                                      tdB + b * L * N, tdC + b * L * N, gu, tdA + d * N, tdD + d, tdbias + d,
                                      yout ? yout + bd * L : NULL, w);
                        if (!delta) fac_grad_row(rowdd, dfw[d], dfx + b * L, t0, len, tddw + d, tddx + b * L);
                        if (!z && zfx) fac_grad_row(rowdz, zfw[d], zfx + b * L, t0, len, tdzw + d, tdzx + b * L);
                    }
                }
            }
            if (dh0) units_to_rows(gs, lo, hi, per, nblk, D, N, ssz, dh0);
        }
        free(mem);
        if (!tfail) free(tw.tu);
        FSG_FTZ_END
    }
    free(bp);
    if (failed) {
        free(bufBC);
        free(bufA);
        return 1;
    }
    /* reduce the per-thread accumulators */
    if (nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < bln; i++) {
            float sb = dBm[i], sc = dCm[i];
            for (int th = 0; th < nthreads - 1; th++) {
                sb += bufBC[(size_t)th * fsz + i];
                sc += bufBC[(size_t)th * fsz + bln + i];
            }
            dBm[i] = sb;
            dCm[i] = sc;
        }
        for (int64_t i = 0; i < BL; i++) {
            for (int th = 0; th < nthreads - 1; th++) {
                if (dfx) ddx[i] += bufBC[(size_t)th * fsz + 2 * bln + i];
                if (zfx) dzx[i] += bufBC[(size_t)th * fsz + 2 * bln + BL + i];
            }
        }
    }
    for (int64_t i = 0; i < D * N; i++) {
        double s = 0.0;
        for (int th = 0; th < nthreads; th++) s += bufA[(size_t)th * asz + i];
        dA[i] = (float)s;
    }
    for (int64_t i = 0; i < D; i++) {
        double sd = 0.0, sb = 0.0, sdw = 0.0, szw = 0.0;
        for (int th = 0; th < nthreads; th++) {
            const double *a = bufA + (size_t)th * asz + D * N;
            sd += a[i];
            sb += a[D + i];
            sdw += a[2 * D + i];
            szw += a[3 * D + i];
        }
        if (dD) dD[i] = (float)sd;
        if (dbias) dbias[i] = (float)sb;
        if (dfx) ddw[i] = (float)sdw;
        if (zfx) dzw[i] = (float)szw;
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

/* The step backward kernels' reductions: a thread's float partial sums of dA go into its double
   accumulator every 256 batch elements; at the end the threads' accumulators (dA: D×N, then dD
   and dbias: D each, `D·N + 2·D` doubles per thread) are summed into the outputs. */
static inline void step_flush_dA(double *tdA, float *dAf, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        tdA[i] += dAf[i];
        dAf[i] = 0.f;
    }
}

/* per thread: dA (D·N), dD, dbias, and the factor gradients ddw, dzw (D each) */
#define STEP_ASZ(D, N) ((D) * (N) + 4 * (D))
static void step_bwd_reduce(const double *bufA, int nthreads, int64_t D, int64_t N, float *dA, float *dD,
                            float *dbias, float *ddw, float *dzw) {
    const int64_t asz = STEP_ASZ(D, N);
    for (int64_t i = 0; i < D * N; i++) {
        double s = 0.0;
        for (int th = 0; th < nthreads; th++) s += bufA[(size_t)th * asz + i];
        dA[i] = (float)s;
    }
    for (int64_t i = 0; i < D; i++) {
        double sd = 0.0, sb = 0.0;
        for (int th = 0; th < nthreads; th++) {
            sd += bufA[(size_t)th * asz + D * N + i];
            sb += bufA[(size_t)th * asz + D * N + D + i];
        }
        if (dD) dD[i] = (float)sd;
        if (dbias) dbias[i] = (float)sb;
    }
    for (int64_t i = 0; i < D; i++) {
        double sw = 0.0, sz = 0.0;
        for (int th = 0; th < nthreads; th++) {
            sw += bufA[(size_t)th * asz + D * N + 2 * D + i];
            sz += bufA[(size_t)th * asz + D * N + 3 * D + i];
        }
        if (ddw) ddw[i] = (float)sw;
        if (dzw) dzw[i] = (float)sz;
    }
}

/*
 * One time step (L = 1) for many sequences: the streaming slow-net. The chunk machinery above is
 * pure overhead here; instead each batch element's D rows of N states are updated in a tight
 * loop (state rows contiguous), and the backward needs no cross-thread reduction for dB/dC (one
 * batch element per work item). Layouts as in fsg_scan_fwd with L = 1; B, C as (Bt, N).
 *
 * Per batch element the per-channel scalars (softplus(delta + bias), its derivative, sigmoid(z))
 * are computed first, vectorised over the channels, so that the per-channel state update is one
 * branch-free vector loop with no scalar transcendental in it. The bodies are written once for a
 * runtime N and a state format and inlined for N = 16 (the slow-net's d_state: one 16-lane
 * vector, fully unrolled) and any other N, times the three formats.
 *
 * The state (h0 in, last / hnew out) is stored as `fmt` (float32, bfloat16 or float16, see
 * load_state_row); a 16-bit row, or a row to be written over its own input, is staged through a
 * per-thread float32 row, so the state loops themselves are the same for every format. The
 * output y uses the unrounded new state. In-place streaming: the forward may leave `last` NULL
 * (no new state written; `out` NULL too: advance only, with last == h0) and the backward, which
 * recomputes the new state row by row anyway, may write it (rounded) into `hnew`, typically
 * h0 itself once its row has been used: one copy of the state instead of two.
 *
 * Rank-1 delta / z (d_model = dt_rank = 1, as in fsg_scan_fwd): with `delta` NULL, delta[b, d] =
 * dfw[d]·dfx[b]; with `z` NULL and zfx given, z[b, d] = zfw[d]·zfx[b] (rows built per batch
 * element in the work buffer, then as above); the backward then returns the factors' gradients
 * ddw, ddx, dzw, dzx instead of ddelta / dz.
 */
#define FSG_ALWAYS_INLINE static inline __attribute__((always_inline))

/* the row delta[b, :] (or z[b, :]): the tensor's own row, or w[d]·x[b] built into `row` */
static inline const float *step_factor_row(const float *t, const float *w, const float *x, int64_t b, int64_t D,
                                           float *row) {
    if (t) return t + b * D;
    const float xb = x[b];
#pragma omp simd
    for (int64_t d = 0; d < D; d++) row[d] = w[d] * xb;
    return row;
}

static inline void step_prepass(int64_t D, const float *ub, const float *db, const float *bias, int softplus,
                                const float *zb, float *dt, float *dtu, float *dsp, float *sz) {
    if (softplus) {
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            const float x = db[d] + (bias ? bias[d] : 0.f);
            dt[d] = softplus_f(x);
            if (dsp) dsp[d] = sigmoid_f(x);
        }
    } else {
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            dt[d] = db[d] + (bias ? bias[d] : 0.f);
            if (dsp) dsp[d] = 1.f;
        }
    }
#pragma omp simd
    for (int64_t d = 0; d < D; d++) dtu[d] = dt[d] * ub[d];
    if (zb) {
#pragma omp simd
        for (int64_t d = 0; d < D; d++) sz[d] = sigmoid_f(zb[d]);
    }
}

/* One batch element's forward step: `ub`, `db`, `zb` (NULL: no gate) its u, delta and z rows
   (D), `Bb`, `Cb` its B and C (N); the state rows at element offset b·D·N of `h0` / `last`; `yb`
   its output row (D; NULL: none). `wk`: 3·D + 3·N floats of scratch, the N after the first 3·D
   zeros. Shared by step_fwd_thread and the fused block's forward, so that both compute the very
   same new state. */
FSG_ALWAYS_INLINE void step_fwd_row(int64_t b, int64_t D, const int64_t N, const int fmt, const float *ub,
                                    const float *db, const float *zb, const float *restrict Bb,
                                    const float *restrict Cb, const float *A, const float *Dv, const float *bias,
                                    int softplus, const void *h0, float *yb, void *last, float *wk) {
    /* the new row goes straight into `last` only for a float32 state written out of place */
    const int direct_out = fmt == FSG_F32 && last != NULL && last != h0;
    float *dt = wk, *dtu = wk + D, *sz = wk + 2 * D;
    const float *zeros = wk + 3 * D;
    float *hold = wk + 3 * D + N, *hrow = hold + N;
    step_prepass(D, ub, db, bias, softplus, zb, dt, dtu, NULL, sz);
    for (int64_t d = 0; d < D; d++) {
        const int64_t bd = b * D + d;
        const float *restrict Ad = A + d * N;
        const float *restrict hp;
        if (!h0) {
            hp = zeros;
        } else if (fmt == FSG_F32 && last != h0) {
            hp = (const float *)h0 + bd * N;
        } else { /* 16-bit, or a row about to be overwritten by the new state */
            load_state_row(fmt, h0, bd * N, N, hold);
            hp = hold;
        }
        float *restrict hn = direct_out ? (float *)last + bd * N : hrow;
        const float t = dt[d], tu = dtu[d];
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; n++) {
            const float v = fsg_expf(t * Ad[n]) * hp[n] + tu * Bb[n];
            hn[n] = v;
            acc += Cb[n] * v;
        }
        if (!direct_out && last) store_state_row(fmt, last, bd * N, N, hrow);
        if (!yb) continue;
        float y = acc + (Dv ? Dv[d] : 0.f) * ub[d];
        if (zb) y *= zb[d] * sz[d];
        yb[d] = y;
    }
}

/* One thread's share of the forward (called inside a parallel region: the `omp for` binds to
   it). The parallel regions are written out per (N, fmt) in fsg_scan_step_fwd, so that this body
   is inlined, and specialised, into each region's outlined function (a region inside an inlined
   function would be outlined once, before inlining, with N and fmt as run-time values). */
FSG_ALWAYS_INLINE void step_fwd_thread(int64_t Bt, int64_t D, const int64_t N, const int fmt, const float *u,
                                       const float *delta, const float *A, const float *Bm, const float *Cm,
                                       const float *Dv, const float *z, const float *bias, int softplus,
                                       const void *h0, float *out, void *last, const float *dfw, const float *dfx,
                                       const float *zfw, const float *zfx, int *failed_) {
    {
        FSG_FTZ_BEGIN
        /* the row's scratch (3·D + 3·N, see step_fwd_row), then the delta and z rows built from factors */
        float *wk = (float *)calloc((size_t)(5 * D + 3 * N), sizeof(float));
        if (!wk) *failed_ = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < Bt; b++) {
            if (!wk) continue;
            float *rows = wk + 3 * D + 3 * N;
            const float *db = step_factor_row(delta, dfw, dfx, b, D, rows);
            const float *zb = z ? z + b * D : (zfx ? step_factor_row(NULL, zfw, zfx, b, D, rows + D) : NULL);
            step_fwd_row(b, D, N, fmt, u + b * D, db, zb, Bm + b * N, Cm + b * N, A, Dv, bias, softplus, h0,
                         out ? out + b * D : NULL, last, wk);
        }
        free(wk);
        FSG_FTZ_END
    }
}

/* The step backward's per-thread accumulators (double, see step_bwd_reduce) and float partial
   sums of dA. */
typedef struct {
    float *dAf;
    double *tdA, *tdD, *tdb, *tddw, *tdzw;
} step_acc_t;

/* One batch element's backward step (see step_fwd_row for the inputs): `doutb` the gradient of
   its output row (D), `gl0` of its new state (D·N; NULL: none). Writes `dub` (D), `ddeltab` (D,
   or NULL: delta = dfw ⊗ dfx, whose gradients go to *gdx and the accumulator, `dfx_b` the
   element's factor), `dzb` likewise (NULL and `zfac`: z = zfw ⊗ zfx, `zfx_b`), `dBb`, `dCb`
   (N), `yb` (D, or NULL), `dh0b` (D·N, or NULL), and the new state into `hnew` (NULL: not
   written). `hfrom`: see step_bwd_thread. `work`: D·N dA partial sums, then STEP_ROW_WORK
   floats of scratch (N zeros at 4·D + 4·N); `ones`: N ones.

   Two passes over the channels: the first computes every channel's exp(Δ·A), new state and
   output (into the scratch), the second the gradients. In one pass, each channel's gradient
   waited for its own exp → h_new → Σ_n C·h_new chain (two horizontal sums in series), and
   little of one channel overlapped the next. */
FSG_ALWAYS_INLINE void step_bwd_row(int64_t b, int64_t D, const int64_t N, const int fmt, const float *ub,
                                    const float *db, const float *zb, const float *restrict Bb,
                                    const float *restrict Cb, const float *A, const float *Dv, const float *bias,
                                    int softplus, const void *h0, const float *doutb, const float *gl0,
                                    float *dub, float *ddeltab, float *dzb, float *dBb, float *dCb, float *dh0b,
                                    float *yb, void *hnew, const float *hfrom, const float *dfw, float dfx_b,
                                    const float *zfw, float zfx_b, int zfac, float *gdx_, float *gzx_,
                                    float *work, const float *ones, step_acc_t acc) {
    float *dAf = acc.dAf, *dt = work + D * N, *dtu = dt + D, *dsp = dtu + D, *sz = dsp + D;
    float *restrict dBa = sz + D + 2 * N, *restrict dCa = dBa + N;
    const float *zeros = dCa + N;
    /* the channels' exp(Δ·A) (or a·h0), new states and old states (D·N each), outputs (D) */
    float *restrict a_all = dCa + 3 * N, *restrict hn_all = a_all + D * N, *restrict hp_all = hn_all + D * N;
    float *restrict ysv = hp_all + D * N;
    /* the old state row of channel d as the passes read it (loaded into hp_all where needed) */
#define FSG_OLD_ROW(d) (hfrom ? ones : !h0 ? zeros : (fmt == FSG_F32 && !hnew) ? (const float *)h0 + (b * D + (d)) * N \
                                                                             : hp_all + (d) * N)
    step_prepass(D, ub, db, bias, softplus, zb, dt, dtu, dsp, sz);
    float gdx = 0.f, gzx = 0.f; /* this batch element's factor gradients */
    for (int64_t n = 0; n < N; n++) dBa[n] = dCa[n] = 0.f;
    for (int64_t d = 0; d < D; d++) { /* pass 1: the new state and the output */
        const int64_t bd = b * D + d;
        const float tu = dtu[d];
        float *restrict a = a_all + d * N, *restrict hn = hn_all + d * N;
        if (!hfrom && h0 && !(fmt == FSG_F32 && !hnew)) /* 16-bit, or a row to be overwritten */
            load_state_row(fmt, h0, bd * N, N, hp_all + d * N);
        const float *restrict hp = FSG_OLD_ROW(d);
        float ys = 0.f;
        if (hfrom) { /* from the forward's new state: a·h0 = h_new − Δu·B, no exp, no h0 */
            const float *restrict hf = hfrom + bd * N;
#pragma omp simd reduction(+ : ys)
            for (int64_t n = 0; n < N; n++) {
                hn[n] = hf[n];
                a[n] = hf[n] - tu * Bb[n];
                ys += Cb[n] * hf[n];
            }
        } else {
            const float t = dt[d], *restrict Ad = A + d * N;
#pragma omp simd reduction(+ : ys)
            for (int64_t n = 0; n < N; n++) {
                a[n] = fsg_expf(t * Ad[n]);
                hn[n] = a[n] * hp[n] + tu * Bb[n];
                ys += Cb[n] * hn[n];
            }
        }
        ysv[d] = ys;
    }
    for (int64_t d = 0; d < D; d++) { /* pass 2: the gradients */
        const int64_t bd = b * D + d;
        const float t = dt[d], tu = dtu[d], ut = ub[d];
        const float *restrict Ad = A + d * N, *restrict a = a_all + d * N, *restrict hn = hn_all + d * N;
        const float *restrict hp = FSG_OLD_ROW(d);
        const float *restrict gl = gl0 ? gl0 + d * N : zeros;
        const float ys = ysv[d] + (Dv ? Dv[d] : 0.f) * ut;
        float dys = doutb[d];
        if (zb) {
            const float zz = zb[d], s = sz[d];
            if (dzb) {
                dzb[d] = dys * ys * s * (1.f + zz * (1.f - s));
            } else if (zfac) {
                const float g = dys * ys * s * (1.f + zz * (1.f - s));
                gzx += g * zfw[d];
                acc.tdzw[d] += (double)g * zfx_b;
            }
            if (yb) yb[d] = ys * zz * s;
            dys *= zz * s;
        } else if (yb) {
            yb[d] = ys;
        }
        acc.tdD[d] += (double)dys * ut;
        float ddt = 0.f, gB = 0.f;
        float *restrict dAd = dAf + d * N;
#pragma omp simd reduction(+ : ddt, gB)
        for (int64_t n = 0; n < N; n++) {
            const float gn = gl[n] + dys * Cb[n];
            dCa[n] += dys * hn[n];
            const float da = gn * hp[n] * a[n];
            ddt += da * Ad[n];
            dAd[n] += da * t;
            gB += gn * Bb[n];
            dBa[n] += gn * tu;
        }
        if (dh0b) {
            float *restrict g0 = dh0b + d * N;
#pragma omp simd
            for (int64_t n = 0; n < N; n++) g0[n] = (gl[n] + dys * Cb[n]) * a[n];
        }
        if (hnew) store_state_row(fmt, hnew, bd * N, N, hn); /* the old row was read in pass 1 */
        ddt += ut * gB;
        dub[d] = dys * (Dv ? Dv[d] : 0.f) + t * gB;
        const float ddl = ddt * dsp[d];
        if (ddeltab) {
            ddeltab[d] = ddl;
        } else {
            gdx += ddl * dfw[d];
            acc.tddw[d] += (double)ddl * dfx_b;
        }
        acc.tdb[d] += ddl;
    }
#undef FSG_OLD_ROW
    *gdx_ = gdx;
    *gzx_ = gzx;
    memcpy(dBb, dBa, N * sizeof(float));
    memcpy(dCb, dCa, N * sizeof(float));
}

/* the row scratch of step_bwd_row after its D·N dA partial sums */
#define STEP_ROW_WORK(D, N) (4 * (D) + 6 * (N) + 3 * (D) * (N) + (D))

/* this thread's accumulators in `bufA` (STEP_ASZ doubles a thread), dA partial sums in `dAf` */
static inline step_acc_t step_acc(double *bufA, int64_t D, int64_t N, float *dAf) {
#ifdef _OPENMP
    double *tdA = bufA + (size_t)omp_get_thread_num() * STEP_ASZ(D, N);
#else
    double *tdA = bufA;
#endif
    step_acc_t acc = {dAf, tdA, tdA + D * N, tdA + D * N + D, tdA + D * N + 2 * D, tdA + D * N + 3 * D};
    return acc;
}

/* One thread's share of the backward (see step_fwd_thread); `bufA`: the threads' double
   accumulators, reduced by the caller. */
FSG_ALWAYS_INLINE void step_bwd_thread(int64_t Bt, int64_t D, const int64_t N, const int fmt, const float *u,
                                       const float *delta, const float *A, const float *Bm, const float *Cm,
                                       const float *Dv, const float *z, const float *bias, int softplus,
                                       const void *h0, const float *dout, const float *dlast, float *du,
                                       float *ddelta, float *dBm, float *dCm, float *dz, float *dh0, float *yout,
                                       void *hnew, const float *hfrom, const float *dfw, const float *dfx,
                                       const float *zfw, const float *zfx, float *ddx, float *dzx, double *bufA,
                                       int *failed_) {
    {
        FSG_FTZ_BEGIN
        /* dA float partial sums (D·N), the row scratch (STEP_ROW_WORK), the delta and z rows built
           from factors (2·D), N ones. `hfrom` (NULL, or the float32 new state the forward wrote):
           the backward then reads it instead of h0 and needs no exp (a·h0 = h_new − Δu·B); no h0,
           dh0 or hnew then. */
        const int64_t rw = D * N + STEP_ROW_WORK(D, N);
        float *work = (float *)calloc((size_t)(rw + 2 * D + N), sizeof(float));
        if (!work) *failed_ = 1;
        float *ones = work ? work + rw + 2 * D : NULL;
        for (int64_t n = 0; work && n < N; n++) ones[n] = 1.f;
        const step_acc_t acc = work ? step_acc(bufA, D, N, work) : (step_acc_t){0};
        int64_t since_flush = 0;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < Bt; b++) {
            if (!work) continue;
            float *rows = work + rw;
            const float *db = step_factor_row(delta, dfw, dfx, b, D, rows);
            const float *zb = z ? z + b * D : (zfx ? step_factor_row(NULL, zfw, zfx, b, D, rows + D) : NULL);
            float gdx, gzx;
            step_bwd_row(b, D, N, fmt, u + b * D, db, zb, Bm + b * N, Cm + b * N, A, Dv, bias, softplus, h0,
                         dout + b * D, dlast ? dlast + b * D * N : NULL, du + b * D, ddelta ? ddelta + b * D : NULL,
                         dz ? dz + b * D : NULL, dBm + b * N, dCm + b * N, dh0 ? dh0 + b * D * N : NULL,
                         yout ? yout + b * D : NULL, hnew, hfrom, dfw, dfx ? dfx[b] : 0.f, zfw, zfx ? zfx[b] : 0.f,
                         zfx != NULL, &gdx, &gzx, work, ones, acc);
            if (ddx) ddx[b] = gdx;
            if (dzx) dzx[b] = gzx;
            if (++since_flush == 256) {
                step_flush_dA(acc.tdA, work, D * N);
                since_flush = 0;
            }
        }
        if (work) step_flush_dA(acc.tdA, work, D * N);
        free(work);
        FSG_FTZ_END
    }
}

/* fmt: the state's storage format (FSG_F32, FSG_BF16, FSG_F16); h0 / last / hnew point to it.
   Forward: `last` NULL writes no new state; `out` NULL computes no output. Backward: `hnew`
   non-NULL receives the new state (it may be h0: each row is written after its last read).
   One parallel region per (N = 16 or any, fmt): see step_fwd_thread. FSG_DISPATCH(M_) runs
   M_(N_, FMT_) for this call's (N, fmt), with N = 16 (the slow-net's d_state) a constant. */
#define FSG_DISPATCH(M_)                                   \
    do {                                                   \
        if (fmt == FSG_BF16) {                             \
            if (N == 16) M_(16, FSG_BF16);                 \
            else M_(N, FSG_BF16);                          \
        } else if (fmt == FSG_F16) {                       \
            if (N == 16) M_(16, FSG_F16);                  \
            else M_(N, FSG_F16);                           \
        } else {                                           \
            if (N == 16) M_(16, FSG_F32);                  \
            else M_(N, FSG_F32);                           \
        }                                                  \
    } while (0)
#define FSG_STEP_FWD(N_, FMT_)                                                                              \
    do {                                                                                                    \
        _Pragma("omp parallel num_threads(nthreads)")                                                      \
        step_fwd_thread(Bt, D, N_, FMT_, u, delta, A, Bm, Cm, Dv, z, bias, softplus, h0, out, last, dfw, dfx, \
                        zfw, zfx, &failed);                                                                 \
    } while (0)
FSG_API int fsg_scan_step_fwd(int64_t Bt, int64_t D, int64_t N, int fmt, const float *u, const float *delta,
                              const float *A, const float *Bm, const float *Cm, const float *Dv, const float *z,
                              const float *bias, int softplus, const void *h0, float *out, void *last,
                              const float *dfw, const float *dfx, const float *zfw, const float *zfx,
                              int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int failed = 0;
    FSG_DISPATCH(FSG_STEP_FWD);
    return failed;
}

#define FSG_STEP_BWD(N_, FMT_)                                                                                   \
    do {                                                                                                         \
        _Pragma("omp parallel num_threads(nthreads)")                                                           \
        step_bwd_thread(Bt, D, N_, FMT_, u, delta, A, Bm, Cm, Dv, z, bias, softplus, h0, dout, dlast, du, ddelta, \
                        dBm, dCm, dz, dh0, yout, hnew, hfrom, dfw, dfx, zfw, zfx, ddx, dzx, bufA, &failed);      \
    } while (0)
FSG_API int fsg_scan_step_bwd(int64_t Bt, int64_t D, int64_t N, int fmt, const float *u, const float *delta,
                              const float *A, const float *Bm, const float *Cm, const float *Dv, const float *z,
                              const float *bias, int softplus, const void *h0, const float *dout,
                              const float *dlast, float *du, float *ddelta, float *dA, float *dBm, float *dCm,
                              float *dD, float *dz, float *dbias, float *dh0, float *yout, void *hnew,
                              const float *hfrom, const float *dfw, const float *dfx, const float *zfw,
                              const float *zfx, float *ddw,
                              float *ddx, float *dzw, float *dzx, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    double *bufA = (double *)calloc((size_t)nthreads * STEP_ASZ(D, N), sizeof(double));
    if (!bufA) return 1;
    int failed = 0;
    FSG_DISPATCH(FSG_STEP_BWD);
    step_bwd_reduce(bufA, nthreads, D, N, dA, dD, dbias, ddw, dzw);
    free(bufA);
    return failed;
}

/* ---------------------------------------------------------------------------------------------
 * The whole streaming step of a Mamba block with d_model = dt_rank = 1 (FSG's slow-net), one
 * token per sequence, in one kernel: per batch element b, from its window w (the last K inputs,
 * the new one last) and the block's weights,
 *
 *   s = W_conv w,  a = b_conv + w_u ⊙ s,  u = silu(a),  [dlt, B, C] = W_x u,
 *   delta = w_dt · dlt,  z = w_z · w[K−1],  then the step (step_fwd_row),  out = w_out · y,
 *
 * and in the backward the step's gradients taken back through the same projections:
 *
 *   g = [d dlt, dB, dC],  dW_x += g uᵀ,  ū = du + W_xᵀ g,  ā = ū ⊙ σ(a)(1 + a(1 − σ(a))),
 *   db_conv += ā,  dw_u += ā ⊙ s,  dW_conv += (w_u ⊙ ā) wᵀ,  dw = W_convᵀ (w_u ⊙ ā) + [0, …, dz_x],
 *   dw_out += dout · y.
 *
 * No tensor of size Bt × D exists: u, s, a, the step's rows and their gradients live in a
 * thread's scratch. Both directions compute the projections with the same inline code, so the
 * backward recomputes bit for bit the new state the forward would write. Layouts: win (Bt, K);
 * W_conv transposed, cwT (K, D); W_x (R, D), R = 1 + 2N; vectors (D).
 * The weight gradients are summed per thread in float over 256 batch elements, then in double.
 */
typedef struct {
    int64_t K, R;
    const float *cwT, *conv_b, *w_u, *w_x, *dfw, *zfw, *w_out;
} block_w_t;

/* s, a, σ(a), u (D each) and xd = [dlt, B, C] (R) of one batch element from its window. Not
   inlined: the forward and the backward run this one compiled body, so the backward recomputes
   bit for bit the u, delta, B and C (hence the new state) of the forward. */
static __attribute__((noinline)) void block_pre_row(int64_t D, const block_w_t *w, const float *winb,
                                                    float *restrict s, float *restrict a, float *restrict sg,
                                                    float *restrict u, float *restrict xd) {
    const int64_t K = w->K, R = w->R;
#pragma omp simd
    for (int64_t d = 0; d < D; d++) s[d] = 0.f;
    for (int64_t k = 0; k < K; k++) {
        const float wk = winb[k], *restrict c = w->cwT + k * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) s[d] += c[d] * wk;
    }
#pragma omp simd
    for (int64_t d = 0; d < D; d++) {
        a[d] = w->conv_b[d] + w->w_u[d] * s[d];
        sg[d] = sigmoid_f(a[d]);
        u[d] = a[d] * sg[d];
    }
    for (int64_t j = 0; j < R; j++) { /* R independent dot products: no dependency chain through memory */
        const float *restrict c = w->w_x + j * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; d++) acc += c[d] * u[d];
        xd[j] = acc;
    }
}

/* the delta and z rows of one batch element: w_dt·dlt and w_z·w[K−1] */
static inline void block_factor_rows(int64_t D, const block_w_t *w, float dlt, float zx, float *restrict db,
                                     float *restrict zb) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) {
        db[d] = w->dfw[d] * dlt;
        zb[d] = w->zfw[d] * zx;
    }
}

FSG_ALWAYS_INLINE void block_fwd_thread(int64_t Bt, int64_t D, const int64_t N, const int fmt, const float *win,
                                        const block_w_t *w, const float *A, const float *Dv, const float *bias,
                                        const void *h0, float *out, void *last, int *failed_) {
    {
        FSG_FTZ_BEGIN
        const int64_t K = w->K, R = w->R, rw = 3 * D + 3 * N; /* step_fwd_row's scratch */
        /* then db, zb, s, a, σ(a), u, y (7·D) and xd (R) */
        float *wk = (float *)calloc((size_t)(rw + 7 * D + R), sizeof(float));
        if (!wk) *failed_ = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < Bt; b++) {
            if (!wk) continue;
            float *db = wk + rw, *zb = db + D, *s = zb + D, *a = s + D, *sg = a + D, *u = sg + D, *y = u + D;
            float *xd = y + D;
            const float *winb = win + b * K;
            block_pre_row(D, w, winb, s, a, sg, u, xd);
            block_factor_rows(D, w, xd[0], winb[K - 1], db, zb);
            step_fwd_row(b, D, N, fmt, u, db, zb, xd + 1, xd + 1 + N, A, Dv, bias, 1, h0, out ? y : NULL, last, wk);
            if (!out) continue;
            float o = 0.f;
#pragma omp simd reduction(+ : o)
            for (int64_t d = 0; d < D; d++) o += w->w_out[d] * y[d];
            out[b] = o;
        }
        free(wk);
        FSG_FTZ_END
    }
}

/* the block backward's per-thread accumulators besides step_acc_t's: dW_x (R·D), dW_conv
   transposed (K·D), db_conv, dw_u, dw_out (D each) */
#define BLOCK_ASZ(D, K, R) ((R) * (D) + (K) * (D) + 3 * (D))

/* the backward of the projections for one batch element (see the comment above): `g` = [d dlt,
   dB, dC], `ub` the step's du (overwritten: w_u ⊙ ā), `doutb` the element's output gradient, `yb`
   its gated y; float partial sums in `fa` (BLOCK_ASZ floats) */
FSG_ALWAYS_INLINE void block_pre_bwd_row(int64_t D, const block_w_t *w, const float *winb, const float *restrict s,
                                         const float *restrict a, const float *restrict sg, const float *restrict u,
                                         const float *restrict g, float *restrict ub, float doutb,
                                         const float *restrict yb, float gzx, float *dwinb, float *fa) {
    const int64_t K = w->K, R = w->R;
    float *restrict dwx = fa, *restrict dcw = fa + R * D, *restrict dcb = dcw + K * D, *restrict dwu = dcb + D;
    float *restrict dwo = dwu + D;
    for (int64_t j = 0; j < R; j++) {
        const float gj = g[j], *restrict wx = w->w_x + j * D;
        float *restrict dj = dwx + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            dj[d] += gj * u[d];
            ub[d] += gj * wx[d];
        }
    }
#pragma omp simd
    for (int64_t d = 0; d < D; d++) {
        const float ab = ub[d] * sg[d] * (1.f + a[d] * (1.f - sg[d]));
        dcb[d] += ab;
        dwu[d] += ab * s[d];
        ub[d] = ab * w->w_u[d];
        dwo[d] += doutb * yb[d];
    }
    for (int64_t k = 0; k < K; k++) {
        const float wk = winb[k];
        float *restrict dk = dcw + k * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) dk[d] += ub[d] * wk;
    }
    if (!dwinb) return;
    for (int64_t k = 0; k < K; k++) {
        const float *restrict c = w->cwT + k * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; d++) acc += ub[d] * c[d];
        dwinb[k] = acc + (k == K - 1 ? gzx : 0.f);
    }
}

FSG_ALWAYS_INLINE void block_bwd_thread(int64_t Bt, int64_t D, const int64_t N, const int fmt, const float *win,
                                        const block_w_t *w, const float *A, const float *Dv, const float *bias,
                                        const void *h0, const float *dout, void *hnew, const float *hfrom,
                                        float *dwin, double *bufA, double *bufB, int *failed_) {
    {
        FSG_FTZ_BEGIN
        const int64_t K = w->K, R = w->R, bsz = BLOCK_ASZ(D, K, R);
        const int64_t rw = D * N + STEP_ROW_WORK(D, N);
        /* dA partial sums + step_bwd_row's scratch (rw), N ones, then db, zb, s, a, σ(a), u, dy,
           du, y (9·D), xd and g (2·R), and the block's float partial sums (bsz) */
        float *work = (float *)calloc((size_t)(rw + N + 9 * D + 2 * R + bsz), sizeof(float));
        if (!work) *failed_ = 1;
        float *ones = work ? work + rw : NULL;
        for (int64_t n = 0; work && n < N; n++) ones[n] = 1.f;
        float *fa = work ? work + rw + N + 9 * D + 2 * R : NULL;
        const step_acc_t acc = work ? step_acc(bufA, D, N, work) : (step_acc_t){0};
#ifdef _OPENMP
        double *tb = bufB + (size_t)omp_get_thread_num() * bsz;
#else
        double *tb = bufB;
#endif
        int64_t since_flush = 0;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < Bt; b++) {
            if (!work) continue;
            float *db = ones + N, *zb = db + D, *s = zb + D, *a = s + D, *sg = a + D, *u = sg + D, *dy = u + D;
            float *du = dy + D, *y = du + D, *xd = y + D, *g = xd + R;
            const float *winb = win + b * K;
            block_pre_row(D, w, winb, s, a, sg, u, xd);
            block_factor_rows(D, w, xd[0], winb[K - 1], db, zb);
            const float ob = dout[b];
#pragma omp simd
            for (int64_t d = 0; d < D; d++) dy[d] = ob * w->w_out[d];
            float gzx;
            step_bwd_row(b, D, N, fmt, u, db, zb, xd + 1, xd + 1 + N, A, Dv, bias, 1, h0, dy, NULL, du, NULL,
                         NULL, g + 1, g + 1 + N, NULL, y, hnew, hfrom, w->dfw, xd[0], w->zfw, winb[K - 1], 1, g,
                         &gzx, work, ones, acc);
            block_pre_bwd_row(D, w, winb, s, a, sg, u, g, du, ob, y, gzx, dwin ? dwin + b * K : NULL, fa);
            if (++since_flush == 256) {
                step_flush_dA(acc.tdA, work, D * N);
                step_flush_dA(tb, fa, bsz);
                since_flush = 0;
            }
        }
        if (work) {
            step_flush_dA(acc.tdA, work, D * N);
            step_flush_dA(tb, fa, bsz);
        }
        free(work);
        FSG_FTZ_END
    }
}

#define FSG_BLOCK_FWD(N_, FMT_)                                                                           \
    do {                                                                                                  \
        _Pragma("omp parallel num_threads(nthreads)")                                                    \
        block_fwd_thread(Bt, D, N_, FMT_, win, &w, A, Dv, bias, h0, out, last, &failed);                 \
    } while (0)
#define FSG_BLOCK_BWD(N_, FMT_)                                                                           \
    do {                                                                                                  \
        _Pragma("omp parallel num_threads(nthreads)")                                                    \
        block_bwd_thread(Bt, D, N_, FMT_, win, &w, A, Dv, bias, h0, dout, hnew, hfrom, dwin, bufA, bufB, &failed); \
    } while (0)

/* The block's forward: `out` (Bt; NULL: none), the new state into `last` (NULL: none; may be h0:
   in place). Returns nonzero when out of memory. */
FSG_API int fsg_stream_block_fwd(int64_t Bt, int64_t D, int64_t N, int64_t K, int fmt, const float *win,
                                 const float *cwT, const float *conv_b, const float *w_u, const float *w_x,
                                 const float *dfw, const float *zfw, const float *w_out,
                                 const float *A, const float *Dv, const float *bias, const void *h0, float *out,
                                 void *last, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    const block_w_t w = {K, 1 + 2 * N, cwT, conv_b, w_u, w_x, dfw, zfw, w_out};
    int failed = 0;
    FSG_DISPATCH(FSG_BLOCK_FWD);
    return failed;
}

/* The block's backward from `dout` (Bt): the new state into `hnew` (NULL: none; may be h0);
   `hfrom` (NULL, or the float32 new state the forward wrote out of place): read instead of h0,
   no exp (see step_bwd_thread; h0, hnew NULL then);
   `dwin` (Bt, K; NULL: none) and every weight's gradient (dcwT (K, D), dw_x (R, D), the rest (D),
   dA (D, N)). */
FSG_API int fsg_stream_block_bwd(int64_t Bt, int64_t D, int64_t N, int64_t K, int fmt, const float *win,
                                 const float *cwT, const float *conv_b, const float *w_u, const float *w_x,
                                 const float *dfw, const float *zfw, const float *w_out,
                                 const float *A, const float *Dv, const float *bias, const void *h0,
                                 const float *dout, void *hnew, const float *hfrom, float *dwin, float *dcwT,
                                 float *dconv_b,
                                 float *dw_u, float *dw_x, float *ddfw, float *dzfw, float *dw_out, float *dA,
                                 float *dD, float *dbias, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    const block_w_t w = {K, 1 + 2 * N, cwT, conv_b, w_u, w_x, dfw, zfw, w_out};
    const int64_t R = w.R, bsz = BLOCK_ASZ(D, K, R);
    double *bufA = (double *)calloc((size_t)nthreads * STEP_ASZ(D, N), sizeof(double));
    double *bufB = (double *)calloc((size_t)nthreads * bsz, sizeof(double));
    int failed = !bufA || !bufB;
    if (!failed) FSG_DISPATCH(FSG_BLOCK_BWD);
    if (!failed) {
        step_bwd_reduce(bufA, nthreads, D, N, dA, dD, dbias, ddfw, dzfw);
        float *outs[5] = {dw_x, dcwT, dconv_b, dw_u, dw_out};
        const int64_t sizes[5] = {R * D, K * D, D, D, D};
        int64_t off = 0;
        for (int i = 0; i < 5; i++) {
            for (int64_t e = 0; e < sizes[i]; e++) {
                double t = 0.0;
                for (int th = 0; th < nthreads; th++) t += bufB[(size_t)th * bsz + off + e];
                outs[i][e] = (float)t;
            }
            off += sizes[i];
        }
    }
    free(bufA);
    free(bufB);
    return failed;
}
