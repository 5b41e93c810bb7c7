// ggml's quantized blocks as they lie in a GGUF file, and the value at index i (0..QK-1) of one
// block, computed with the same float operations, in the same order, as ggml's dequantize_row_*
// (so the host check in tests/kernels_host.rs compares them with ggml bit for bit). One value at
// a time keeps the kernels generic; a fused or vectorized kernel may unpack a whole block.

struct block_q4_0 { f16_t d; u8 qs[16]; };                              // 18 bytes
struct block_q4_1 { f16_t d, m; u8 qs[16]; };                           // 20
struct block_q5_0 { f16_t d; u8 qh[4]; u8 qs[16]; };                    // 22
struct block_q5_1 { f16_t d, m; u8 qh[4]; u8 qs[16]; };                 // 24
struct block_q8_0 { f16_t d; i8 qs[32]; };                              // 34
struct block_mxfp4 { u8 e; u8 qs[16]; };                                // 17
struct block_q2_K { u8 scales[16]; u8 qs[64]; f16_t d, dmin; };         // 84
struct block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16_t d; }; // 110
struct block_q4_K { f16_t d, dmin; u8 scales[12]; u8 qs[128]; };        // 144
struct block_q5_K { f16_t d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }; // 176
struct block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16_t d; };   // 210

MR_FN u32 qh_u32(const u8* qh) { return (u32)qh[0] | ((u32)qh[1] << 8) | ((u32)qh[2] << 16) | ((u32)qh[3] << 24); }

MR_FN float dq_f32(const float* b, int i) { return b[i]; }
MR_FN float dq_f16(const f16_t* b, int i) { return f16_to_f32(b[i]); }
MR_FN float dq_bf16(const unsigned short* b, int i) { return bits_to_f32((u32)b[i] << 16); }

MR_FN float dq_q4_0(const block_q4_0* b, int i) {
    const int q = i < 16 ? (b->qs[i] & 15) : (b->qs[i - 16] >> 4);
    return (float)(q - 8) * f16_to_f32(b->d);
}

MR_FN float dq_q4_1(const block_q4_1* b, int i) {
    const int q = i < 16 ? (b->qs[i] & 15) : (b->qs[i - 16] >> 4);
    return (float)q * f16_to_f32(b->d) + f16_to_f32(b->m);
}

MR_FN float dq_q5_0(const block_q5_0* b, int i) {
    const u32 qh = qh_u32(b->qh);
    const int j = i & 15;
    const int q = i < 16 ? ((b->qs[j] & 15) | (int)(((qh >> j) << 4) & 0x10)) : ((b->qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10));
    return (float)(q - 16) * f16_to_f32(b->d);
}

MR_FN float dq_q5_1(const block_q5_1* b, int i) {
    const u32 qh = qh_u32(b->qh);
    const int j = i & 15;
    const int q = i < 16 ? ((b->qs[j] & 15) | (int)(((qh >> j) << 4) & 0x10)) : ((b->qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10));
    return (float)q * f16_to_f32(b->d) + f16_to_f32(b->m);
}

MR_FN float dq_q8_0(const block_q8_0* b, int i) { return (float)b->qs[i] * f16_to_f32(b->d); }

// MXFP4: E2M1 values (doubled, as ggml's table) times half the E8M0 scale.
MR_FN float dq_mxfp4(const block_mxfp4* b, int i) {
    const i8 kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    const u32 e = b->e;
    const float d = bits_to_f32(e < 2 ? (0x00200000u << e) : ((e - 1) << 23));
    const int q = i < 16 ? (b->qs[i] & 15) : (b->qs[i - 16] >> 4);
    return (float)kv[q] * d;
}

// K-quants: super-blocks of 256 values.
MR_FN float dq_q2_K(const block_q2_K* b, int i) {
    const int n = i >> 7, r = i & 127;  // half (128 values), index inside it
    const int j = r >> 5, l = r & 31;   // shift step (2 bits each), column inside the 32
    const int is = n * 8 + j * 2 + (l >> 4);
    const u8 sc = b->scales[is];
    const float dl = f16_to_f32(b->d) * (float)(sc & 15), ml = f16_to_f32(b->dmin) * (float)(sc >> 4);
    return dl * (float)((b->qs[n * 32 + l] >> (2 * j)) & 3) - ml;
}

