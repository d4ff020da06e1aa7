/* nomoat's native CPU kernels, compiled on the user's machine for its own instruction set.
 *
 * - Q4 (GGUF Q4_0/Q4_1 blocks: 32 weights, w = q * d + m, q in 0..15) and Q8_0 (w = q * d, q int8)
 *   matrix products for a few rows of activations. The activations are quantized to int8 per block of 32
 *   (as llama.cpp does), so each block is one integer dot product: with AVX-512 VNNI one vpdpbusd per 64
 *   weights, with AVX2 maddubs + madd per 32. A row of weights is read once for all activation rows.
 * - One fused decoding step of a LLaMA layer stack for a single sequence (norms, q/k/v, rotary,
 *   KV cache, attention, output, SwiGLU), so a token costs one call instead of ~2,000 small torch ops.
 *
 * Weights keep GGUF's bytes: per row, blocks of 16 nibble bytes (byte j holds element j in its low
 * nibble and element j + 16 in its high one), with fp16 d and m per block in separate arrays.
 * Rows are split between OpenMP threads (the process's libgomp, the one torch uses).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
/* Weight bytes to prefetch ahead of the product: decoding streams every weight from memory once per token, and
 * the hardware prefetcher alone keeps too few lines in flight for a single thread. */
#ifndef NM_PREFETCH
#define NM_PREFETCH 1024
#endif
#if NM_PREFETCH
#define PREFETCH(p, ahead) _mm_prefetch((const char *)(p) + (ahead), _MM_HINT_T0)
#else
#define PREFETCH(p, ahead)
#endif
#define MAXM 8 /* activation rows per pass over the weights */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define NM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NM_AVX2 1
#else
#error "nomoat native kernels need AVX2, FMA and F16C (or AVX-512 VNNI)"
#endif

const char *nm_isa(void) {
#ifdef NM_AVX512
    return "avx512-vnni";
#else
    return "avx2";
#endif
}

int nm_version(void) { return 1; }

typedef struct {
    const uint8_t *nib;  /* (n, k/2) nibbles, GGUF block order */
    const uint16_t *d;   /* (n, k/32) fp16 */
    const uint16_t *m;   /* (n, k/32) fp16 */
    int n, k;
} q4mat;


/* ---------------------------------------------------------------- activations -> int8 blocks */

/* The Q4 kernels unpack a row's nibble bytes several blocks at a time: 64 bytes (4 blocks) with AVX-512 into
 * their low halves [b0 0-15, b1 0-15, b2 0-15, b3 0-15] and high halves [b0 16-31, ...], 32 bytes (2 blocks) with
 * AVX2 into [b0 0-15, b1 0-15] and [b0 16-31, b1 16-31]. Activations are laid out the same way: per 4 blocks
 * (AVX-512; the last 2 of a row whose block count is not a multiple of 4 as a pair), or per 2 (AVX2). */
static void q4_order(const int8_t *q, int G, int8_t *out) {
    int b = 0;
#ifdef NM_AVX512
    for (; b + 4 <= G; b += 4)
        for (int j = 0; j < 4; j++) {
            memcpy(out + b * QK + j * 16, q + (b + j) * QK, 16);
            memcpy(out + b * QK + 64 + j * 16, q + (b + j) * QK + 16, 16);
        }
#endif
    for (; b + 2 <= G; b += 2)
        for (int j = 0; j < 2; j++) {
            memcpy(out + b * QK + j * 16, q + (b + j) * QK, 16);
            memcpy(out + b * QK + 32 + j * 16, q + (b + j) * QK + 16, 16);
        }
}

/* x (k floats) -> int8 codes per block of 32, block scales xd and xd * sum(codes) per block; `q4` asks for
 * the Q4 kernel's order (see q4_order), else blocks stay in natural order. */
static void quantize_act(const float *x, int k, int8_t *q, float *xd, float *xs, int q4) {
    int8_t tmp[4096];
    int8_t *dst = q4 ? (k <= 4096 ? tmp : malloc((size_t)k)) : q;
    for (int b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            dst[b * QK + j] = (int8_t)v;
            sum += v;
        }
        xd[b] = d;
        xs[b] = d * (float)sum;
    }
    if (q4) {
        q4_order(dst, k / QK, q);
        if (dst != tmp) free(dst);
    }
}

/* ---------------------------------------------------------------- Q4 rows */

#ifdef NM_AVX512
/* One output row's dot products with `mr` activation rows, 4 blocks (128 weights) per step. */
static inline void q4_row_avx512(const uint8_t *wn, const uint16_t *dn, const uint16_t *mn, int G, int k, int mr,
                                 const int8_t *xq, const float *xd, const float *xs, __m512 *acc) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < G; c += 16) {
        int ng = G - c < 16 ? G - c : 16;
        __mmask16 km = (__mmask16)((1u << ng) - 1);
        __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, dn + c));
        __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, mn + c));
        __m512 sc[MAXM];
        for (int r = 0; r < mr; r++) {
            sc[r] = _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(km, xd + (size_t)r * G + c));
            acc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(km, xs + (size_t)r * G + c), acc[r]);
        }
        PREFETCH(dn + c, NM_PREFETCH / 8);
        PREFETCH(mn + c, NM_PREFETCH / 8);
        int p = 0;
        for (; p + 4 <= ng; p += 4) {
            PREFETCH(wn + (size_t)(c + p) * 16, NM_PREFETCH);
            __m512i v = _mm512_loadu_si512((const void *)(wn + (size_t)(c + p) * 16));
            __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            __m512i idx = _mm512_add_epi32(quad, _mm512_set1_epi32(p));
            for (int r = 0; r < mr; r++) {
                const int8_t *xr = xq + (size_t)r * k + (size_t)(c + p) * QK;
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xr));
                dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void *)(xr + 64)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, sc[r]), acc[r]);
            }
        }
        for (; p + 2 <= ng; p += 2) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wn + (size_t)(c + p) * 16));
            __m256i l4 = _mm256_set1_epi8(0x0F);
            __m256i lo = _mm256_and_si256(v, l4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), l4);
            __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            __m512i idx = _mm512_add_epi32(pair, _mm512_set1_epi32(p));
            for (int r = 0; r < mr; r++) {
                __m512i xv = _mm512_loadu_si512((const void *)(xq + (size_t)r * k + (size_t)(c + p) * QK));
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, sc[r]), acc[r]);
            }
        }
    }
}
#endif

