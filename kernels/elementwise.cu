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

// out[t] = row ids[t] of a table of rows of `cols` values in any type of dequant.cuh, as f32
// (block y = the output row, threads along the columns).
#define MR_GET_ROWS(name, B, QKV)                                                                   \
    extern "C" __global__ void get_rows_##name(const B* table, const int* ids, float* out, int cols) { \
        const B* src = table + (long)ids[blockIdx.y] * (cols / QKV);                               \
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) \
            out[(long)blockIdx.y * cols + c] = dq_##name(src + c / QKV, c % QKV);                  \
    }

MR_FOR_EACH_TYPE(MR_GET_ROWS)
