// A host emulation of the CUDA execution model, enough to run kernels/*.cu on the CPU for tests
// (tests/cuda_emulated.rs): a block's threads are fibers (ucontext) on the calling thread,
// switched at __syncthreads and at each warp shuffle, blocks run one after another; __shared__
// arrays are function statics (one block at a time, so one copy per block). Correct, not fast.
// Nothing here is part of moerun: the product loads NVIDIA's driver.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define MR_EMULATE 1

struct emu_uint3 {
    unsigned x, y, z;
};

namespace emu {
struct Fiber;
extern Fiber* current;
extern emu_uint3 block_idx, block_dim, grid_dim;
// One value per lane of each warp of a block (blocks of up to 1024 threads).
extern float warp_buf[32][32];
emu_uint3 thread_idx();
void sync_block();
void sync_warp();
// The sum over a warp's lanes, in every lane (the device's butterfly order).
float warp_sum(float v);
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __shared__ static

static inline void __syncthreads() { emu::sync_block(); }

static inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned t = threadIdx.x, w = t >> 5, l = t & 31;
    emu::warp_buf[w][l] = v;
    emu::sync_warp();
    const float r = emu::warp_buf[w][l ^ (unsigned)o];
    emu::sync_warp();
    return r;
}

static inline float __int_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
