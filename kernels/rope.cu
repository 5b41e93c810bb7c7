// RoPE on the first `n_dims` values of `n_heads` heads spaced `head_dim` apart, in place: x points
// at the first head's column of token 0, rows `row_stride` apart; token t sits at position
// pos0 + t. theta_i = pos * base^(-2i / n_dims) (extrapolated) and freq_scale times that
// (interpolated); YaRN (ext_factor != 0) mixes the two by a ramp over `corr0..corr1` and scales
// cos and sin by 1 + 0.1 ln(1 / freq_scale) on top of `attn_factor`, as ggml's rope does. `neox`
// pairs value i with i + n_dims/2 (GPT-NeoX style: Qwen and most MoE families); otherwise adjacent
// pairs (2i, 2i+1), llama's normal style. One thread per pair; grid (pairs / blockDim.x, n_heads,
// n_tok).
extern "C" __global__ void rope_f32(float* x, long row_stride, int head_dim, int n_dims, int pos0, float base,
                                    float freq_scale, float ext_factor, float attn_factor, float corr0, float corr1,
                                    int neox) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // pair index
    if (i >= n_dims / 2) return;
    float* h = x + (long)blockIdx.z * row_stride + (long)blockIdx.y * head_dim;
    const float extrap = (float)(pos0 + (int)blockIdx.z) * powf(base, -2.0f * (float)i / (float)n_dims);
    const float interp = freq_scale * extrap;
    float theta = interp, mscale = attn_factor;
    if (ext_factor != 0.0f) {
        const float y = ((float)i - corr0) / fmaxf(0.001f, corr1 - corr0);
        const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * ext_factor;
        theta = interp * (1.0f - mix) + extrap * mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / freq_scale);
    }
    float s, c;
    sincosf(theta, &s, &c);
    c *= mscale;
    s *= mscale;
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + n_dims / 2 : 2 * i + 1;
    const float x0 = h[a], x1 = h[b];
    h[a] = x0 * c - x1 * s;
    h[b] = x0 * s + x1 * c;
}