#ifndef NM_AVX512
/* The first n of 8 values, the rest zero, with masked loads (no read past n: a row's last group of blocks is often
 * partial, e.g. 18 blocks for k = 576, and a copy through the stack made that group cost more than the rest). */
static inline __m256 load8f(const float *p, int n) {
    if (n == 8) return _mm256_loadu_ps(p);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
static inline __m256 load8h(const uint16_t *p, int n) { /* n is even: k is a multiple of 64 */
    if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m128i units = _mm_cmpgt_epi32(_mm_set1_epi32(n / 2), _mm_setr_epi32(0, 1, 2, 3));
    return _mm256_cvtph_ps(_mm_maskload_epi32((const int *)p, units));
}
#endif

/* y[r * ldy + i] = sum_k x_r[k] * w_i[k] for output rows i in [i0, i1), activation rows r < mr. */
static void q4_rows(const q4mat *W, int i0, int i1, int mr, const int8_t *xq, const float *xd,
                    const float *xs, float *y, int ldy) {
    const int k = W->k, G = k / QK;
#ifdef NM_AVX512
    int i = i0;
    if (mr == 1) /* four output rows at once: independent chains keep the vector units busy */
        for (; i + 4 <= i1; i += 4) {
            __m512 a0, a1, a2, a3;
            q4_row_avx512(W->nib + (size_t)i * (k / 2), W->d + (size_t)i * G, W->m + (size_t)i * G, G, k, 1, xq, xd, xs, &a0);
            q4_row_avx512(W->nib + (size_t)(i + 1) * (k / 2), W->d + (size_t)(i + 1) * G, W->m + (size_t)(i + 1) * G, G, k, 1, xq, xd, xs, &a1);
            q4_row_avx512(W->nib + (size_t)(i + 2) * (k / 2), W->d + (size_t)(i + 2) * G, W->m + (size_t)(i + 2) * G, G, k, 1, xq, xd, xs, &a2);
            q4_row_avx512(W->nib + (size_t)(i + 3) * (k / 2), W->d + (size_t)(i + 3) * G, W->m + (size_t)(i + 3) * G, G, k, 1, xq, xd, xs, &a3);
            y[i] = _mm512_reduce_add_ps(a0);
            y[i + 1] = _mm512_reduce_add_ps(a1);
            y[i + 2] = _mm512_reduce_add_ps(a2);
            y[i + 3] = _mm512_reduce_add_ps(a3);
        }
    for (; i < i1; i++) {
        __m512 acc[MAXM];
        q4_row_avx512(W->nib + (size_t)i * (k / 2), W->d + (size_t)i * G, W->m + (size_t)i * G, G, k, mr, xq, xd, xs, acc);
        for (int r = 0; r < mr; r++) y[(size_t)r * ldy + i] = _mm512_reduce_add_ps(acc[r]);
    }
#else
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i pair = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
#define Q4_AVX2_BODY(TILE, MR)                                                                                       \
    {                                                                                                                \
        __m256 acc[TILE][MR];                                                                                        \
        for (int t = 0; t < TILE; t++)                                                                               \
            for (int r = 0; r < MR; r++) acc[t][r] = _mm256_setzero_ps();                                            \
        for (int c = 0; c < G; c += 8) { /* 8 blocks: their scales converted at once */                              \
            int ng = G - c < 8 ? G - c : 8;                                                                          \
            __m256 sc[TILE][MR], xdv[MR], xsv[MR];                                                                   \
            for (int r = 0; r < MR; r++) {                                                                           \
                xdv[r] = load8f(xd + (size_t)r * G + c, ng), xsv[r] = load8f(xs + (size_t)r * G + c, ng);            \
            }                                                                                                        \
            for (int t = 0; t < TILE; t++) {                                                                         \
                PREFETCH(W->d + (size_t)(i + t) * G + c, NM_PREFETCH / 8);                                           \
                PREFETCH(W->m + (size_t)(i + t) * G + c, NM_PREFETCH / 8);                                           \
                __m256 dv = load8h(W->d + (size_t)(i + t) * G + c, ng);                                              \
                __m256 mv = load8h(W->m + (size_t)(i + t) * G + c, ng);                                              \
                for (int r = 0; r < MR; r++) {                                                                       \
                    sc[t][r] = _mm256_mul_ps(dv, xdv[r]);                                                            \
                    acc[t][r] = _mm256_fmadd_ps(mv, xsv[r], acc[t][r]);                                              \
                }                                                                                                    \
            }                                                                                                        \
            for (int p = 0; p < ng; p += 2) {                                                                        \
                __m256i idx = _mm256_add_epi32(pair, _mm256_set1_epi32(p));                                          \
                __m256i wlo[TILE], whi[TILE];                                                                        \
                for (int t = 0; t < TILE; t++) {                                                                     \
                    const uint8_t *wp = W->nib + (size_t)(i + t) * (k / 2) + (size_t)(c + p) * 16;                   \
                    if (!((c + p) & 3)) PREFETCH(wp, (size_t)TILE * (k / 2)); /* the next tile's same spot */        \
                    __m256i v = _mm256_loadu_si256((const __m256i *)wp);                                             \
                    wlo[t] = _mm256_and_si256(v, low), whi[t] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);      \
                }                                                                                                    \
                for (int r = 0; r < MR; r++) {                                                                       \
                    const int8_t *xr = xq + (size_t)r * k + (size_t)(c + p) * QK;                                    \
                    __m256i xlo = _mm256_loadu_si256((const __m256i *)xr);                                           \
                    __m256i xhi = _mm256_loadu_si256((const __m256i *)(xr + 32));                                    \
                    for (int t = 0; t < TILE; t++) {                                                                 \
                        __m256i s16 =                                                                                \
                            _mm256_add_epi16(_mm256_maddubs_epi16(wlo[t], xlo), _mm256_maddubs_epi16(whi[t], xhi)); \
                        __m256i dot = _mm256_madd_epi16(s16, ones);                                                  \
                        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(sc[t][r], idx), \
                                                    acc[t][r]);                                                      \
                    }                                                                                                \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (int t = 0; t < TILE; t++)                                                                               \
            for (int r = 0; r < MR; r++) {                                                                           \
                __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t][r]), _mm256_extractf128_ps(acc[t][r], 1));      \
                s = _mm_hadd_ps(s, s);                                                                               \
                s = _mm_hadd_ps(s, s);                                                                               \
                y[(size_t)r * ldy + i + t] = _mm_cvtss_f32(s);                                                       \
            }                                                                                                        \
    }
    int i = i0;
    if (mr == 1) /* four output rows at once: independent chains, one activation load for all four */
        for (; i + 4 <= i1; i += 4) Q4_AVX2_BODY(4, 1)
    for (; i < i1; i++) {
        switch (mr) { /* constant bounds keep the accumulators in registers */
        case 1: Q4_AVX2_BODY(1, 1) break;
        case 2: Q4_AVX2_BODY(1, 2) break;
        case 3: Q4_AVX2_BODY(1, 3) break;
        case 4: Q4_AVX2_BODY(1, 4) break;
        default: Q4_AVX2_BODY(1, mr) break;
        }
    }
