// Decode's mat-vec: y[t][r] = sum_c W[r][c] * x[t][c] for each of `n_tok` (a few) input rows,
// with W in a ggml type, dequantized on the fly. One warp per weight row (8 per block of 256
// threads), so every weight byte is read once per call whatever `n_tok`; lanes take blocks of 32
// columns in turn and the warp sums at the end. x and y are f32, rows of `cols` and `rows`.
#define MV_WARPS 8
#define MV_MAX_TOK 8

#define MATVEC_BODY(ROW_DOT)                                                       \
    const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);                    \
    const int lane = threadIdx.x & 31;                                             \
    if (row >= rows) return;                                                       \
    float acc[MV_MAX_TOK];                                                         \
    for (int t = 0; t < MV_MAX_TOK; ++t) acc[t] = 0.0f;                            \
    ROW_DOT                                                                        \
    for (int t = 0; t < n_tok && t < MV_MAX_TOK; ++t) {                            \
        const float s = warp_sum(acc[t]);                                          \
        if (lane == 0) y[(long)t * rows + row] = s;                                \
    }

extern "C" __global__ void matvec_f32(const float* w, const float* x, float* y, int rows, int cols, int n_tok) {
    MATVEC_BODY({
        const float* wr = w + (long)row * cols;
        for (int c = lane; c < cols; c += 32) {
            const float wv = wr[c];
            for (int t = 0; t < n_tok && t < MV_MAX_TOK; ++t) acc[t] += wv * x[(long)t * cols + c];
        }
    })
}

extern "C" __global__ void matvec_f16(const f16_t* w, const float* x, float* y, int rows, int cols, int n_tok) {
    MATVEC_BODY({
        const f16_t* wr = w + (long)row * cols;
        for (int c = lane; c < cols; c += 32) {
            const float wv = f16_to_f32(wr[c]);
            for (int t = 0; t < n_tok && t < MV_MAX_TOK; ++t) acc[t] += wv * x[(long)t * cols + c];
        }
    })
}

extern "C" __global__ void matvec_q8_0(const block_q8_0* w, const float* x, float* y, int rows, int cols, int n_tok) {
    MATVEC_BODY({
        const int nb = cols / QK;
        const block_q8_0* wr = w + (long)row * nb;
        for (int b = lane; b < nb; b += 32) {
            const float d = f16_to_f32(wr[b].d);
            for (int t = 0; t < n_tok && t < MV_MAX_TOK; ++t) {
                const float* xb = x + (long)t * cols + b * QK;
                float s = 0.0f;
                for (int i = 0; i < QK; ++i) s += (float)wr[b].qs[i] * xb[i];
                acc[t] += d * s;
            }
        }
    })
}

extern "C" __global__ void matvec_q4_0(const block_q4_0* w, const float* x, float* y, int rows, int cols, int n_tok) {
    MATVEC_BODY({
        const int nb = cols / QK;
        const block_q4_0* wr = w + (long)row * nb;
        for (int b = lane; b < nb; b += 32) {
            const float d = f16_to_f32(wr[b].d);
            for (int t = 0; t < n_tok && t < MV_MAX_TOK; ++t) {
                const float* xb = x + (long)t * cols + b * QK;
                float s = 0.0f;
                for (int j = 0; j < QK / 2; ++j) {
                    const u8 q = wr[b].qs[j];
                    s += (float)((int)(q & 15) - 8) * xb[j] + (float)((int)(q >> 4) - 8) * xb[j + QK / 2];
                }
                acc[t] += d * s;
            }
        }
    })
}
