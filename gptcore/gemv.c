/* Skinny linear layers for decoding on x86 CPUs (AVX2 + FMA), built and loaded by gptcore/gemv.py.

   y (M, N) = x (M, K) . W (N, K)^T + b, then optionally GELU, for the few rows (M) of a decode step.

   Why: at batch 1 a decode step reads every weight once and does two flops per weight, so its speed
   is the speed at which the weights stream from DRAM. GEMM libraries tile for reuse that a
   one-row product does not have. This kernel walks W in its natural nn.Linear layout, eight rows
   at a time, one contiguous block per thread (OpenMP, the same runtime and thread count as torch),
   so the hardware prefetcher sees a few long sequential streams, and keeps the eight row blocks
   in L1/L2 while it multiplies them by every x row (so 16 rows cost ~2.5x one row, not 16x).

   W is fp32 or bf16 (bf16 -> fp32 is a 16-bit shift: half the bytes to stream); x, b and y are
   fp32; sums are fp32. bf16 weights may also come tiled (wdtype 2, gptcore/gemv.py's TiledBF16): in
   each block of 8 rows, the 8 rows' values of every 16 columns lie side by side (256 bytes), so a
   block is one sequential read instead of 8 interleaved row streams of K x 2 bytes. (Measured on AMD
   Zen 3: bf16 rows of 1,536 bytes streamed 11-18% slower than the same bytes read in sequence; fp32
   rows, twice as long, gained nothing from tiling, so they stay plain.) (Widening a bf16 block once into an L1 buffer for many x rows was measured
   slower than widening each weight as it streams by, at 4 and 16 rows: not done.)
   gelu: 0 none, 1 tanh approximation (GPT-2), 2 exact (erf). Returns 0; -1 bad arguments; -2 no memory. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS 8 /* weight rows per block: 8 independent FMA chains hide the FMA latency */

/* bf16: while a block is multiplied, pull the next block (the same number of bytes, contiguous)
   toward the core: each k step covers ROWS x 16 elements = 4 cache lines of this block, so it
   prefetches 4 lines of the next one. Prefetches never fault, also past the end. (Measured: the bf16
   kernel streams ~20% faster with it; the fp32 one ~10% slower, so it has none.) */
#define PREFETCH_NEXT(p)                                              \
    do {                                                              \
        _mm_prefetch((p), _MM_HINT_T0);                               \
        _mm_prefetch((p) + 64, _MM_HINT_T0);                          \
        _mm_prefetch((p) + 128, _MM_HINT_T0);                         \
        _mm_prefetch((p) + 192, _MM_HINT_T0);                         \
    } while (0)

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline __m256 load_bf16(const uint16_t *p) {  /* 8 bf16 -> 8 fp32: widen and shift into the high half */
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float scalar_f32(const float *p, int64_t i) { return p[i]; }

static inline float scalar_bf16(const uint16_t *p, int64_t i) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)p[i] << 16;
    return c.f;
}

static inline float finish(float v, const float *b, int64_t n, int gelu) {
    if (b) v += b[n];
    if (gelu == 1) v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    else if (gelu == 2) v = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    return v;
}

