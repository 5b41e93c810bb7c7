// Element-wise ops, row lookups and row moves on f32 activations, one thread per element (grid y
// or z walks the rows where there are rows).

// out = a + b (out may be a).
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// x *= s.
extern "C" __global__ void scale_f32(float* x, float s, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// The gated linear unit of an expert, over `n` values of gate and up: kind 0 is SwiGLU,
// silu(g) * u; kind 1 is gpt-oss's clamped variant, g' = min(g, limit),
// g' / (1 + exp(-alpha g')) * (clamp(u, -limit, limit) + 1).
extern "C" __global__ void glu_f32(const float* gate, const float* up, float* out, long n, int kind, float alpha,
                                   float limit) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i], u = up[i];
    if (kind == 0) {
        out[i] = g / (1.0f + expf(-g)) * u;
    } else {
        const float gc = fminf(g, limit);
        out[i] = gc / (1.0f + expf(-alpha * gc)) * (fminf(fmaxf(u, -limit), limit) + 1.0f);
    }
}

// x[t][col + i] += b[i] for i < n; grid (n / blockDim.x, rows).
extern "C" __global__ void add_bias_f32(float* x, long stride, int col, const float* b, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[(long)blockIdx.y * stride + col + i] += b[i];
}

// Row (rows ? rows[j] : j) of x gets job j's bias: x[..][i] += ((const float*)bs[j])[i] for i < n;
// grid (n / blockDim.x, jobs).
extern "C" __global__ void add_bias_grouped_f32(float* x, long stride, const int* rows, const unsigned long long* bs,
                                                int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = blockIdx.y;
    if (i < n) x[(long)(rows ? rows[j] : j) * stride + i] += ((const float*)bs[j])[i];
}

// out[r] = x[ids[r]] (rows of `cols`, x rows `x_stride` apart); grid (cols / blockDim.x, n).
extern "C" __global__ void gather_rows_f32(const float* x, long x_stride, const int* ids, float* out, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) out[(long)blockIdx.y * cols + c] = x[(long)ids[blockIdx.y] * x_stride + c];
}

// out[ids[r]] = src[r] (rows of `cols`, out rows `out_stride` apart); grid (cols / blockDim.x, n).
extern "C" __global__ void scatter_rows_f32(const float* src, int cols, const int* ids, float* out, long out_stride) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) out[(long)ids[blockIdx.y] * out_stride + c] = src[(long)blockIdx.y * cols + c];
}

// out[t] = sum over i in starts[t]..starts[t+1] of weights[i] * y[rows[i]], in that order (an
// expert's output weighted by its gate, summed per token in rank order); grid (cols /
// blockDim.x, n_tok).
extern "C" __global__ void combine_f32(const float* y, int cols, const int* starts, const int* rows,
                                       const float* weights, float* out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int t = blockIdx.y;
    float acc = 0.0f;
    for (int i = starts[t]; i < starts[t + 1]; ++i) acc += y[(long)rows[i] * cols + c] * weights[i];
    out[(long)t * cols + c] = acc;
}

// out[t][to + h * to_stride + i] = x[t][from + h * from_stride + i] for i < width; grid
// (width / blockDim.x, n_blocks, rows).
extern "C" __global__ void copy_cols_f32(const float* x, long x_stride, int from, int from_stride, float* out,
                                         long out_stride, int to, int to_stride, int width) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width) return;
    const long t = blockIdx.z;
    out[t * out_stride + to + (long)blockIdx.y * to_stride + i] = x[t * x_stride + from + (long)blockIdx.y * from_stride + i];
}

// x rounded as ggml's CPU rounds an activation to a weight's `vec_dot_type` before the dot
// product (llama.cpp's data types, kept so the GPU computes what the reference computes): kind 1
// Q8_0 and 2 Q8_1 (blocks of 32: scale amax / 127 kept as f16, q = rint(x * 127 / amax)), 3 Q8_K
// (blocks of 256: iscale = -127 / the value of largest magnitude, q = min(127, rint(x * iscale)),
// scale 1 / iscale as f32), 4 F16, 5 BF16 (round to nearest even). One thread per block of a row
// of `cols`; grid (blocks / blockDim.x, rows).
extern "C" __global__ void round_act_f32(const float* x, long x_stride, float* out, long out_stride, int cols,
                                         int kind) {
    const int qk = kind == 3 ? 256 : 32;
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b * qk >= cols) return;
    const float* xr = x + (long)blockIdx.y * x_stride + b * qk;
    float* o = out + (long)blockIdx.y * out_stride + b * qk;
    const int n = cols - b * qk < qk ? cols - b * qk : qk;
    if (kind == 1 || kind == 2) {
        float amax = 0.0f;
        for (int j = 0; j < n; ++j) amax = fmaxf(amax, fabsf(xr[j]));
        const float d = f16_to_f32(f32_to_f16(amax / 127.0f));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < n; ++j) o[j] = rintf(xr[j] * id) * d;
    } else if (kind == 3) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < n; ++j) {
            const float a = fabsf(xr[j]);
            if (a > amax) {
                amax = a;
                max = xr[j];
            }
        }
        if (amax == 0.0f) {
            for (int j = 0; j < n; ++j) o[j] = 0.0f;
            return;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < n; ++j) o[j] = fminf(127.0f, rintf(iscale * xr[j])) * (1.0f / iscale);
    } else if (kind == 4) {
        for (int j = 0; j < n; ++j) o[j] = f16_to_f32(f32_to_f16(xr[j]));
    } else {
        for (int j = 0; j < n; ++j) {
            u32 u = f32_bits(xr[j]);
            if ((u & 0x7fffffffu) <= 0x7f800000u) u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
            o[j] = bits_to_f32(u);
        }
    }
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