#undef Q4_AVX2_BODY
#endif
}

/* ---------------------------------------------------------------- Q8_0 rows */

static void q8_rows(const int8_t *codes, const uint16_t *scales, int k, int i0, int i1, int mr,
                    const int8_t *xq, const float *xd, float *y, int ldy) {
    const int G = k / QK;
#ifdef NM_AVX512
    const __m512i base = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i zero = _mm512_setzero_si512();
    for (int i = i0; i < i1; i++) {
        const int8_t *wn = codes + (size_t)i * k;
        const uint16_t *dn = scales + (size_t)i * G;
        __m512 acc[MAXM];
        for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
        for (int c = 0; c < G; c += 16) {
            int ng = G - c < 16 ? G - c : 16;
            __mmask16 km = (__mmask16)((1u << ng) - 1);
            __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, dn + c));
            __m512 sc[MAXM];
            for (int r = 0; r < mr; r++) sc[r] = _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(km, xd + (size_t)r * G + c));
            for (int p = 0; p < ng; p += 2) {
                __m512i w = _mm512_loadu_si512((const void *)(wn + (size_t)(c + p) * QK));
                __m512i aw = _mm512_abs_epi8(w);
                __mmask64 neg = _mm512_movepi8_mask(w);
                __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(p));
                for (int r = 0; r < mr; r++) {
                    __m512i xv = _mm512_loadu_si512((const void *)(xq + (size_t)r * k + (size_t)(c + p) * QK));
                    xv = _mm512_mask_sub_epi8(xv, neg, zero, xv);
                    __m512i dot = _mm512_dpbusd_epi32(zero, aw, xv);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, sc[r]), acc[r]);
                }
            }
        }
        for (int r = 0; r < mr; r++) y[(size_t)r * ldy + i] = _mm512_reduce_add_ps(acc[r]);
    }
#else
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = i0; i < i1; i++) {
        const int8_t *wn = codes + (size_t)i * k;
        const uint16_t *dn = scales + (size_t)i * G;
        __m256 acc[MAXM];
        for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
        for (int c = 0; c < G; c += 8) { /* 8 blocks' scales converted at once */
            int ng = G - c < 8 ? G - c : 8;
            float sc[MAXM][8];
            __m256 dv = load8h(dn + c, ng);
            for (int r = 0; r < mr; r++) _mm256_storeu_ps(sc[r], _mm256_mul_ps(dv, load8f(xd + (size_t)r * G + c, ng)));
            for (int g = 0; g < ng; g++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(wn + (size_t)(c + g) * QK));
                __m256i aw = _mm256_sign_epi8(w, w);
                for (int r = 0; r < mr; r++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + (size_t)(c + g) * QK));
                    __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&sc[r][g]), acc[r]);
                }
            }
        }
        for (int r = 0; r < mr; r++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            s = _mm_hadd_ps(s, s);
            s = _mm_hadd_ps(s, s);
            y[(size_t)r * ldy + i] = _mm_cvtss_f32(s);
        }
    }
