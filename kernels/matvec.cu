// Decode's mat-vec: y[t][r] = sum_c W[r][c] * x[t][c] for each of `n_tok` (at most 8) input
// rows, W in any type of dequant.cuh, dequantized on the fly. One warp per weight row (8 per
// block of 256 threads), so each weight byte is read once per call whatever `n_tok`; lane k takes
// columns k, k + 32, … (neighbouring lanes read neighbouring values) and the warp sums at the
// end. x and y are f32, rows of `cols` and `rows` values. The reference for the faster per-type
// kernels to come: one value dequantized at a time.
#define MV_WARPS 8
#define MV_MAX_TOK 8

#define MR_MATVEC(name, B, QKV)                                                                     \
    extern "C" __global__ void matvec_##name(const B* w, const float* x, float* y, int rows, int cols, \
                                             int n_tok) {                                         \
        const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);                                \
        const int lane = threadIdx.x & 31;                                                         \
        if (row >= rows) return;                                                                   \
        const int nt = n_tok < MV_MAX_TOK ? n_tok : MV_MAX_TOK;                                    \
        float acc[MV_MAX_TOK];                                                                     \
        for (int t = 0; t < MV_MAX_TOK; ++t) acc[t] = 0.0f;                                        \
        const B* wr = w + (long)row * (cols / QKV);                                                \
        for (int c = lane; c < cols; c += 32) {                                                    \
            const float wv = dq_##name(wr + c / QKV, c % QKV);                                     \
            for (int t = 0; t < nt; ++t) acc[t] += wv * x[(long)t * cols + c];                     \
        }                                                                                          \
        for (int t = 0; t < nt; ++t) {                                                             \
            const float s = warp_sum(acc[t]);                                                      \
            if (lane == 0) y[(long)t * rows + row] = s;                                            \
        }                                                                                          \
    }

MR_FOR_EACH_TYPE(MR_MATVEC)
