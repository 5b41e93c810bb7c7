// Put before every kernel file (then dequant.cuh) when it is compiled (NVRTC, at first use): the qualifiers, the
// half conversions and the reductions the kernels share. No #include: NVRTC runs where no CUDA
// headers are installed, so halves are converted with PTX instructions. Outside a CUDA compiler
// (the host check of `dequant.cuh`, tests/kernels_host.rs; the emulated device of tests/emu,
// which defines MR_EMULATE) the same functions are plain C++.

typedef unsigned short f16_t;
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define MR_FN __device__ __forceinline__

MR_FN float f16_to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

MR_FN f16_t f32_to_f16(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

MR_FN float bits_to_f32(u32 u) { return __uint_as_float(u); }
MR_FN u32 f32_bits(float f) { return __float_as_uint(f); }


#else
#include <cstring>
#define MR_FN static inline

MR_FN float bits_to_f32(u32 u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

MR_FN u32 f32_bits(float f) {
    u32 u;
    std::memcpy(&u, &f, 4);
    return u;
}

// IEEE half to float, exactly (subnormals, infinities and NaNs included).
MR_FN float f16_to_f32(f16_t h) {
    const u32 sign = (u32)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 0x3ff;
    if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        const float v = (float)man * (1.0f / 16777216.0f);  // man * 2^-24
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

// Float to IEEE half, rounded to nearest even (as cvt.rn.f16.f32), overflow to infinity.
MR_FN f16_t f32_to_f16(float f) {
    u32 u;
    std::memcpy(&u, &f, 4);
    const u32 sign = (u >> 16) & 0x8000;
    const int exp = (int)((u >> 23) & 0xff) - 127 + 15;
    u32 man = u & 0x7fffff;
    if (((u >> 23) & 0xff) == 0xff) return (f16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 31) return (f16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (f16_t)sign;
        man |= 0x800000;
        const int shift = 14 - exp;
        u32 h = man >> shift;
        const u32 rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1))) ++h;
        return (f16_t)(sign | h);
    }
    u32 h = ((u32)exp << 10) | (man >> 13);
    const u32 rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
    return (f16_t)(sign | h);
}
#endif

#if defined(__CUDACC_RTC__) || defined(__CUDACC__) || defined(MR_EMULATE)
// -infinity (no math.h under NVRTC).
#define MR_NEG_INF __int_as_float(0xff800000)

// The sum of `v` over the 32 lanes of a warp, in every lane.
#if defined(MR_EMULATE)
MR_FN float warp_sum(float v) { return emu::warp_sum(v); }
#else
MR_FN float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
#endif

// The sum of `v` over a block of `blockDim.x` threads (a multiple of 32, at most 1024), in every
// thread; `scratch` holds 32 floats of shared memory.
MR_FN float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
#endif