#endif
}

/* Split [0, n) between the team, in multiples of 16 rows. */
static void share(int n, int tid, int nth, int *i0, int *i1) {
    int blocks = (n + 15) / 16, per = blocks / nth, extra = blocks % nth;
    int b0 = tid * per + (tid < extra ? tid : extra), b1 = b0 + per + (tid < extra);
    *i0 = b0 * 16 < n ? b0 * 16 : n;
    *i1 = b1 * 16 < n ? b1 * 16 : n;
}

static int team_size(long work, int threads) {
    return work < (1L << 16) || threads < 1 ? 1 : threads; /* a tiny product is cheaper than waking a thread */
}

/* ---------------------------------------------------------------- public matrix products */

/* y (m, n) = x (m, k) @ W.T for Q4 weights (W) or Q8_0 ones (codes, scales); k a multiple of 64. Returns 0, or -1
 * when out of memory. */
static int product(const q4mat *W, const int8_t *codes, const uint16_t *scales, int n, int k, const float *x, int m,
                   float *y, int threads) {
    int G = k / QK;
    int8_t *xq = malloc((size_t)m * k);
    float *xd = malloc(sizeof(float) * (size_t)m * G), *xs = malloc(sizeof(float) * (size_t)m * G);
    if (!xq || !xd || !xs) return free(xq), free(xd), free(xs), -1;
    for (int r = 0; r < m; r++)
        quantize_act(x + (size_t)r * k, k, xq + (size_t)r * k, xd + (size_t)r * G, xs + (size_t)r * G, W != NULL);
#pragma omp parallel num_threads(team_size((long)n * k * m, threads))
    {
        int i0, i1;
        share(n, omp_get_thread_num(), omp_get_num_threads(), &i0, &i1);
        for (int r0 = 0; r0 < m; r0 += MAXM) {
            int mr = m - r0 < MAXM ? m - r0 : MAXM;
            const int8_t *xr = xq + (size_t)r0 * k;
            if (W)
                q4_rows(W, i0, i1, mr, xr, xd + (size_t)r0 * G, xs + (size_t)r0 * G, y + (size_t)r0 * n, n);
            else
                q8_rows(codes, scales, k, i0, i1, mr, xr, xd + (size_t)r0 * G, y + (size_t)r0 * n, n);
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
}

/* Q4 weights: nib (n, k/2), d and m (n, k/32) fp16. */
int nm_q4_matmul(const uint8_t *nib, const uint16_t *d, const uint16_t *mn, int n, int k, const float *x, int m,
                 float *y, int threads) {
    q4mat W = {nib, d, mn, n, k};
    return product(&W, NULL, NULL, n, k, x, m, y, threads);
}

/* Q8_0 weights: codes (n, k) int8, scales (n, k/32) fp16. */
int nm_q8_matmul(const int8_t *codes, const uint16_t *scales, int n, int k, const float *x, int m, float *y,
                 int threads) {
    return product(NULL, codes, scales, n, k, x, m, y, threads);
}

/* ---------------------------------------------------------------- int8 rows for torch's int8 GEMM (training) */

/* Each row of x (m, k; row stride ldx), times col (k floats, or NULL), as int8 codes in [-qmax, qmax] with one
 * scale per row: s = max|v| / qmax (at least 1e-30), q = rint(v / s); the same float32 operations, in the same
 * order, as the torch expression it replaces, so the codes are identical. A NaN or infinity in a row makes its
 * scale NaN, so it reaches the product as torch's version would let it. */
void nm_int8_rows(const float *x, int m, int k, int ldx, const float *col, int qmax, int8_t *q, float *s,
                  int threads) {
#pragma omp parallel for num_threads(team_size((long)m * k, threads)) schedule(static)
    for (int i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * ldx;
        int8_t *qi = q + (size_t)i * k;
        float mx = 0.f, bad = 0.f;
        if (col) {
#pragma omp simd reduction(max : mx) reduction(+ : bad)
            for (int j = 0; j < k; j++) {
                float v = xi[j] * col[j], a = fabsf(v);
                mx = a > mx ? a : mx;
                bad += v - v;
            }
        } else {
#pragma omp simd reduction(max : mx) reduction(+ : bad)
            for (int j = 0; j < k; j++) {
                float a = fabsf(xi[j]);
                mx = a > mx ? a : mx;
                bad += xi[j] - xi[j];
            }
        }
        float sc = mx / (float)qmax;
        sc = sc < 1e-30f ? 1e-30f : sc;
        s[i] = bad == 0.f ? sc : NAN;
        if (col) {
#pragma omp simd
            for (int j = 0; j < k; j++) qi[j] = (int8_t)(int)rintf(xi[j] * col[j] / sc);
        } else {
#pragma omp simd
            for (int j = 0; j < k; j++) qi[j] = (int8_t)(int)rintf(xi[j] / sc);
        }
    }
}

/* out (m, n) = acc * col[j] * row[i] in that order (col may be NULL): an int8 GEMM's int32 sums back to float. */
void nm_int8_rescale(const int32_t *acc, int m, int n, const float *col, const float *row, float *out, int threads) {
#pragma omp parallel for num_threads(team_size((long)m * n, threads)) schedule(static)
    for (int i = 0; i < m; i++) {
        const int32_t *ai = acc + (size_t)i * n;
        float *oi = out + (size_t)i * n;
        const float r = row[i];
        if (col) {
#pragma omp simd
            for (int j = 0; j < n; j++) oi[j] = (float)ai[j] * col[j] * r;
        } else {
#pragma omp simd
            for (int j = 0; j < n; j++) oi[j] = (float)ai[j] * r;
        }
    }
}

/* ---------------------------------------------------------------- the fused decoding step */

/* e^x for x <= 0 (softmax after subtracting the max, and SiLU's e^-|g|), vectorizable; relative error ~2e-7. */
static inline float exp_neg(float x) {
    x = x < -87.f ? -87.f : x;
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
               1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } s = {.i = ((int32_t)n + 127) << 23};
    return p * s.f;
}

/* A low-rank update on one projection: out_b += w_b * scale * B (A x_b) for every row b with w_b != 0. */
typedef struct {
    const float *A;  /* (r, k) */
    const float *Bt; /* (r, n): B transposed */
    const float *w;  /* (rows) each row's weight for this adapter, 0: the row does not use it */
    float scale;
    int r, part;     /* part: 0 q, 1 k, 2 v, 3 o, 4 gate, 5 up, 6 down */
} nm_lora;

#define MAX_RANK 1024

typedef struct {
    q4mat qkv, o, gate_up, down; /* q/k/v rows in one matrix, gate then up in one */
    const float *ln1, *ln2;      /* norm weights (hidden) */
    void *k_cache, *v_cache;     /* this layer's slot 0: [slots][kv_heads][capacity][head_dim], float or fp16 */
    const nm_lora *lora;         /* this layer's adapter updates (n_lora of them) */
    int n_lora;
} nm_layer;

/* Add the layer's updates on `part` for row b to out (at out + b * ldout + off, n values) from in (k values). */
static void apply_lora(const nm_layer *ly, int part, int b, const float *in, int ldin, int k, float *out, int ldout,
                       int off, int n) {
    float t[MAX_RANK];
    for (int i = 0; i < ly->n_lora; i++) {
        const nm_lora *a = &ly->lora[i];
        if (a->part != part) continue;
        {
            float wb = a->w[b] * a->scale;
            if (wb == 0.f) continue;
            const float *xb = in + (size_t)b * ldin;
            for (int j = 0; j < a->r; j++) {
                const float *Aj = a->A + (size_t)j * k;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int c = 0; c < k; c++) s += Aj[c] * xb[c];
                t[j] = s * wb;
            }
            float *yb = out + (size_t)b * ldout + off;
            for (int j = 0; j < a->r; j++) {
                const float *Bj = a->Bt + (size_t)j * n;
                float tj = t[j];
#pragma omp simd
                for (int c = 0; c < n; c++) yb[c] += tj * Bj[c];
            }
        }
    }
}

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, ffn, capacity;
    float eps;
    int kv_half; /* the cache holds fp16, else float32 */
} nm_shape;