/* rows [n0, n0 + ROWS) of W against every x row; K8 = K rounded down to a multiple of 8 */
#define BLOCK(NAME, WT, LOAD, SCALAR)                                                              \
    __attribute__((unused)) static void NAME(const float *x, const WT *W, const float *b, float *y, int64_t M, int64_t N,  \
                     int64_t K, int64_t n0, int gelu) {                                            \
        const int64_t K8 = K & ~(int64_t)7;                                                        \
        const WT *w = W + n0 * K;                                                                  \
        for (int64_t m = 0; m < M; m++) {                                                          \
            const float *xm = x + m * K;                                                           \
            __m256 acc[ROWS];                                                                      \
            for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();                           \
            for (int64_t k = 0; k < K8; k += 8) {                                                  \
                const __m256 xv = _mm256_loadu_ps(xm + k);                                         \
                for (int r = 0; r < ROWS; r++) acc[r] = _mm256_fmadd_ps(LOAD(w + r * K + k), xv, acc[r]); \
            }                                                                                      \
            for (int r = 0; r < ROWS; r++) {                                                       \
                float s = hsum(acc[r]);                                                            \
                for (int64_t k = K8; k < K; k++) s += SCALAR(w, r * K + k) * xm[k];                \
                y[m * N + n0 + r] = finish(s, b, n0 + r, gelu);                                    \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    static void NAME##_tail(const float *x, const WT *W, const float *b, float *y, int64_t M,      \
                            int64_t N, int64_t K, int64_t n0, int gelu) {                          \
        for (int64_t n = n0; n < N; n++)                                                           \
            for (int64_t m = 0; m < M; m++) {                                                      \
                float s = 0.0f;                                                                    \
                for (int64_t k = 0; k < K; k++) s += SCALAR(W, n * K + k) * x[m * K + k];          \
                y[m * N + n] = finish(s, b, n, gelu);                                              \
            }                                                                                      \
    }

BLOCK(block_f32, float, load_f32, scalar_f32)
BLOCK(block_bf16, uint16_t, load_bf16, scalar_bf16) /* only its _tail is used: block_bf16x below is faster */

/* bf16 weights, 16 at a time: one 256-bit load holds 8 pairs; the even element of each pair becomes
   fp32 by a left shift, the odd one by masking off the low half (2 cheap ops per 16 weights instead of
   a widening convert per 8). xp is x with each 16-block reordered as its 8 even then 8 odd elements,
   so the products line up. tiled: W is in the tiled layout (K a multiple of 16), where row r's 16 values
   at column k of the block starting at w lie at w + k * ROWS + r * 16. */
static inline __attribute__((always_inline)) void block_bf16x(const float *x, const float *xp, const uint16_t *W,
        const float *b, float *y, int64_t M, int64_t N, int64_t K, int64_t n0, int gelu, const int tiled) {
    const int64_t K16 = K & ~(int64_t)15;
    const uint16_t *w = W + n0 * K;
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K, *xpm = xp + m * K;
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K16; k += 16) {
            if (m == 0) PREFETCH_NEXT((const char *)(w + ROWS * K) + k * ROWS * sizeof(uint16_t));
            const __m256 xe = _mm256_loadu_ps(xpm + k), xo = _mm256_loadu_ps(xpm + k + 8);
            for (int r = 0; r < ROWS; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(tiled ? w + k * ROWS + r * 16 : w + r * K + k));
                acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), xo, acc[r]);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            float s = hsum(acc[r]);
            for (int64_t k = K16; k < K; k++) s += scalar_bf16(w, r * K + k) * xm[k];
            y[m * N + n0 + r] = finish(s, b, n0 + r, gelu);
        }
    }
}

/* wdtype: 0 fp32 weights, 1 bf16 weights, 2 bf16 weights tiled (K a multiple of 16; the rows past the last
   whole block of 8 in the plain layout after the tiled ones). x (M, K), y (M, N) contiguous; b may be NULL.
   Thread-safe: concurrent calls share nothing but their read-only inputs. */
int raygpt_linear(const float *x, const void *W, const float *b, float *y, int64_t M, int64_t N, int64_t K,
                  int wdtype, int gelu, int nthreads) {
    if (M < 0 || N < 0 || K < 0 || wdtype < 0 || wdtype > 2 || (wdtype == 2 && K % 16) || gelu < 0 || gelu > 2)
        return -1;
    const int64_t blocks = N / ROWS;
    if (nthreads < 1) nthreads = 1;
    float *xp = NULL;
    if (wdtype != 0 && blocks > 0) {  /* x reordered for block_bf16x: even then odd elements of each 16-block */
        xp = (float *)malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
        if (!xp) return -2;
        const int64_t K16 = K & ~(int64_t)15;
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K16; k += 16)
                for (int j = 0; j < 8; j++) {
                    xp[m * K + k + j] = x[m * K + k + 2 * j];
                    xp[m * K + k + 8 + j] = x[m * K + k + 2 * j + 1];
                }
    }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (blocks > 1 && nthreads > 1)
    for (int64_t i = 0; i < blocks; i++) {
        if (wdtype == 0) block_f32(x, (const float *)W, b, y, M, N, K, i * ROWS, gelu);
        else if (wdtype == 1) block_bf16x(x, xp, (const uint16_t *)W, b, y, M, N, K, i * ROWS, gelu, 0);
        else block_bf16x(x, xp, (const uint16_t *)W, b, y, M, N, K, i * ROWS, gelu, 1);
    }
    free(xp);
    if (blocks * ROWS < N) {
        if (wdtype == 0) block_f32_tail(x, (const float *)W, b, y, M, N, K, blocks * ROWS, gelu);
        else block_bf16_tail(x, (const uint16_t *)W, b, y, M, N, K, blocks * ROWS, gelu);
    }
    return 0;
}

