// Attention over a KV cache in GPU memory: `kv_store_*` writes a batch's keys and values, `attn_*`
// attends each query head of each token over its positions.
//
// The cache of one layer is [ring][kv_dim] keys (and as many values), f16 or f32, position p in
// row p % ring: `ring` is the context length, or for a sliding-window layer its window plus the
// largest batch (llama.cpp's SWA cache: a batch stores every row before any attends, so no row it
// writes is one an earlier row of it still needs). Kv head j's columns are j * head_dim ... With
// values that are key prefixes (DeepSeek's MLA: the key is [latent | k_pe], the value the latent)
// the values are read from the keys.

MR_FN float kv_load(const float* p) { return *p; }
MR_FN float kv_load(const f16_t* p) { return f16_to_f32(*p); }
MR_FN void kv_put(float* p, float v) { *p = v; }
MR_FN void kv_put(f16_t* p, float v) { *p = f32_to_f16(v); }

// Row t of `qkv` (rows `qkv_stride` apart): keys at column k_col, values at v_col (v_col < 0: no
// values) into position pos0 + t. Grid (kv_dim / blockDim.x, n_tok).
template <typename T>
MR_FN void kv_store(const float* qkv, long qkv_stride, int k_col, int v_col, T* kc, T* vc, int kv_dim, int pos0,
                    int ring) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= kv_dim) return;
    const float* row = qkv + (long)blockIdx.y * qkv_stride;
    const long at = (long)((pos0 + (int)blockIdx.y) % ring) * kv_dim + i;
    kv_put(kc + at, row[k_col + i]);
    if (v_col >= 0) kv_put(vc + at, row[v_col + i]);
}

extern "C" __global__ void kv_store_f16(const float* qkv, long qkv_stride, int k_col, int v_col, f16_t* kc,
                                        f16_t* vc, int kv_dim, int pos0, int ring) {
    kv_store(qkv, qkv_stride, k_col, v_col, kc, vc, kv_dim, pos0, ring);
}

extern "C" __global__ void kv_store_f32(const float* qkv, long qkv_stride, int k_col, int v_col, float* kc,
                                        float* vc, int kv_dim, int pos0, int ring) {
    kv_store(qkv, qkv_stride, k_col, v_col, kc, vc, kv_dim, pos0, ring);
}

// One block of AT_WARPS warps per (query head, token): warp w takes positions start + w,
// start + w + AT_WARPS, …, each lane D values of the head (lane, lane + 32, …), with an online
// softmax (running max and sum, the value accumulator rescaled when the max moves); the warps'
// partial results are merged at the end, with the sink (gpt-oss: one logit per head that joins the
// softmax with no value) if there is one. A query at position q sees keys at p <= q with
// q - p < window (window 0: all). `round_q` rounds the query to f16 first (what llama.cpp does
// for batches under 64 rows with an f16 cache). Grid (n_head, n_tok), block AT_WARPS * 32.
#define AT_WARPS 4

template <typename T, int D>
MR_FN void attend(const float* qkv, long qkv_stride, const T* kc, const T* vc, int kv_dim, int ring, float* out,
                  long out_stride, int n_head, int n_head_kv, int head_dim, int v_dim, float scale, int pos0,
                  int window, const float* sinks, int round_q) {
    __shared__ float sm_m[AT_WARPS], sm_l[AT_WARPS];
    __shared__ float sm_acc[AT_WARPS][D * 32];
    const int h = blockIdx.x, t = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kh = (h / (n_head / n_head_kv)) * head_dim;
    const float* q = qkv + (long)t * qkv_stride + (long)h * head_dim;
    float qr[D], acc[D];
    for (int i = 0; i < D; ++i) {
        const int d = lane + 32 * i;
        float v = d < head_dim ? q[d] : 0.0f;
        if (round_q) v = f16_to_f32(f32_to_f16(v));
        qr[i] = v;
        acc[i] = 0.0f;
    }
    const int n_pos = pos0 + t + 1;
    const int start = window > 0 && n_pos > window ? n_pos - window : 0;
    float m = MR_NEG_INF, l = 0.0f;
    for (int p = start + warp; p < n_pos; p += AT_WARPS) {
        const long row = (long)(p % ring) * kv_dim;
        const T* k = kc + row + kh;
        float s = 0.0f;
        for (int i = 0; i < D; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) s += qr[i] * kv_load(k + d);
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float c = expf(m - m_new), e = expf(s - m_new);
        l = l * c + e;
        const T* v = vc + row + kh;
        for (int i = 0; i < D; ++i) {
            const int d = lane + 32 * i;
            acc[i] = acc[i] * c + (d < v_dim ? e * kv_load(v + d) : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
    for (int i = 0; i < D; ++i) sm_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float mx = sinks ? sinks[h] : MR_NEG_INF;
    for (int w = 0; w < AT_WARPS; ++w) mx = fmaxf(mx, sm_m[w]);
    float sum = sinks ? expf(sinks[h] - mx) : 0.0f;
    float f[AT_WARPS];
    for (int w = 0; w < AT_WARPS; ++w) {
        f[w] = expf(sm_m[w] - mx);
        sum += sm_l[w] * f[w];
    }
    float* o = out + (long)t * out_stride + (long)h * v_dim;
    for (int i = 0; i < D; ++i) {
        const int d = lane + 32 * i;
        if (d >= v_dim) continue;
        float a = 0.0f;
        for (int w = 0; w < AT_WARPS; ++w) a += sm_acc[w][d] * f[w];
        o[d] = a / sum;
    }
}

// attn_<kv type>_<values per lane>: heads of up to 32 * D values (64, 128, 256, 640).
#define MR_ATTN(ty, T, D)                                                                             \
    extern "C" __global__ void attn_##ty##_##D(const float* qkv, long qkv_stride, const T* kc, const T* vc, \
                                               int kv_dim, int ring, float* out, long out_stride,       \
                                               int n_head, int n_head_kv, int head_dim, int v_dim,      \
                                               float scale, int pos0, int window, const float* sinks,   \
                                               int round_q) {                                           \
        attend<T, D>(qkv, qkv_stride, kc, vc, kv_dim, ring, out, out_stride, n_head, n_head_kv,       \
                     head_dim, v_dim, scale, pos0, window, sinks, round_q);                           \
    }

MR_ATTN(f16, f16_t, 2)
MR_ATTN(f16, f16_t, 4)
MR_ATTN(f16, f16_t, 8)
MR_ATTN(f16, f16_t, 20)
MR_ATTN(f32, float, 2)
MR_ATTN(f32, float, 4)
MR_ATTN(f32, float, 8)
MR_ATTN(f32, float, 20)