static void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float s = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * s);
}

static void rotate(float *v, const float *cos, const float *sin, int hd) {
    int h = hd / 2;
    for (int i = 0; i < h; i++) {
        float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* Vectors of floats, and K/V rows read from float32 or fp16 caches (llama.cpp's default cache type). */
#ifdef NM_AVX512
#define VW 16
typedef __m512 vf;
static inline vf v_h(const void *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf v_f(const void *p) { return _mm512_loadu_ps((const float *)p); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf v_set(float x) { return _mm512_set1_ps(x); }
static inline float v_sum(vf a) { return _mm512_reduce_add_ps(a); }
static inline void v_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
#else
#define VW 8
typedef __m256 vf;
static inline vf v_h(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vf v_f(const void *p) { return _mm256_loadu_ps((const float *)p); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf v_set(float x) { return _mm256_set1_ps(x); }
static inline float v_sum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
static inline void v_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
#endif
#ifdef NM_AVX512
static inline vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf v_div1(vf a) { return _mm512_div_ps(_mm512_set1_ps(1.f), a); }
static inline vf v_nabs(vf a) { return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32((int)0x80000000u))); }
static inline vf v_pos_select(vf g, vf a, vf b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GT_OQ), b, a); }
static inline float v_hmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf v_floor(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline vf v_pow2i(vf n) { /* 2^n for integral n in [-127, 127] */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
static inline vf v_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf v_div1(vf a) { return _mm256_div_ps(_mm256_set1_ps(1.f), a); }
static inline vf v_nabs(vf a) { return _mm256_or_ps(a, _mm256_set1_ps(-0.f)); }
static inline vf v_pos_select(vf g, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GT_OQ)); }
static inline float v_hmax(vf a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline vf v_floor(vf a) { return _mm256_floor_ps(a); }
static inline vf v_pow2i(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif

/* exp_neg on a vector (the same polynomial): the scalar one does not vectorize (its bit cast). */
static inline vf v_exp_neg(vf x) {
    x = v_max(x, v_set(-87.f));
    vf n = v_floor(v_fma(x, v_set(1.44269504f), v_set(0.5f)));
    vf r = v_fma(n, v_set(-0.693359375f), x);
    r = v_fma(n, v_set(2.12194440e-4f), r);
    vf p = v_fma(v_set(1.9875691500e-4f), r, v_set(1.3981999507e-3f));
    p = v_fma(p, r, v_set(8.3334519073e-3f));
    p = v_fma(p, r, v_set(4.1665795894e-2f));
    p = v_fma(p, r, v_set(1.6666665459e-1f));
    p = v_fma(p, r, v_set(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set(1.f)));
    return v_mul(p, v_pow2i(n));
}

/* SiLU(g) * u, with e^-|g| so nothing overflows (as the scalar loop it replaces). */
static inline vf v_silu_mul(vf g, vf u) {
    vf e = v_exp_neg(v_nabs(g));
    vf sig = v_mul(v_pos_select(g, v_set(1.f), e), v_div1(v_add(v_set(1.f), e)));
    return v_mul(v_mul(g, sig), u);
}

/* Softmax of one row of scores in place; returns 1 / the sum of its exponentials (applied later). */
static float softmax_row(float *sr, int len) {
    int t = 0;
    vf mv = v_set(-INFINITY);
    for (; t + VW <= len; t += VW) mv = v_max(mv, v_f(sr + t));
    float mx = v_hmax(mv);
    for (; t < len; t++) mx = sr[t] > mx ? sr[t] : mx;
    vf sv = v_set(0.f), m = v_set(mx);
    for (t = 0; t + VW <= len; t += VW) {
        vf e = v_exp_neg(v_sub(v_f(sr + t), m));
        v_store(sr + t, e);
        sv = v_add(sv, e);
    }
    float sum = v_sum(sv);
    for (; t < len; t++) {
        float e = exp_neg(sr[t] - mx);
        sr[t] = e;
        sum += e;
    }
    return 1.f / sum;
}

#define MAX_HD_VECS 16 /* head_dim up to 16 vectors */

/* out[r] = sum_t scores[r][t] * V[t] for head dim 64 and an fp16 cache, with the sums in registers: up to 3 heads
 * at a time over a part of the head dim (16 registers with AVX2), each V row converted once per part. The
 * general loop below keeps them in memory (a load and a store per vector per position). */
#define V64_PART (VW == 8 ? 4 : 64 / VW) /* vectors of the head dim per pass */
static void attend_v64(const float *scores, int len, int rep, const void *vc, float *out) {
    for (int r0 = 0; r0 < rep; r0 += 3) {
        const int nr = rep - r0 < 3 ? rep - r0 : 3;
        const float *s0 = scores + (size_t)r0 * len, *s1 = nr > 1 ? s0 + len : s0, *s2 = nr > 2 ? s0 + 2 * len : s0;
        for (int v0 = 0; v0 < 64 / VW; v0 += V64_PART) {
            vf a0[V64_PART], a1[V64_PART], a2[V64_PART];
            for (int j = 0; j < V64_PART; j++) a0[j] = a1[j] = a2[j] = v_set(0.f);
            for (int t = 0; t < len; t++) {
                const uint16_t *vt = (const uint16_t *)vc + (size_t)t * 64 + v0 * VW;
                const vf p0 = v_set(s0[t]), p1 = v_set(s1[t]), p2 = v_set(s2[t]);
                for (int j = 0; j < V64_PART; j++) {
                    vf x = v_h(vt + j * VW);
                    a0[j] = v_fma(p0, x, a0[j]), a1[j] = v_fma(p1, x, a1[j]), a2[j] = v_fma(p2, x, a2[j]);
                }
            }
            for (int j = 0; j < V64_PART; j++) {
                v_store(out + (size_t)r0 * 64 + (v0 + j) * VW, a0[j]);
                if (nr > 1) v_store(out + (size_t)(r0 + 1) * 64 + (v0 + j) * VW, a1[j]);
                if (nr > 2) v_store(out + (size_t)(r0 + 2) * 64 + (v0 + j) * VW, a2[j]);
            }
        }
    }
}

/* The `rep` query heads sharing one KV head attend over its positions 0..len-1: each K and V row is read
 * (and converted) once for all of them. q, out: rep x hd; scores: rep x len scratch. `half`: fp16 cache. */
static void attend_group(const float *q, int rep, const void *kc, const void *vc, int half, int len, int hd,
                         float *scores, float *out) {
    const int nv = hd / VW;
    const size_t row = (size_t)hd * (half ? 2 : 4);
    const float scale = 1.f / sqrtf((float)hd);
    vf kv[MAX_HD_VECS];
    for (int t = 0; t < len; t++) {
        const char *kt = (const char *)kc + (size_t)t * row;
        for (int v = 0; v < nv; v++) kv[v] = half ? v_h(kt + v * VW * 2) : v_f(kt + v * VW * 4);
        for (int r = 0; r < rep; r++) {
            vf acc = v_set(0.f);
            for (int v = 0; v < nv; v++) acc = v_fma(v_f(q + r * hd + v * VW), kv[v], acc);
            scores[(size_t)r * len + t] = v_sum(acc) * scale;
        }
    }
    float inv[64];
    for (int r = 0; r < rep; r++) {
        inv[r] = softmax_row(scores + (size_t)r * len, len);
    }
    if (hd == 64 && half) {
        attend_v64(scores, len, rep, vc, out);
    } else {
        for (int j = 0; j < rep * hd; j++) out[j] = 0.f;
        for (int t = 0; t < len; t++) {
            const char *vt = (const char *)vc + (size_t)t * row;
            for (int v = 0; v < nv; v++) kv[v] = half ? v_h(vt + v * VW * 2) : v_f(vt + v * VW * 4);
            for (int r = 0; r < rep; r++) {
                vf p = v_set(scores[(size_t)r * len + t]);
                for (int v = 0; v < nv; v++) v_store(out + r * hd + v * VW, v_fma(p, kv[v], v_f(out + r * hd + v * VW)));
            }
        }
    }
    for (int r = 0; r < rep; r++)
        for (int j = 0; j < hd; j++) out[r * hd + j] *= inv[r];
}

/* q4_rows for any number of activation rows (MAXM at a time). */
static void q4_rows_all(const q4mat *W, int i0, int i1, int B, const int8_t *xq, const float *xd, const float *xs,
                        float *y, int ldy) {
    const int k = W->k, G = k / QK;
    for (int r0 = 0; r0 < B; r0 += MAXM)
        q4_rows(W, i0, i1, B - r0 < MAXM ? B - r0 : MAXM, xq + (size_t)r0 * k, xd + (size_t)r0 * G,
                xs + (size_t)r0 * G, y + (size_t)r0 * ldy, ldy);
}

/* Between two barriers, the team's share of W's output rows for all B activation rows (y: B x W->n). */
static void product_phase(const q4mat *W, int tid, int nth, int B, const int8_t *xq, const float *xd, const float *xs,
                          float *y) {
    int i0, i1;
#pragma omp barrier
    share(W->n, tid, nth, &i0, &i1);
    q4_rows_all(W, i0, i1, B, xq, xd, xs, y, W->n);
#pragma omp barrier
}

/* Profiling build (-DNM_PROFILE, bench/profile_decode.py --phases): thread 0's wall time per phase of
 * nm_decode, barrier waits included, summed over calls. */
#ifdef NM_PROFILE
#define NM_PHASES 9
static double nm_phase_s[NM_PHASES];
void nm_profile_read(double *out) {
    for (int i = 0; i < NM_PHASES; i++) out[i] = nm_phase_s[i], nm_phase_s[i] = 0;
}
#define PHASE(i)                                                                                                 \
    if (tid == 0) {                                                                                              \
        double now_ = omp_get_wtime();                                                                           \
        nm_phase_s[i] += now_ - t_mark;                                                                          \
        t_mark = now_;                                                                                           \
    }
#else
#define PHASE(i)
#endif

/* Row b of `in` (k wide) rounded to int8 blocks into the shared activation buffers (Q4 order). */
#define QUANT_ROW(in, b, k)                                                                                      \
    quantize_act((in) + (size_t)(b) * (k), (k), xq + (size_t)(b) * (k), xd + (size_t)(b) * ((k) / QK),            \
                 xs + (size_t)(b) * ((k) / QK), 1)

/* One token for each of B sequences through every layer. Row b of x (B x hidden) is sequence b's
 * embedding in, its final normed hidden state out; it sits at position pos[b] of KV slot b (its K/V are
 * written there, and it attends over positions 0..pos[b]). cos/sin: the rotary tables (row p for position
 * p, head_dim each). norm: the final norm's weight. Returns 0, or -1 when out of memory. */
int nm_decode(const nm_shape *S, const nm_layer *L, int B, const int *pos, const float *cos, const float *sin,
              const float *norm, float *x, int threads) {
    const int H = S->hidden, hd = S->head_dim, nq = S->heads * hd, nkv = S->kv_heads * hd, F = S->ffn;
    const int rep = S->heads / S->kv_heads, kmax = H > F ? (H > nq ? H : nq) : (F > nq ? F : nq);
    const int nqkv = nq + 2 * nkv, Gmax = kmax / QK;
    const size_t head_stride = (size_t)S->capacity * hd, slot_stride = (size_t)S->kv_heads * head_stride;
    int maxlen = 0;
    for (int b = 0; b < B; b++) maxlen = pos[b] + 1 > maxlen ? pos[b] + 1 : maxlen;
    float *h = malloc(sizeof(float) * (size_t)B * kmax), *qkv = malloc(sizeof(float) * (size_t)B * nqkv);
    float *att = malloc(sizeof(float) * (size_t)B * nq), *gu = malloc(sizeof(float) * 2 * (size_t)B * F);
    float *o = malloc(sizeof(float) * (size_t)B * H), *act = malloc(sizeof(float) * (size_t)B * F);
    float *scores = malloc(sizeof(float) * (size_t)B * S->heads * maxlen);
    int8_t *xq = malloc((size_t)B * kmax);
    float *xd = malloc(sizeof(float) * (size_t)B * Gmax), *xs = malloc(sizeof(float) * (size_t)B * Gmax);
    int rc = 0;
    if (!h || !qkv || !att || !gu || !o || !act || !scores || !xq || !xd || !xs) {
        rc = -1;
        goto done;
    }
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        /* Attention work: a KV head's query heads together (one read of its K/V for all), split into shares
         * when there are too few (row, KV head) pairs to keep every thread busy (1 row, 3 KV heads, 2 threads). */
        const int pairs = B * S->kv_heads;
        int split = pairs >= 2 * nth ? 1 : (2 * nth + pairs - 1) / pairs;
        split = split > rep ? rep : split;
        const int per = (rep + split - 1) / split;
#ifdef NM_PROFILE
        double t_mark = omp_get_wtime();
#endif
        for (int l = 0; l < S->layers; l++) {
            const nm_layer *ly = &L[l];
            /* Row work (norms, rotary, cache writes, updates, SwiGLU, int8 rounding) is split by row: thread t
             * owns rows t, t + nth, ... in every such section, so a row's sections need no barrier between
             * them; the matrix products and attention read every row and wait for all of them. */
            for (int b = tid; b < B; b += nth) {
                rms_norm(x + (size_t)b * H, ly->ln1, h + (size_t)b * H, H, S->eps);
                QUANT_ROW(h, b, H);
            }
            PHASE(0)
            product_phase(&ly->qkv, tid, nth, B, xq, xd, xs, qkv);
            PHASE(1)
            for (int b = tid; b < B; b += nth) {
                if (ly->n_lora) {
                    apply_lora(ly, 0, b, h, H, H, qkv, nqkv, 0, nq);
                    apply_lora(ly, 1, b, h, H, H, qkv, nqkv, nq, nkv);
                    apply_lora(ly, 2, b, h, H, H, qkv, nqkv, nq + nkv, nkv);
                }
                float *qb = qkv + (size_t)b * nqkv;
                const float *cb = cos + (size_t)pos[b] * hd, *sb = sin + (size_t)pos[b] * hd;
                for (int a = 0; a < S->heads; a++) rotate(qb + a * hd, cb, sb, hd);
                for (int a = 0; a < S->kv_heads; a++) {
                    rotate(qb + nq + a * hd, cb, sb, hd);
                    size_t at = b * slot_stride + a * head_stride + (size_t)pos[b] * hd;
                    const float *kn = qb + nq + a * hd, *vn = qb + nq + nkv + a * hd;
                    if (S->kv_half) {
                        uint16_t *kc = (uint16_t *)ly->k_cache + at, *vc = (uint16_t *)ly->v_cache + at;
                        for (int j = 0; j < hd; j++) kc[j] = _cvtss_sh(kn[j], 0), vc[j] = _cvtss_sh(vn[j], 0);
                    } else {
                        memcpy((float *)ly->k_cache + at, kn, sizeof(float) * hd);
                        memcpy((float *)ly->v_cache + at, vn, sizeof(float) * hd);
                    }
                }
            }
            PHASE(2)
#pragma omp barrier
#pragma omp for schedule(static)
            for (int it = 0; it < B * S->kv_heads * split; it++) {
                /* item: row b, KV head a, the part-th share of the query heads reading it */
                int bg = it / split, part = it % split, b = bg / S->kv_heads, a = bg % S->kv_heads;
                int h0 = part * per, h1 = h0 + per < rep ? h0 + per : rep;
                if (h0 >= h1) continue;
                size_t kv = (b * slot_stride + (size_t)a * head_stride) * (S->kv_half ? 2 : 4);
                size_t qh = (size_t)a * rep + h0;
                attend_group(qkv + (size_t)b * nqkv + qh * hd, h1 - h0, (char *)ly->k_cache + kv,
                             (char *)ly->v_cache + kv, S->kv_half, pos[b] + 1, hd,
                             scores + ((size_t)b * S->heads + qh) * maxlen, att + (size_t)b * nq + qh * hd);
            }
            PHASE(3)
            for (int b = tid; b < B; b += nth) QUANT_ROW(att, b, nq);
            product_phase(&ly->o, tid, nth, B, xq, xd, xs, o);
            PHASE(4)
            for (int b = tid; b < B; b += nth) {
                if (ly->n_lora) apply_lora(ly, 3, b, att, nq, nq, o, H, 0, H);
                float *xb = x + (size_t)b * H;
                for (int i = 0; i < H; i++) xb[i] += o[(size_t)b * H + i];
                rms_norm(xb, ly->ln2, h + (size_t)b * H, H, S->eps);
                QUANT_ROW(h, b, H);
            }
            PHASE(5)
            product_phase(&ly->gate_up, tid, nth, B, xq, xd, xs, gu);
            PHASE(6)
            for (int b = tid; b < B; b += nth) {
                if (ly->n_lora) {
                    apply_lora(ly, 4, b, h, H, H, gu, 2 * F, 0, F);
                    apply_lora(ly, 5, b, h, H, H, gu, 2 * F, F, F);
                }
                const float *gb = gu + (size_t)b * 2 * F;
                float *hb = act + (size_t)b * F; /* not h: the next layer's norms write h before all rows are done */
                int i = 0;
                for (; i + VW <= F; i += VW) v_store(hb + i, v_silu_mul(v_f(gb + i), v_f(gb + F + i)));
                for (; i < F; i++) {
                    float g = gb[i];
                    float e = exp_neg(g > 0.f ? -g : g); /* silu without overflow: e^-|g| */
                    float sig = g > 0.f ? 1.f / (1.f + e) : e / (1.f + e);
                    hb[i] = g * sig * gb[F + i];
                }
                QUANT_ROW(act, b, F);
            }
            PHASE(7)
            product_phase(&ly->down, tid, nth, B, xq, xd, xs, o);
            PHASE(8)
            for (int b = tid; b < B; b += nth) { /* no barrier after: the next layer starts on the same rows */
                if (ly->n_lora) apply_lora(ly, 6, b, act, F, F, o, H, 0, H);
                for (int i = 0; i < H; i++) x[(size_t)b * H + i] += o[(size_t)b * H + i];
            }
        }
    }
    for (int b = 0; b < B; b++) {
        rms_norm(x + (size_t)b * H, norm, h, H, S->eps);
        memcpy(x + (size_t)b * H, h, sizeof(float) * H);
    }
done:
    free(h), free(qkv), free(att), free(gu), free(o), free(act), free(scores), free(xq), free(xd), free(xs);
    return rc;
}
