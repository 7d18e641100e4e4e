/* The two CPU kernels torch has no fast op for, in plain C (OpenMP threads, auto-vectorized).
 *
 * 1. paged_decode_attention: one new token per sequence, K/V read where they lie. The torch
 *    reference (reference.py) first gathers each sequence's K/V out of the paged cache into a
 *    padded, contiguous copy so that a matmul can read it; at batch 64 that copy and the
 *    padding cost more than the step's weight matmuls. Here each sequence walks its block
 *    table and reads every key row and every value row once, in place: three passes over one
 *    sequence (scores, softmax, weighted sum of values), sequences spread over the threads.
 * 2. small_batch_linear: y = x W^T for a few rows of x (a decode step of a small batch). Such
 *    a product only streams the weights once, so memory bandwidth is its limit; torch's
 *    matrix-vector path reads them on one core at about 12 GB/s here, this one on all
 *    threads at about 30 GB/s (output rows split between threads).
 *
 * All tensors float32 and contiguous. Built by cpu_kernels.py with
 * -O3 -march=native -ffast-math -fopenmp.
 */
#include <math.h>
#include <stdlib.h>

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
                    float dot = 0.f;
                    for (int d = 0; d < head_dim; d++) dot += qi[d] * ki[d];
                    scores[(long)i * len + t0 + j] = dot * scale;
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

/* x [m, k], w [n, k] (nn.Linear's layout), y [m, n]: each weight row is read once, for all m rows of x */
void small_batch_linear(const float *x, const float *w, float *y, int m, int n, int k, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int j = 0; j < n; j++) {
        const float *wj = w + (long)j * k;
        for (int i = 0; i < m; i++) {
            const float *xi = x + (long)i * k;
            float dot = 0.f;
            for (int d = 0; d < k; d++) dot += xi[d] * wj[d];
            y[(long)i * n + j] = dot;
        }
    }
}
