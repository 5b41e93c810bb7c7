// An emulated CUDA driver (libcuda.so) for tests: the subset of the driver API that cudarc and
// moerun's CUDA backend call, over host memory ("device" pointers are host pointers), every call
// synchronous (streams and events are orderings that already hold), and kernels run by the fiber
// emulation of cuda_emu.h from the host build of kernels/*.cu (each entry registered by name; a
// module's PTX is ignored). MOERUN_EMU_INTEGRATED=1 reports an integrated GPU (shared memory).
//
// MOERUN_EMU_DEFER_COPIES=1 makes asynchronous host-to-device copies out of page-locked memory
// (allocated or registered) as late as CUDA allows: each waits on its stream until something
// must see it (a launch, copy or synchronize on that stream; any event wait or synchronize; a
// free), and aborts naming the address if its source bytes changed meanwhile, which is a caller
// rewriting host bytes a copy has not read yet. Copies out of pageable memory are taken at the
// call, as the real driver stages them.
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_emu.h"
#include "registry.h"

// Switching between fibers: on x86-64 a few instructions (callee-saved registers and the stack
// pointer), elsewhere ucontext (correct, but each switch is a system call).
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");
struct Context {
    void* sp;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

namespace emu {
enum State { Run, AtBlock, AtWarp, Done };

struct Fiber {
    Context ctx;
    unsigned tid;
    State state;
};

Fiber* current;
emu_uint3 block_idx, block_dim, grid_dim;
float warp_buf[32][32];
static Context sched;
static std::vector<Fiber> fibers;
static std::vector<std::vector<char>> stacks;
static const std::function<void()>* body;
static const size_t STACK = 256 << 10;

emu_uint3 thread_idx() { return emu_uint3{current->tid, 0, 0}; }

static void swap(Context* from, Context* to) {
#if defined(__x86_64__)
    emu_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

static void yield(State s) {
    current->state = s;
    swap(&current->ctx, &sched);
}

float warp_sum(float v) {
    // One exchange, then each lane adds the values in the order of the device's butterfly
    // (xor 16, 8, 4, 2, 1), so the sum is the device's to the bit.
    const unsigned t = current->tid, w = t >> 5, l = t & 31;
    warp_buf[w][l] = v;
    sync_warp();
    float a[32], b[32];
    for (int i = 0; i < 32; ++i) a[i] = warp_buf[w][i];
    for (int o = 16; o > 0; o >>= 1) {
        for (int i = 0; i < 32; ++i) b[i] = a[i] + a[i ^ o];
        for (int i = 0; i < 32; ++i) a[i] = b[i];
    }
    sync_warp();
    return a[l];
}

void sync_block() { yield(AtBlock); }
void sync_warp() { yield(AtWarp); }

static void trampoline() {
    (*body)();
    yield(Done);
    std::abort();  // never resumed
}

// Runs one block of `n` threads to the end.
static void run_block(unsigned n, const std::function<void()>& f) {
    body = &f;
    fibers.resize(n);
    if (stacks.size() < n) stacks.resize(n);
    for (unsigned i = 0; i < n; ++i) {
        stacks[i].resize(STACK);
        Fiber& fb = fibers[i];
#if defined(__x86_64__)
        // A frame emu_switch returns from into trampoline, as if called (rsp % 16 == 8 at entry).
        uintptr_t top = ((uintptr_t)stacks[i].data() + STACK) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = nullptr;
        *--sp = (void*)&trampoline;
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        fb.ctx.sp = sp;
#else
        getcontext(&fb.ctx.uc);
        fb.ctx.uc.uc_stack.ss_sp = stacks[i].data();
        fb.ctx.uc.uc_stack.ss_size = STACK;
        fb.ctx.uc.uc_link = nullptr;
        makecontext(&fb.ctx.uc, trampoline, 0);
#endif
        fb.tid = i;
        fb.state = Run;
    }
    for (;;) {
        for (unsigned i = 0; i < n; ++i) {
            if (fibers[i].state != Run) continue;
            current = &fibers[i];
            swap(&sched, &fibers[i].ctx);
        }
        // Release a barrier every live thread (of the block, or of a warp) has reached.
        unsigned live = 0, at_block = 0;
        for (auto& fb : fibers) {
            live += fb.state != Done;
            at_block += fb.state == AtBlock;
        }
        if (live == 0) return;
        bool released = false;
        if (at_block == live) {
            for (auto& fb : fibers)
                if (fb.state == AtBlock) fb.state = Run;
            released = true;
        }
        for (unsigned w = 0; w * 32 < n; ++w) {
            unsigned lanes = 0, waiting = 0;
            for (unsigned i = w * 32; i < n && i < w * 32 + 32; ++i) {
                lanes += fibers[i].state != Done;
                waiting += fibers[i].state == AtWarp;
            }
            if (lanes > 0 && waiting == lanes) {
                for (unsigned i = w * 32; i < n && i < w * 32 + 32; ++i)
                    if (fibers[i].state == AtWarp) fibers[i].state = Run;
                released = true;
            }
        }
        if (!released) {
            std::fprintf(stderr, "cuda emulator: the threads of a block wait at different barriers\n");
            std::abort();
        }
    }
}

void launch(emu_uint3 grid, emu_uint3 block, const std::function<void()>& f) {
    grid_dim = grid;
    block_dim = block;
    const unsigned n = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = emu_uint3{x, y, z};
                run_block(n, f);
            }
}

std::map<std::string, Launcher>& registry() {
    static std::map<std::string, Launcher> r;
    return r;
}
}  // namespace emu

// ---- the driver API ----------------------------------------------------------------------------
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101, NOT_FOUND = 500 };