MR_FN float dq_q3_K(const block_q3_K* b, int i) {
    // The 16 6-bit scales, unpacked as ggml does from 12 bytes.
    u32 aux[4];
    const u8* s = b->scales;
    aux[0] = qh_u32(s), aux[1] = qh_u32(s + 4), aux[2] = qh_u32(s + 8);
    const u32 k1 = 0x03030303u, k2 = 0x0f0f0f0fu, tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
    aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
    aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4);
    aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
    const int n = i >> 7, r = i & 127, j = r >> 5, l = r & 31;
    const int is = n * 8 + j * 2 + (l >> 4);
    const i8 scale = (i8)((aux[is >> 2] >> (8 * (is & 3))) & 0xff);
    const float dl = f16_to_f32(b->d) * (float)(scale - 32);
    const u8 m = (u8)(1u << (n * 4 + j));
    const int q = (int)((b->qs[n * 32 + l] >> (2 * j)) & 3) - ((b->hmask[l] & m) ? 0 : 4);
    return dl * (float)q;
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block.
MR_FN void scale_min_k4(int j, const u8* q, u8* d, u8* m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

MR_FN float dq_q4_K(const block_q4_K* b, int i) {
    const int g = i >> 6, r = i & 63;  // 64 values share 32 bytes: low nibbles, then high
    const int sub = 2 * g + (r >> 5);
    u8 sc, m;
    scale_min_k4(sub, b->scales, &sc, &m);
    const float d = f16_to_f32(b->d) * (float)sc, mn = f16_to_f32(b->dmin) * (float)m;
    const u8 byte = b->qs[32 * g + (r & 31)];
    return d * (float)(r < 32 ? (byte & 0xF) : (byte >> 4)) - mn;
}

MR_FN float dq_q5_K(const block_q5_K* b, int i) {
    const int g = i >> 6, r = i & 63, l = r & 31;
    const int sub = 2 * g + (r >> 5);
    u8 sc, m;
    scale_min_k4(sub, b->scales, &sc, &m);
    const float d = f16_to_f32(b->d) * (float)sc, mn = f16_to_f32(b->dmin) * (float)m;
    const u8 byte = b->qs[32 * g + l];
    const int hi = (b->qh[l] >> sub) & 1;
    return d * (float)((r < 32 ? (byte & 0xF) : (byte >> 4)) + (hi ? 16 : 0)) - mn;
}

MR_FN float dq_q6_K(const block_q6_K* b, int i) {
    const int n = i >> 7, r = i & 127, quarter = r >> 5, l = r & 31;
    const u8* ql = b->ql + 64 * n;
    const u8* qh = b->qh + 32 * n;
    const i8* sc = b->scales + 8 * n;
    const int lo = quarter & 1 ? ql[l + 32] : ql[l];
    const int q = ((quarter < 2 ? (lo & 0xF) : (lo >> 4)) | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
    const int is = l / 16 + 2 * quarter;
    return f16_to_f32(b->d) * (float)sc[is] * (float)q;
}

// Every type as (name, block struct, values per block), for the generic kernels below them.
#define MR_FOR_EACH_TYPE(X)                    \
    X(f32, float, 1)                           \
    X(f16, f16_t, 1)                           \
    X(bf16, unsigned short, 1)                 \
    X(q4_0, block_q4_0, 32)                    \
    X(q4_1, block_q4_1, 32)                    \
    X(q5_0, block_q5_0, 32)                    \
    X(q5_1, block_q5_1, 32)                    \
    X(q8_0, block_q8_0, 32)                    \
    X(mxfp4, block_mxfp4, 32)                  \
    X(q2_K, block_q2_K, 256)                   \
    X(q3_K, block_q3_K, 256)                   \
    X(q4_K, block_q4_K, 256)                   \
    X(q5_K, block_q5_K, 256)                   \
    X(q6_K, block_q6_K, 256)
