// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, one block per row of `n` f32 values (as ggml's
// rms_norm followed by the weight's mul; `w` may be null for the bare norm).
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, int n, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (long)blockIdx.x * n;
    float* yr = y + (long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float scale = rsqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * scale * (w ? w[i] : 1.0f);
}