static std::mutex lock;
static std::map<CUdeviceptr, size_t> allocations;
static size_t in_use = 0;
static const size_t TOTAL = size_t(8) << 30;
static int dummy_ctx, dummy_module, dummy_event;
static int streams[64];
static int next_stream = 0;

// ---- deferred copies (MOERUN_EMU_DEFER_COPIES) -------------------------------------------------
struct PendingCopy {
    void* stream;
    CUdeviceptr dst;
    const void* src;
    size_t n;
    unsigned long long sum;
};
static std::vector<PendingCopy> pending;
static std::map<unsigned long long, size_t> page_locked;  // host address -> length

static bool deferring() {
    static const bool d = std::getenv("MOERUN_EMU_DEFER_COPIES") != nullptr;
    return d;
}

static unsigned long long checksum(const void* p, size_t n) {
    unsigned long long h = 1469598103934665603ull;
    const unsigned char* b = (const unsigned char*)p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static bool is_page_locked(const void* p, size_t n) {
    unsigned long long a = (unsigned long long)p;
    auto it = page_locked.upper_bound(a);
    if (it == page_locked.begin()) return false;
    --it;
    return a >= it->first && a + n <= it->first + it->second;
}

// Carry out the pending copies of `stream` (nullptr: of every stream), in order.
static void flush(void* stream) {
    std::vector<PendingCopy> keep;
    for (const PendingCopy& c : pending) {
        if (stream && c.stream != stream) {
            keep.push_back(c);
            continue;
        }
        if (checksum(c.src, c.n) != c.sum) {
            std::fprintf(stderr, "emulated driver: the host bytes at %p (%zu) changed before their copy ran\n", c.src, c.n);
            std::abort();
        }
        std::memcpy((void*)c.dst, c.src, c.n);
    }
    pending.swap(keep);
}

static CUresult alloc(CUdeviceptr* p, size_t n) {
    std::lock_guard<std::mutex> g(lock);
    if (in_use + n > TOTAL) return OUT_OF_MEMORY;
    void* m = std::aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    if (!m) return OUT_OF_MEMORY;
    *p = (CUdeviceptr)m;
    allocations[*p] = n;
    in_use += n;
    return OK;
}

static CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(lock);
    flush(nullptr);
    auto it = allocations.find(p);
    if (it == allocations.end()) return INVALID_VALUE;
    in_use -= it->second;
    allocations.erase(it);
    std::free((void*)p);
    return OK;
}