/* ---- A whole decode step's transformer blocks in one call -------------------------------------------

   Why: with the matmuls streaming at the memory's speed, what is left of a batch-1 decode step is the
   ~15 small tensor ops per block around them (LayerNorms, the KV-cache writes, attention, residual
   adds): each costs a few µs of dispatch in Python and ATen, ~4 ms of a ~27 ms GPT-2 small step.
   Here they are plain loops over a few thousand floats, between the same matmuls as above.

   x (B, C) is the residual stream (token + position embeddings in, the last block's output out), one
   new token per row. Row b writes its key and value at position pos[b] of every layer's cache and
   attends to positions [0, pos[b]] (rows may have different lengths). kc[l], vc[l]: layer l's cache,
   (B, nh, max_len, hs) contiguous fp32. p: 12 pointers per layer, in this order: ln_1 weight, ln_1 bias,
   c_attn weight (3C, C), c_attn bias, attn c_proj weight (C, C), its bias, ln_2 weight, ln_2 bias,
   c_fc weight (4C, C), its bias, mlp c_proj weight (C, 4C), its bias; biases may be NULL; weights are
   all fp32 (wdtype 0), all bf16 (wdtype 1) or all tiled bf16 (wdtype 2). scratch: at least B * (10 C + nh * max_len) floats.
   Returns 0; -1 bad arguments (a position outside the cache); -2 no memory. */

static int mm_threads(int64_t M, int64_t N, int64_t K, int nthreads) {  /* as gptcore/gemv.py's _PARALLEL_MIN */
    return M * N * K >= ((int64_t)1 << 17) ? nthreads : 1;
}

/* h = LayerNorm(x) row by row; the variance from the centred values (two passes, in double) */
static void layer_norm(const float *x, const float *w, const float *b, float *h, int64_t M, int64_t C, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * C;
        double s = 0.0, ss = 0.0;
        for (int64_t c = 0; c < C; c++) s += xm[c];
        const double mean = s / (double)C;
        for (int64_t c = 0; c < C; c++) ss += (xm[c] - mean) * (xm[c] - mean);
        const float rstd = (float)(1.0 / sqrt(ss / (double)C + (double)eps)), mu = (float)mean;
        float *hm = h + m * C;
        for (int64_t c = 0; c < C; c++) hm[c] = (xm[c] - mu) * rstd * (w ? w[c] : 1.0f) + (b ? b[c] : 0.0f);
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* one block's attention for a decode step: qkv (B, 3C) -> y (B, C), writing k and v into the cache */
static void attend(const float *qkv, float *kc, float *vc, const int64_t *pos, float *y, float *scores, int64_t B,
                   int64_t C, int64_t nh, int64_t max_len, int nthreads) {
    const int64_t hs = C / nh;
    const float scale = 1.0f / sqrtf((float)hs);
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < nh; h++) {
            const int64_t at = ((b * nh + h) * max_len + pos[b]) * hs;
            for (int64_t d = 0; d < hs; d++) {
                kc[at + d] = qkv[b * 3 * C + C + h * hs + d];
                vc[at + d] = qkv[b * 3 * C + 2 * C + h * hs + d];
            }
        }
        work += (pos[b] + 1) * C;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && work >= (1 << 15))
    for (int64_t i = 0; i < B * nh; i++) {
        const int64_t b = i / nh, h = i % nh, L = pos[b] + 1;
        const float *q = qkv + b * 3 * C + h * hs;
        const float *K = kc + i * max_len * hs, *V = vc + i * max_len * hs;
        float *s = scores + i * max_len, *out = y + b * C + h * hs;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            s[t] = dot(q, K + t * hs, hs) * scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        for (int64_t t = 0; t < L; t++) sum += (s[t] = expf(s[t] - mx));
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < hs; d++) out[d] = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            const float pt = s[t] * inv;
            const float *vt = V + t * hs;
            for (int64_t d = 0; d < hs; d++) out[d] += pt * vt[d];
        }
    }
}

