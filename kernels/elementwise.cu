// Element-wise ops and row lookups on f32 activations, one thread per element.

// SwiGLU: out = silu(gate) * up.
extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// out = a + b.
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// x *= s.
extern "C" __global__ void scale_f32(float* x, float s, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// out[t] = row ids[t] of a ggml-typed table of rows of `cols` values (block y = the row of the
// output, threads along the columns).
extern "C" __global__ void get_rows_f32(const float* table, const int* ids, float* out, int cols) {
    const float* src = table + (long)ids[blockIdx.y] * cols;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
        out[(long)blockIdx.y * cols + c] = src[c];
}

extern "C" __global__ void get_rows_f16(const f16_t* table, const int* ids, float* out, int cols) {
    const f16_t* src = table + (long)ids[blockIdx.y] * cols;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
        out[(long)blockIdx.y * cols + c] = f16_to_f32(src[c]);
}

extern "C" __global__ void get_rows_q8_0(const block_q8_0* table, const int* ids, float* out, int cols) {
    const block_q8_0* src = table + (long)ids[blockIdx.y] * (cols / QK);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
        out[(long)blockIdx.y * cols + c] = f16_to_f32(src[c / QK].d) * (float)src[c / QK].qs[c % QK];
}

extern "C" __global__ void get_rows_q4_0(const block_q4_0* table, const int* ids, float* out, int cols) {
    const block_q4_0* src = table + (long)ids[blockIdx.y] * (cols / QK);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        const block_q4_0& b = src[c / QK];
        const int j = c % QK;
        const int q = j < QK / 2 ? (b.qs[j] & 15) : (b.qs[j - QK / 2] >> 4);
        out[(long)blockIdx.y * cols + c] = f16_to_f32(b.d) * (float)(q - 8);
    }
}