extern "C" {
CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 12060; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "moerun emulated device");
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attrib, int) {
    const char* integrated = std::getenv("MOERUN_EMU_INTEGRATED");
    switch (attrib) {
        case 75: *v = 9; break;  // compute capability 9.0
        case 76: *v = 0; break;
        case 18: *v = integrated && integrated[0] == '1'; break;
        default: *v = 0;
    }
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* n, int) { *n = TOTAL; return OK; }
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &dummy_ctx; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &dummy_ctx; return OK; }
CUresult cuCtxPushCurrent_v2(void*) { return OK; }
CUresult cuCtxPopCurrent_v2(void** ctx) { *ctx = &dummy_ctx; return OK; }
CUresult cuCtxSynchronize() {
    flush(nullptr);
    return OK;
}
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0;
    *greatest = -5;
    return OK;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(lock);
    *free_bytes = TOTAL - in_use;
    *total = TOTAL;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return alloc(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) { return alloc(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    *p = std::aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    if (!*p) return OUT_OF_MEMORY;
    page_locked[(unsigned long long)*p] = n;
    return OK;
}
CUresult cuMemAllocHost_v2(void** p, size_t n) { return cuMemHostAlloc(p, n, 0); }
CUresult cuMemFreeHost(void* p) {
    flush(nullptr);
    page_locked.erase((unsigned long long)p);
    std::free(p);
    return OK;
}
CUresult cuMemHostRegister_v2(void* p, size_t n, unsigned) {
    page_locked[(unsigned long long)p] = n;
    return OK;
}
CUresult cuMemHostUnregister(void* p) {
    flush(nullptr);
    page_locked.erase((unsigned long long)p);
    return OK;
}
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned) {
    *d = (CUdeviceptr)p;
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
    flush(nullptr);
    std::memcpy((void*)d, s, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
    flush(nullptr);
    std::memcpy(d, (const void*)s, n);
    return OK;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    flush(nullptr);
    std::memmove((void*)d, (const void*)s, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void* st) {
    flush(st);
    if (deferring() && is_page_locked(s, n)) {
        pending.push_back(PendingCopy{st, d, s, n, checksum(s, n)});
        return OK;
    }
    std::memcpy((void*)d, s, n);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void* st) {
    flush(st);
    std::memcpy(d, (const void*)s, n);
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void* st) {
    flush(st);
    std::memmove((void*)d, (const void*)s, n);
    return OK;
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    flush(nullptr);
    std::memset((void*)d, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* st) {
    flush(st);
    std::memset((void*)d, v, n);
    return OK;
}
CUresult cuStreamCreate(void** s, unsigned) {
    *s = &streams[next_stream++ % 64];
    return OK;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(void* s) {
    flush(s);
    return OK;
}
CUresult cuStreamSynchronize(void* s) {
    flush(s);
    return OK;
}
CUresult cuStreamQuery(void* s) {
    flush(s);
    return OK;
}
CUresult cuStreamWaitEvent(void*, void*, unsigned) {
    flush(nullptr);
    return OK;
}
CUresult cuEventCreate(void** e, unsigned) { *e = &dummy_event; return OK; }
CUresult cuEventRecord(void*, void*) { return OK; }
CUresult cuEventRecordWithFlags(void*, void*, unsigned) { return OK; }
CUresult cuEventSynchronize(void*) {
    flush(nullptr);
    return OK;
}
CUresult cuEventQuery(void*) {
    flush(nullptr);
    return OK;
}
CUresult cuEventDestroy_v2(void*) { return OK; }
CUresult cuEventElapsedTime(float* ms, void*, void*) { *ms = 0.001f; return OK; }
CUresult cuEventElapsedTime_v2(float* ms, void*, void*) { *ms = 0.001f; return OK; }
CUresult cuModuleLoadData(void** m, const void*) { *m = &dummy_module; return OK; }
CUresult cuModuleUnload(void*) { return OK; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = emu::registry().find(name);
    if (it == emu::registry().end()) return NOT_FOUND;
    *f = &it->second;
    return OK;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned, void* st, void** params, void**) {
    std::lock_guard<std::mutex> g(lock);
    flush(st);
    (*(emu::Launcher*)f)(params, emu_uint3{gx, gy, gz}, emu_uint3{bx, by, bz});
    return OK;
}
CUresult cuGetErrorName(CUresult, const char** s) { *s = "CUDA_ERROR_EMULATED"; return OK; }
CUresult cuGetErrorString(CUresult, const char** s) { *s = "an error of the emulated driver"; return OK; }
}
