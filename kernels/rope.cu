// RoPE on the first `n_dims` values of each head, in place: x is [n_tok][n_heads][head_stride]
// f32, `pos` one position per token. theta_i = pos * freq_scale * base^(-2i / n_dims), as ggml
// computes it (YaRN's ramp is not here yet). `neox` pairs value i with i + n_dims/2 (GPT-NeoX
// style, Qwen and most MoE families); otherwise adjacent pairs (2i, 2i+1), llama's normal style.
// One thread per pair; grid (pairs / blockDim.x, n_heads, n_tok).
extern "C" __global__ void rope_f32(float* x, const int* pos, int n_heads, int head_stride, int n_dims,
                                    float base, float freq_scale, int neox) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // pair index
    if (i >= n_dims / 2) return;
    const int head = blockIdx.y, tok = blockIdx.z;
    float* h = x + ((long)tok * n_heads + head) * head_stride;
    const float theta = (float)pos[tok] * freq_scale * powf(base, -2.0f * (float)i / (float)n_dims);
    float s, c;
    sincosf(theta, &s, &c);
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + n_dims / 2 : 2 * i + 1;
    const float x0 = h[a], x1 = h[b];
    h[a] = x0 * c - x1 * s;
    h[b] = x0 * s + x1 * c;
}
