// Decode's mat-vec: y[t][r] = sum_c W[r][c] * x[t][c] for `n_tok` input rows, W in any type of
// dequant.cuh, dequantized on the fly. One warp per weight row (8 per block of 256 threads) and
// up to 8 input rows per block (grid y takes the next 8), so each weight byte is read once per 8
// tokens; lane k takes columns k, k + 32, … (neighbouring lanes read neighbouring values) and the
// warp sums at the end. x and y are f32 with row strides `x_stride` and `y_stride` (the output of
// several weights side by side, or one head's columns of an activation).
#define MV_WARPS 8
#define MV_MAX_TOK 8

#define MR_MATVEC(name, B, QKV)                                                                     \
    extern "C" __global__ void matvec_##name(const B* w, const float* x, float* y, int rows, int cols, \
                                             int n_tok, long x_stride, long y_stride) {             \
        const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);                                \
        const int lane = threadIdx.x & 31;                                                         \
        const int t0 = blockIdx.y * MV_MAX_TOK;                                                    \
        if (row >= rows || t0 >= n_tok) return;                                                    \
        const int nt = n_tok - t0 < MV_MAX_TOK ? n_tok - t0 : MV_MAX_TOK;                          \
        x += (long)t0 * x_stride;                                                                  \
        y += (long)t0 * y_stride;                                                                  \
        float acc[MV_MAX_TOK];                                                                     \
        for (int t = 0; t < MV_MAX_TOK; ++t) acc[t] = 0.0f;                                        \
        const B* wr = w + (long)row * (cols / QKV);                                                \
        for (int c = lane; c < cols; c += 32) {                                                    \
            const float wv = dq_##name(wr + c / QKV, c % QKV);                                     \
            for (int t = 0; t < MV_MAX_TOK; ++t)                                                   \
                if (t < nt) acc[t] += wv * x[(long)t * x_stride + c];                              \
        }                                                                                          \
        for (int t = 0; t < MV_MAX_TOK; ++t) {                                                     \
            const float s = warp_sum(acc[t]);                                                      \
            if (lane == 0 && t < nt) y[(long)t * y_stride + row] = s;                              \
        }                                                                                          \
    }

MR_FOR_EACH_TYPE(MR_MATVEC)

// Decode's routed experts in one launch: job j (grid y) multiplies weight ws[j] (a device
// address per job, all of one type) by input row x + j * x_job_stride (0: every job reads the same
// row) into row (rows_out ? rows_out[j] : j) of y. One warp per weight row, as matvec_*.
#define MR_MATVEC_GROUPED(name, B, QKV)                                                           \
    extern "C" __global__ void matvec_grouped_##name(const unsigned long long* ws, const float* x, \
                                                     long x_job_stride, float* y, const int* rows_out, \
                                                     long y_stride, int rows, int cols) {          \
        const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);                                \
        const int lane = threadIdx.x & 31, j = blockIdx.y;                                         \
        if (row >= rows) return;                                                                   \
        const B* wr = (const B*)ws[j] + (long)row * (cols / QKV);                                  \
        const float* xj = x + (long)j * x_job_stride;                                              \
        float acc = 0.0f;                                                                          \
        for (int c = lane; c < cols; c += 32) acc += dq_##name(wr + c / QKV, c % QKV) * xj[c];      \
        acc = warp_sum(acc);                                                                       \
        if (lane == 0) y[(long)(rows_out ? rows_out[j] : j) * y_stride + row] = acc;               \
    }

MR_FOR_EACH_TYPE(MR_MATVEC_GROUPED)
