// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over blocks of `n` f32 values (as ggml's rms_norm
// followed by the weight's mul; `w` may be null for the bare norm). Block (h, t) norms the `n`
// values from x + t * x_stride + h * n into y + t * y_stride + h * n: whole rows (grid (1, rows),
// n = the row's width) or the heads of a projection in place (grid (n_heads, rows), x = y). Each
// thread writes only the values it read, so x = y is safe.
extern "C" __global__ void rms_norm_f32(const float* x, long x_stride, const float* w, float* y, long y_stride,
                                        int n, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long)blockIdx.y * x_stride + (long)blockIdx.x * n;
    float* yr = y + (long)blockIdx.y * y_stride + (long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float scale = rsqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * (w ? w[i] : 1.0f);
}

// A residual add and the norm after it (whole rows, grid (1, rows)): x += r, then y = rms_norm(x) · w,
// the same values as add_f32 then rms_norm_f32. Each thread reads back only what it wrote.
extern "C" __global__ void add_rms_norm_f32(float* x, const float* r, long stride, const float* w, float* y,
                                            long y_stride, int n, float eps) {
    __shared__ float scratch[32];
    float* xr = x + (long)blockIdx.y * stride;
    const float* rr = r + (long)blockIdx.y * stride;
    float* yr = y + (long)blockIdx.y * y_stride;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] + rr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float scale = rsqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * (w ? w[i] : 1.0f);
}
