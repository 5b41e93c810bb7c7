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