int raygpt_decode_blocks(float *x, int64_t B, int64_t C, int64_t nh, int64_t n_layer, const int64_t *pos,
                         int64_t max_len, float *const *kc, float *const *vc, const void *const *p, int wdtype,
                         int gelu, float eps, float *scratch, int nthreads) {
    if (B < 1 || C < 1 || nh < 1 || C % nh || n_layer < 0 || max_len < 1 || wdtype < 0 || wdtype > 2 ||
        gelu < 1 || gelu > 2)
        return -1;
    for (int64_t b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= max_len) return -1;
    if (nthreads < 1) nthreads = 1;
    float *h = scratch, *qkv = h + B * C, *y = qkv + 3 * B * C, *t = y + B * C, *f = t + B * C;
    float *scores = f + 4 * B * C;
    for (int64_t l = 0; l < n_layer; l++) {
        const void *const *w = p + 12 * l;
        int rc;
        layer_norm(x, w[0], w[1], h, B, C, eps);
        rc = raygpt_linear(h, w[2], w[3], qkv, B, 3 * C, C, wdtype, 0, mm_threads(B, 3 * C, C, nthreads));
        if (rc) return rc;
        attend(qkv, kc[l], vc[l], pos, y, scores, B, C, nh, max_len, nthreads);
        rc = raygpt_linear(y, w[4], w[5], t, B, C, C, wdtype, 0, mm_threads(B, C, C, nthreads));
        if (rc) return rc;
        for (int64_t i = 0; i < B * C; i++) x[i] += t[i];
        layer_norm(x, w[6], w[7], h, B, C, eps);
        rc = raygpt_linear(h, w[8], w[9], f, B, 4 * C, C, wdtype, gelu, mm_threads(B, 4 * C, C, nthreads));
        if (rc) return rc;
        rc = raygpt_linear(f, w[10], w[11], t, B, C, 4 * C, wdtype, 0, mm_threads(B, C, 4 * C, nthreads));
        if (rc) return rc;
        for (int64_t i = 0; i < B * C; i++) x[i] += t[i];
    }
    return 0;
}

/* ---- Small helpers around a decode step ----------------------------------------------------------

   Why: after the head has streamed the weights, the step's last few small tensor ops (argmax over the
   vocabulary, the next token's embedding row) run on cold caches and cost ~0.1-0.5 ms each through ATen
   (several ops, each possibly waking the thread pool); as one plain loop they cost a few µs. */

/* out[b] = the first index of the maximum of row b of x (B, V), like torch.argmax: a NaN counts as the
   maximum (the first NaN wins). Returns 0; -1 bad arguments. */
int raygpt_argmax(const float *x, int64_t B, int64_t V, int64_t *out) {
    if (B < 0 || V < 1) return -1;
    for (int64_t b = 0; b < B; b++) {
        const float *r = x + b * V;
        __m256 mx = _mm256_set1_ps(-INFINITY);
        __m256 nan = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) {
            const __m256 v = _mm256_loadu_ps(r + i);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            mx = _mm256_max_ps(mx, v);
        }
        float m[8], best = -INFINITY;
        _mm256_storeu_ps(m, mx);
        for (int j = 0; j < 8; j++) best = m[j] > best ? m[j] : best;
        int has_nan = _mm256_movemask_ps(nan) != 0;
        for (; i < V; i++) {
            if (r[i] != r[i]) has_nan = 1;
            else if (r[i] > best) best = r[i];
        }
        int64_t at = 0;
        if (has_nan) {
            while (r[at] == r[at]) at++;
        } else {
            while (r[at] != best) at++;  /* best is one of the values: found before V */
        }
        out[b] = at;
    }
    return 0;
}

/* Rows idx[0..R) of a tiled bf16 weight (N, K) (wdtype 2's layout; K a multiple of 16), widened to fp32
   into out (R, K): the token embedding of a tied head. Returns 0; -1 an index outside [0, N). */
int raygpt_tiled_rows(const uint16_t *W, int64_t N, int64_t K, const int64_t *idx, int64_t R, float *out) {
    if (N < 0 || K < 0 || K % 16 || R < 0) return -1;
    const int64_t n8 = N & ~(int64_t)7;
    for (int64_t i = 0; i < R; i++) {
        const int64_t n = idx[i];
        if (n < 0 || n >= N) return -1;
        float *o = out + i * K;
        if (n < n8) {
            const uint16_t *w = W + (n / 8) * 8 * K + (n % 8) * 16;
            for (int64_t k = 0; k < K; k += 16)
                for (int j = 0; j < 16; j++) o[k + j] = scalar_bf16(w, k * ROWS + j);
        } else {
            for (int64_t k = 0; k < K; k++) o[k] = scalar_bf16(W, n * K + k);
        }
    }
    return 0;
}
