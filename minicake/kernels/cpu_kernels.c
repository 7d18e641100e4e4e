/* The two CPU kernels torch has no fast op for, in plain C (OpenMP threads, auto-vectorized).
 *
 * 1. paged_decode_attention: one new token per sequence, K/V read where they lie. The torch
 *    reference (reference.py) first gathers each sequence's K/V out of the paged cache into a
 *    padded, contiguous copy so that a matmul can read it; at batch 64 that copy and the
 *    padding cost more than the step's weight matmuls. Here each sequence walks its block
 *    table and reads every key row and every value row once, in place: three passes over one
 *    sequence (scores, softmax, weighted sum of values), sequences spread over the threads.
 * 2. small_batch_linear: y = x W^T for the few rows of a decode step (up to 64). torch's
 *    matmul runs such shapes far below its large-matrix rate here: one row reads the
 *    weights on one core at about 12 GB/s, 16 rows make 50 GFLOP/s of its 190. This one
 *    splits the weight rows between the threads and computes 4 x 4 output tiles in vector
 *    registers: about 26 GB/s at one row, 80 GFLOP/s at 16, even with torch by 128 rows.
 *
 * All tensors float32 and contiguous. Built by cpu_kernels.py with
 * -O3 -march=native -ffast-math -fopenmp.
 */
#include <math.h>
#include <stdlib.h>

/* a . b over n floats (vectorized: -ffast-math lets the compiler reorder the sum) */
static inline float dot(const float *a, const float *b, int n) {
    float sum = 0.f;
    for (int d = 0; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* q, out        [num_seqs, num_q_heads, head_dim]
 * k/v_cache     [num_blocks, block_size, num_kv_heads, head_dim]
 * block_tables  [num_seqs, max_blocks] int32;  seq_lens [num_seqs] int32
 * Query head i reads kv head i / group (GQA), as in transformers' repeat_kv. */
void paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                            const int *block_tables, const int *seq_lens, float *out,
                            int num_seqs, int max_blocks, int num_q_heads, int num_kv_heads,
                            int head_dim, int block_size, float scale, int num_threads) {
    const int group = num_q_heads / num_kv_heads;
    const long row = (long)num_kv_heads * head_dim; /* floats in one cache slot (all kv heads) */

#pragma omp parallel for schedule(dynamic) num_threads(num_threads)
    for (int s = 0; s < num_seqs; s++) {
        const int len = seq_lens[s];
        const int *table = block_tables + (long)s * max_blocks;
        const float *qs = q + (long)s * num_q_heads * head_dim;   /* [num_q_heads, head_dim] */
        float *os = out + (long)s * num_q_heads * head_dim;       /* [num_q_heads, head_dim] */
        float *scores = malloc(sizeof(float) * num_q_heads * len); /* [num_q_heads, len] */

        /* 1. scores[i, t] = scale * q_i . k_t, block by block */
        for (int t0 = 0; t0 < len; t0 += block_size) {
            const float *block = k_cache + (long)table[t0 / block_size] * block_size * row;
            const int n = len - t0 < block_size ? len - t0 : block_size;
            for (int j = 0; j < n; j++) {
                const float *k = block + j * row;
                for (int i = 0; i < num_q_heads; i++) {
                    const float *qi = qs + (long)i * head_dim, *ki = k + (long)(i / group) * head_dim;
                    scores[(long)i * len + t0 + j] = dot(qi, ki, head_dim) * scale;
                }
            }
        }
        /* 2. softmax of each query head's row; the division by the sum waits for the end */
        float inv_sum[num_q_heads];
        for (int i = 0; i < num_q_heads; i++) {
            float *p = scores + (long)i * len, max = p[0], sum = 0.f;
            for (int t = 1; t < len; t++) max = fmaxf(max, p[t]);
            for (int t = 0; t < len; t++) {
                p[t] = expf(p[t] - max);
                sum += p[t];
            }
            inv_sum[i] = 1.f / sum;
        }
        /* 3. out_i = sum_t p[i, t] * v_t / sum_i, block by block */
        for (int i = 0; i < num_q_heads * head_dim; i++) os[i] = 0.f;
        for (int t0 = 0; t0 < len; t0 += block_size) {
            const float *block = v_cache + (long)table[t0 / block_size] * block_size * row;
            const int n = len - t0 < block_size ? len - t0 : block_size;
            for (int j = 0; j < n; j++) {
                const float *v = block + j * row;
                for (int i = 0; i < num_q_heads; i++) {
                    const float p = scores[(long)i * len + t0 + j], *vi = v + (long)(i / group) * head_dim;
                    float *oi = os + (long)i * head_dim;
                    for (int d = 0; d < head_dim; d++) oi[d] += p * vi[d];
                }
            }
        }
        for (int i = 0; i < num_q_heads; i++)
            for (int d = 0; d < head_dim; d++) os[(long)i * head_dim + d] *= inv_sum[i];
        free(scores);
    }
}

/* 16 floats: GCC/Clang vector extension, compiled to AVX-512 (or two AVX2) registers; aligned(4)
 * lets it load from any float address. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* One output tile: y[r, c] = x[r] . w[c] for R rows of x (4 or 1) and 4 rows of w, k a multiple
 * of 16. The R x 4 accumulators stay in registers along k; each is summed across its lanes once
 * at the end. A macro makes one copy per R, so that R is a constant the loops unroll over. */
#define LINEAR_TILE(R)                                                                          \
    static void linear_tile_##R(const float *x, const float *w, float *y, int n, int k) {       \
        v16 acc[R][4] = {0};                                                                     \
        for (int d = 0; d < k; d += 16) {                                                        \
            const v16 w0 = *(const v16 *)(w + d), w1 = *(const v16 *)(w + k + d);               \
            const v16 w2 = *(const v16 *)(w + 2L * k + d), w3 = *(const v16 *)(w + 3L * k + d);  \
            for (int r = 0; r < R; r++) {                                                        \
                const v16 a = *(const v16 *)(x + (long)r * k + d);                               \
                acc[r][0] += a * w0; acc[r][1] += a * w1; acc[r][2] += a * w2; acc[r][3] += a * w3; \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R; r++)                                                              \
            for (int c = 0; c < 4; c++) {                                                        \
                float sum = 0.f;                                                                 \
                for (int i = 0; i < 16; i++) sum += acc[r][c][i];                                \
                y[(long)r * n + c] = sum;                                                        \
            }                                                                                    \
    }
LINEAR_TILE(4)
LINEAR_TILE(1)

/* x [m, k], w [n, k] (nn.Linear's layout), y [m, n]; k a multiple of 16. Threads split the rows
 * of w. Up to 4 rows of x the product is bound by reading w: each row of w is streamed once
 * against every row of x. Beyond, in groups of 4 rows of w, 4 x 4 tiles, then the rows left over. */
void small_batch_linear(const float *x, const float *w, float *y, int m, int n, int k, int num_threads) {
    if (m <= 4) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) y[(long)i * n + j] = dot(x + (long)i * k, w + (long)j * k, k);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int j = 0; j < n - 3; j += 4) {
        int i = 0;
        for (; i + 4 <= m; i += 4) linear_tile_4(x + (long)i * k, w + (long)j * k, y + (long)i * n + j, n, k);
        for (; i < m; i++) linear_tile_1(x + (long)i * k, w + (long)j * k, y + (long)i * n + j, n, k);
    }
    for (int j = n - n % 4; j < n; j++) /* the last n % 4 rows of w, if any */
        for (int i = 0; i < m; i++) y[(long)i * n + j] = dot(x + (long)i * k, w + (long)j * k, k);
}
