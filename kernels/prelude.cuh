// Put before every kernel file when it is compiled (NVRTC, at first use): ggml's block layouts
// and the conversions and reductions the kernels share. No #include: NVRTC runs where no CUDA
// headers are installed, so halves are converted with PTX instructions.

typedef unsigned short f16_t;
typedef unsigned char u8;
typedef signed char i8;

// ggml's blocks of 32 weights (byte layouts as in the GGUF file; `d` is an f16 scale).
struct block_q8_0 { f16_t d; i8 qs[32]; };  // 34 bytes: w = d * qs[i]
struct block_q4_0 { f16_t d; u8 qs[16]; };  // 18 bytes: w[j] = d * ((qs[j] & 15) - 8), w[j + 16] = d * ((qs[j] >> 4) - 8)
#define QK 32

__device__ __forceinline__ float f16_to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ f16_t f32_to_f16(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// The sum of `v` over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum of `v` over a block of `blockDim.x` threads (a multiple of 32, at most 1024), in every
// thread; `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
