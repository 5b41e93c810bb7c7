// Prefill's tiled mat-mul: y[t][r] = sum_c W[r][c] * x[t][c], W in any type of dequant.cuh. A
// block of 256 threads computes 64 weight rows for 64 tokens, walking the columns 32 at a time:
// the weight tile is dequantized once into shared memory (each value once per 64 tokens, not
// once per token as the mat-vec does), the tokens' tile beside it, and each thread sums a 4 x 4
// patch (rows ty + 16i, tokens tx + 16j) in f32. Grid (rows / 64, n_tok / 64), rounded up.
#define MM_ROWS 64
#define MM_TOKS 64
#define MM_K 32

#define MR_MATMUL(name, B, QKV)                                                                     \
    extern "C" __global__ void matmul_##name(const B* w, const float* x, float* y, int rows, int cols, \
                                             int n_tok, long x_stride, long y_stride) {             \
        __shared__ float ws[MM_K][MM_ROWS + 1];                                                    \
        __shared__ float xs[MM_K][MM_TOKS + 1];                                                    \
        const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;                                    \
        const int r0 = blockIdx.x * MM_ROWS, t0 = blockIdx.y * MM_TOKS;                            \
        float acc[4][4];                                                                           \
        for (int i = 0; i < 4; ++i)                                                                \
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;                                          \
        for (int k0 = 0; k0 < cols; k0 += MM_K) {                                                  \
            for (int e = threadIdx.x; e < MM_ROWS * MM_K; e += 256) {                              \
                const int r = e / MM_K, k = e % MM_K, c = k0 + k;                                  \
                float v = 0.0f;                                                                    \
                if (r0 + r < rows && c < cols) v = dq_##name(w + (long)(r0 + r) * (cols / QKV) + c / QKV, c % QKV); \
                ws[k][r] = v;                                                                      \
            }                                                                                      \
            for (int e = threadIdx.x; e < MM_TOKS * MM_K; e += 256) {                              \
                const int t = e / MM_K, k = e % MM_K, c = k0 + k;                                  \
                xs[k][t] = (t0 + t < n_tok && c < cols) ? x[(long)(t0 + t) * x_stride + c] : 0.0f; \
            }                                                                                      \
            __syncthreads();                                                                       \
            for (int k = 0; k < MM_K; ++k) {                                                       \
                float a[4], b[4];                                                                  \
                for (int i = 0; i < 4; ++i) a[i] = ws[k][ty + 16 * i];                             \
                for (int j = 0; j < 4; ++j) b[j] = xs[k][tx + 16 * j];                             \
                for (int i = 0; i < 4; ++i)                                                        \
                    for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];                          \
            }                                                                                      \
            __syncthreads();                                                                       \
        }                                                                                          \
        for (int i = 0; i < 4; ++i)                                                                \
            for (int j = 0; j < 4; ++j) {                                                          \
                const int r = r0 + ty + 16 * i, t = t0 + tx + 16 * j;                              \
                if (r < rows && t < n_tok) y[(long)t * y_stride + r] = acc[i][j];                  \
            }                                                                                      \
    }

MR_FOR_EACH_TYPE(MR_MATMUL)
