/* The 4-bit AdamW step of hf_ext.kernels.adamw4bit_step on the CPU (Li, Chen & Zhu, arXiv 2309.01507).

   The same operations as the torch twin, in the same order, each a separately rounded fp32 operation: the module
   is built with -ffp-contract=off and without unsafe math, so the compiler may vectorise but not contract a multiply
   and an add, and every result (parameter, codes, scales) equals the twin's bit for bit; only AdamW4bitFactor's sums
   of g^2 (adamw4bit_squared_sums) are summed in fp64, another order than the twin's. sqrt is taken in fp64 and
   rounded to fp32, which is the correctly rounded fp32 sqrt (the twin's _sqrt_rn).

   Work is split by the caller into ranges of quantisation blocks (or of rows, for the statistics passes) that
   threads run concurrently; no function here writes outside its range, except the statistics calls, which write
   their own column buffers. Tensors are contiguous; the dtype codes are those of DTYPE_CODES in
   hf_ext/kernels/cpu_library.py. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __FLT16_MAX__ /* the compiler has _Float16 (gcc >= 12, clang >= 15 on x86); without it fp16 takes the twin */
#define HAS_FP16 1
#else
#define HAS_FP16 0
#endif

int adamw4bit_has_fp16(void) { return HAS_FP16; }

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };
enum { V_BLOCK = 0, V_RANK1 = 1, V_FACTORED = 3 };
enum { DECAY, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, BIAS_CORRECTION2_SQRT, NEG_STEP_SIZE, EPS };
enum { SEGMENT = 512 }; /* columns of a row the rank-1 statistics read at a time */

static void load_fp32(const void *src, int dtype, int64_t start, int64_t n, float *dst) {
    if (dtype == DTYPE_F32) {
        memcpy(dst, (const float *)src + start, (size_t)n * sizeof(float));
    } else if (dtype == DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)s[i] << 16;
            memcpy(dst + i, &bits, sizeof(bits));
        }
    } else {
#if HAS_FP16
        const _Float16 *s = (const _Float16 *)src + start;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
#endif
    }
}

static void store_param(void *dst, int dtype, int64_t start, int64_t n, const float *src) {
    if (dtype == DTYPE_F32) {
        memcpy((float *)dst + start, src, (size_t)n * sizeof(float));
    } else if (dtype == DTYPE_BF16) { /* round to nearest even (torch's fp32 -> bf16 for finite values; NaN goes to
                                         0x7FC0, where torch's own bits depend on the CPU's vector extensions) */
        uint16_t *d = (uint16_t *)dst + start;
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, src + i, sizeof(bits));
            d[i] = src[i] != src[i] ? 0x7FC0 : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
        }
    } else {
#if HAS_FP16
        _Float16 *d = (_Float16 *)dst + start;
        for (int64_t i = 0; i < n; i++) d[i] = (_Float16)src[i];
#endif
    }
}

static inline float min2(float a, float b) { return b < a ? b : a; }

/* The larger of a running maximum and x, NaN once either is NaN (torch's amax propagates NaN). */
static inline float max_nan(float running, float x) { return (x > running || x != x) ? x : running; }

/* The number of the 15 midpoints strictly below each x: the nearest code, ties to the lower one; a NaN (0/0 of an
   overflowed block) is above all of them, code 15, as torch.searchsorted places it. */
static void nearest_codes(const float *x, int64_t n, const float *midpoints, uint8_t *codes) {
    for (int64_t i = 0; i < n; i++) {
        int code = 0;
        for (int k = 0; k < 15; k++) code += !(x[i] <= midpoints[k]);
        codes[i] = (uint8_t)code;
    }
}

/* Normalise a block by its scale (a zero scale divides as 1) and choose its codes. */
static void quantize_block(const float *x, int n, float scale, const float *midpoints, float *x_hat, uint8_t *codes) {
    float divisor = scale > 0.0f ? scale : 1.0f;
    for (int i = 0; i < n; i++) x_hat[i] = x[i] / divisor;
    nearest_codes(x_hat, n, midpoints, codes);
}

