// Prefill's tiled mat-mul: y[t][r] = sum_c W[r][c] * x[t][c], W in any type of dequant.cuh. A
// block of 256 threads computes 64 weight rows for 64 tokens, walking the columns 32 at a time:
// the weight tile is dequantized once into shared memory (each value once per 64 tokens, not
// once per token as the mat-vec does), the tokens' tile beside it, and each thread sums a 4 x 4
// patch (rows ty + 16i, tokens tx + 16j) in f32. Grid (rows / 64, n_tok / 64), rounded up.
// `matmul_grouped_*` runs many weights (a prefill's experts) in one launch, tile for tile the same.
#define MM_ROWS 64
#define MM_TOKS 64
#define MM_K 32

// One 64 x 64 tile of y (weight rows r0.., tokens t0..) for n_tok tokens of x.
#define MR_MATMUL_TILE(name, B, QKV)                                                                \
    MR_FN void mm_tile_##name(const B* w, const float* x, float* y, int rows, int cols, int n_tok,   \
                              long x_stride, long y_stride, int r0, int t0) {                       \
        __shared__ float ws[MM_K][MM_ROWS + 1];                                                    \
        __shared__ float xs[MM_K][MM_TOKS + 1];                                                    \
        const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;                                    \
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

#define MR_MATMUL(name, B, QKV)                                                                     \
    MR_MATMUL_TILE(name, B, QKV)                                                                    \
    extern "C" __global__ void matmul_##name(const B* w, const float* x, float* y, int rows, int cols, \
                                             int n_tok, long x_stride, long y_stride) {             \
        mm_tile_##name(w, x, y, rows, cols, n_tok, x_stride, y_stride, blockIdx.x * MM_ROWS,        \
                       blockIdx.y * MM_TOKS);                                                       \
    }                                                                                              \
    /* A prefill's routed experts in one launch: job j (grid z) multiplies weight ws[j] by its  */ \
    /* n[j] rows of x from row row0[j] into the same rows of y (the tokens of every expert      */ \
    /* gathered side by side); blocks past a job's rows leave at once. Each tile as matmul_.    */ \
    extern "C" __global__ void matmul_grouped_##name(const unsigned long long* ws, const float* x, float* y, \
                                                     const int* row0, const int* n, int rows, int cols, \
                                                     long x_stride, long y_stride) {                \
        const int j = blockIdx.z, t0 = blockIdx.y * MM_TOKS;                                       \
        if (t0 >= n[j]) return;                                                                    \
        mm_tile_##name((const B*)ws[j], x + (long)row0[j] * x_stride, y + (long)row0[j] * y_stride, \
                       rows, cols, n[j], x_stride, y_stride, blockIdx.x * MM_ROWS, t0);            \
    }

MR_FOR_EACH_TYPE(MR_MATMUL)