static void pack(const uint8_t *codes, int64_t n_bytes, uint8_t *dst) {
    for (int64_t j = 0; j < n_bytes; j++) dst[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
}

static void unpack(const uint8_t *src, int64_t n_bytes, int64_t n_codes, uint8_t *codes) {
    for (int64_t j = 0; j < n_bytes; j++) {
        codes[2 * j] = src[j] & 15;
        codes[2 * j + 1] = src[j] >> 4;
    }
    for (int64_t i = 2 * n_bytes; i < n_codes; i++) codes[i] = 0;
}

/* The rank-1 scale min(row[r], col[c]) of n consecutive elements from flat index e. */
static void rank1_scales(const float *row, const float *col, int64_t n_cols, int64_t e, int64_t n, float *scale) {
    int64_t r = e / n_cols, c = e % n_cols;
    for (int64_t i = 0; i < n; i++) {
        scale[i] = min2(row[r], col[c]);
        if (++c == n_cols) c = 0, r++;
    }
}

/* This step's factored v, ratio[fr] * col[(fr / n_rows) n_cols + c], of n consecutive elements from flat index e
   of a stack of (n_rows, n_cols) slices (fr: the row over all slices), as the twin's factored_v. */
static void factored_v(const float *ratio, const float *col, int64_t n_rows, int64_t n_cols, int64_t e, int64_t n,
                       float *v) {
    int64_t fr = e / n_cols, c = e % n_cols;
    for (int64_t i = 0; i < n; i++) {
        v[i] = ratio[fr] * col[(fr / n_rows) * n_cols + c];
        if (++c == n_cols) c = 0, fr++;
    }
}

/* Step blocks [block_begin, block_end) of one parameter of numel elements, in place.
   v_mode V_BLOCK: v codes with block scales v_absmax; V_RANK1: v codes with the old rank-1 statistics old_row,
   old_col and the new ones new_row, new_col (computed before, by adamw4bit_rank1_stats), n_cols columns;
   V_FACTORED: this step's v is factored_v(old_row, old_col) of (n_rows, n_cols) slices (AdamW4bitFactor's R / mean R
   and C), and no v state is read or written. scalars: the 7 floats of StepScalars, in its order. block_size is
   even. Returns 0, or -1 when the scratch buffers (26 bytes per block element) cannot be allocated. */
int adamw4bit_blocks(void *param, int param_dtype, const void *grad, int grad_dtype, uint8_t *m_codes,
                      float *m_absmax, uint8_t *v_codes, float *v_absmax, const float *old_row, const float *old_col,
                      const float *new_row, const float *new_col, const float *de, const float *de_mid,
                      const float *lin, const float *lin_mid, int64_t numel, int64_t block_begin, int64_t block_end,
                      int block_size, int64_t n_rows, int64_t n_cols, int v_mode, const float *s) {
    float *scratch = malloc((size_t)block_size * (6 * sizeof(float) + 2));
    if (scratch == NULL) return -1;
    float *p = scratch, *g = p + block_size, *m = g + block_size, *v = m + block_size, *scale = v + block_size;
    float *x_hat = scale + block_size;
    uint8_t *m_q = (uint8_t *)(x_hat + block_size), *v_q = m_q + block_size;
    for (int64_t b = block_begin; b < block_end; b++) {
        int64_t e0 = b * block_size, byte0 = e0 / 2;
        int n = numel - e0 < block_size ? (int)(numel - e0) : block_size;
        int n_bytes = (n + 1) / 2;
        load_fp32(param, param_dtype, e0, n, p);
        load_fp32(grad, grad_dtype, e0, n, g);
        unpack(m_codes + byte0, n_bytes, block_size, m_q);
        for (int i = 0; i < n; i++) m[i] = de[m_q[i]] * m_absmax[b];
        if (v_mode == V_FACTORED) {
            factored_v(old_row, old_col, n_rows, n_cols, e0, n, v);
        } else {
            unpack(v_codes + byte0, n_bytes, block_size, v_q);
            if (v_mode == V_RANK1) {
                rank1_scales(old_row, old_col, n_cols, e0, n, scale);
                for (int i = 0; i < n; i++) v[i] = lin[v_q[i]] * scale[i];
            } else {
                for (int i = 0; i < n; i++) v[i] = lin[v_q[i]] * v_absmax[b];
            }
            for (int i = 0; i < n; i++) v[i] = v[i] * s[BETA2] + (s[ONE_MINUS_BETA2] * g[i]) * g[i];
        }
        for (int i = 0; i < n; i++) {
            m[i] = m[i] + s[ONE_MINUS_BETA1] * (g[i] - m[i]);
            float root = (float)__builtin_sqrt((double)v[i]);
            p[i] = p[i] * s[DECAY] + (s[NEG_STEP_SIZE] * m[i]) / (root / s[BIAS_CORRECTION2_SQRT] + s[EPS]);
        }
        store_param(param, param_dtype, e0, n, p);
        for (int i = n; i < block_size; i++) m[i] = v[i] = 0.0f; /* the zero padding of the last block */

        float m_max = 0.0f;
        for (int i = 0; i < block_size; i++) m_max = max_nan(m_max, m[i] < 0.0f ? -m[i] : m[i]);
        quantize_block(m, block_size, m_max, de_mid, x_hat, m_q);
        pack(m_q, n_bytes, m_codes + byte0);
        m_absmax[b] = m_max;
        if (v_mode == V_BLOCK) {
            float v_max = 0.0f;
            for (int i = 0; i < block_size; i++) v_max = max_nan(v_max, v[i]);
            quantize_block(v, block_size, v_max, lin_mid, x_hat, v_q);
            v_absmax[b] = v_max;
        } else if (v_mode == V_RANK1) {
            rank1_scales(new_row, new_col, n_cols, e0, n, scale);
            for (int i = 0; i < n; i++) x_hat[i] = v[i] / (scale[i] > 0.0f ? scale[i] : 1.0f);
            for (int i = n; i < block_size; i++) x_hat[i] = 0.0f;
            nearest_codes(x_hat, block_size, lin_mid, v_q);
        }
        if (v_mode != V_FACTORED) pack(v_q, n_bytes, v_codes + byte0);
    }
    free(scratch);
    return 0;
}

/* Row and column maxima of the new rank-1 v over rows [row_begin, row_end) of an (n_rows, n_cols) parameter:
   new_row[r] for those rows, col_max (n_cols, zeroed by the caller) for this range's column maxima, and *grad_max
   the largest |g| of the range (NaN when one is NaN). Returns 0. */
int adamw4bit_rank1_stats(const void *grad, int grad_dtype, const uint8_t *v_codes, const float *old_row,
                           const float *old_col, const float *lin, int64_t row_begin, int64_t row_end,
                           int64_t n_cols, float *new_row, float *col_max, float *grad_max, const float *s) {
    float g[SEGMENT], v[SEGMENT], g_max = 0.0f;
    for (int64_t r = row_begin; r < row_end; r++) {
        float row_max = 0.0f;
        for (int64_t c0 = 0; c0 < n_cols; c0 += SEGMENT) {
            int64_t n = n_cols - c0 < SEGMENT ? n_cols - c0 : SEGMENT, e0 = r * n_cols + c0;
            load_fp32(grad, grad_dtype, e0, n, g);
            for (int64_t i = 0; i < n; i++) {
                int64_t e = e0 + i;
                int q = (v_codes[e >> 1] >> ((e & 1) * 4)) & 15;
                v[i] = lin[q] * min2(old_row[r], old_col[c0 + i]);
                v[i] = v[i] * s[BETA2] + (s[ONE_MINUS_BETA2] * g[i]) * g[i];
            }
            for (int64_t i = 0; i < n; i++) {
                row_max = max_nan(row_max, v[i]);
                col_max[c0 + i] = max_nan(col_max[c0 + i], v[i]);
                g_max = max_nan(g_max, g[i] < 0.0f ? -g[i] : g[i]);
            }
        }
        new_row[r] = row_max;
    }
    *grad_max = g_max;
    return 0;
}

/* AdamW with fp32 m and v (the tensors too small to quantize) of n_tensors tensors, in place: the twin's next_m,
   next_v and stepped_param in its order. Tensor t has numels[t] elements, param_dtypes[t] / grad_dtypes[t] and the
   7 scalars scalars[7 t .. 7 t + 6]. Returns 0. */
int adamw_fp32_states(int64_t n_tensors, void *const *params, const int *param_dtypes, const void *const *grads,
                      const int *grad_dtypes, float *const *ms, float *const *vs, const int64_t *numels,
                      const float *scalars) {
    enum { CHUNK = 256 };
    float p[CHUNK], g[CHUNK];
    for (int64_t t = 0; t < n_tensors; t++) {
        const float *s = scalars + 7 * t;
        float *m = ms[t], *v = vs[t];
        for (int64_t e0 = 0; e0 < numels[t]; e0 += CHUNK) {
            int n = numels[t] - e0 < CHUNK ? (int)(numels[t] - e0) : CHUNK;
            load_fp32(params[t], param_dtypes[t], e0, n, p);
            load_fp32(grads[t], grad_dtypes[t], e0, n, g);
            for (int i = 0; i < n; i++) {
                float mi = m[e0 + i] + s[ONE_MINUS_BETA1] * (g[i] - m[e0 + i]);
                float vi = v[e0 + i] * s[BETA2] + (s[ONE_MINUS_BETA2] * g[i]) * g[i];
                float root = (float)__builtin_sqrt((double)vi);
                p[i] = p[i] * s[DECAY] + (s[NEG_STEP_SIZE] * mi) / (root / s[BIAS_CORRECTION2_SQRT] + s[EPS]);
                m[e0 + i] = mi;
                v[e0 + i] = vi;
            }
            store_param(params[t], param_dtypes[t], e0, n, p);
        }
    }
    return 0;
}

/* AdamW4bitFactor's statistics pass over flat rows [row_begin, row_end) of a stack of (n_rows, n_cols) gradient
   slices: row_sums[fr] = sum_c g^2 of each of those rows, in fp64 (exact products, summed in column order), and
   the column sums of each group of group_rows rows into its own row of col_sums (n_groups x slices n_cols, zeroed
   by the caller; a range holds whole groups), so that the caller adds the groups in a fixed order whatever the
   threads; *grad_max: the largest |g| of the range (NaN when one is NaN). Returns 0. */
int adamw4bit_squared_sums(const void *grad, int grad_dtype, int64_t row_begin, int64_t row_end, int64_t n_rows,
                           int64_t n_cols, int64_t group_rows, int64_t slices, double *row_sums, double *col_sums,
                           float *grad_max) {
    float g[SEGMENT], g_max = 0.0f;
    for (int64_t r = row_begin; r < row_end; r++) {
        double row_sum = 0.0, *cols = col_sums + (r / group_rows) * slices * n_cols + (r / n_rows) * n_cols;
        for (int64_t c0 = 0; c0 < n_cols; c0 += SEGMENT) {
            int64_t n = n_cols - c0 < SEGMENT ? n_cols - c0 : SEGMENT;
            load_fp32(grad, grad_dtype, r * n_cols + c0, n, g);
            for (int64_t i = 0; i < n; i++) {
                double squared = (double)g[i] * (double)g[i];
                row_sum += squared;
                cols[c0 + i] += squared;
                g_max = max_nan(g_max, g[i] < 0.0f ? -g[i] : g[i]);
            }
        }
        row_sums[r] = row_sum;
    }
    *grad_max = g_max;
    return 0;
}
