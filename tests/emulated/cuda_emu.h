// bncupy's CPU execution model of CUDA: enough of the language and runtime for g++ to build
// kernels/*.cu unchanged and run them through the real launch code (tests/emulated).
//
// A launch runs its blocks one at a time, in index order or in a seeded random order. A block's
// threads are user-space fibers on one OS thread; they switch only inside the CUDA primitives
// below (__syncthreads, shuffles, __syncwarp), in a seeded random order, so every interleaving the
// kernels allow at those points can happen. Bugs are made loud: __shared__ storage is filled with
// 0xFF bytes (NaN in every float type) before each block, a shuffle that names a lane that has
// exited or is waiting elsewhere is an error, a barrier nobody can pass is reported as a deadlock,
// and a block that spins past the time limit is reported as hung.
//
// Not modelled: the GPU memory model (blocks never overlap), -ftz, FMA contraction, occupancy,
// registers, concurrent streams.
#pragma once

#include <cmath>
#include <math.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static copy per variable serves every block. The loader finds
// them all in the library's symbol table (function-local statics: device code has no others) and
// registers them with bncupy_emu_add_shared, so each block starts with them poisoned.
#define __shared__ static

// float16 conversions: the kernels use PTX on a GPU; here, software with the same rounding
// (round to nearest even, subnormals kept, NaN -> the canonical 0x7fff).
// Tensor loads and stores (kernels/welford.cuh: ld, st) are counted per buffer: the traffic of
// each launch, read back by tests/emulated after it.
#define BNCUPY_LOAD(p) (::bncupy_emu::counted_load(p))
#define BNCUPY_STORE(p, v) (::bncupy_emu::counted_store((p), (v)))
#define BNCUPY_HALF_TO_FLOAT(f, h) ((f) = ::bncupy_emu::half_to_float(h))
#define BNCUPY_FLOAT_TO_HALF(h, f) ((h) = ::bncupy_emu::float_to_half(f))
#define BNCUPY_BITS_TO_FLOAT(u) (::bncupy_emu::bits_to_float(u))
#define BNCUPY_FLOAT_TO_BITS(f) (::bncupy_emu::float_to_bits(f))
// A kernel's dynamic shared memory: the launch's shared_mem bytes, poisoned before each block
// like __shared__ storage (null when the launch asked for none).
#define BNCUPY_DYNAMIC_SHARED(name) unsigned char* const name = ::bncupy_emu::dynamic_shared()

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" void bncupy_emu_switch(void** save_sp, void* load_sp);
extern "C" void bncupy_emu_fiber_entry();

namespace bncupy_emu {

// The buffers whose traffic a launch counts: [lo, hi) byte ranges, bytes read and written, and
// of those the bytes moved by accesses narrower than 16 bytes.
struct Region {
    const char* lo;
    const char* hi;
    unsigned long long read, written, narrow;
};
inline std::vector<Region> regions;

inline void count(const void* p, std::size_t bytes, bool write) {
    const char* c = static_cast<const char*>(p);
    for (Region& r : regions)
        if (c >= r.lo && c < r.hi) {
            (write ? r.written : r.read) += bytes;
            if (bytes < 16) r.narrow += bytes;
            return;
        }
}
template <typename P> inline P counted_load(const P* p) {
    count(p, sizeof(P), false);
    return *p;
}
template <typename P> inline void counted_store(P* p, const P& v) {
    count(p, sizeof(P), true);
    *p = v;
}

inline float bits_to_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned int float_to_bits(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float half_to_float(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned exp = (h >> 10) & 0x1fu;
    unsigned mant = h & 0x3ffu;
    unsigned bits;
    if (exp == 0 && mant == 0) {
        bits = sign;
    } else if (exp == 0) {  // subnormal: normalise
        int shifts = 0;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            ++shifts;
        }
        bits = sign | ((unsigned)(113 - shifts) << 23) | ((mant & 0x3ffu) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline unsigned short float_to_half(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    const unsigned sign = (x >> 16) & 0x8000u;
    const unsigned a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                       // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 rounds to inf
    unsigned h, rem, half;
    if (a >= 0x38800000u) {  // normal half
        h = ((((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13));
        rem = a & 0x1fffu;
        half = 0x1000u;
    } else {
        if (a <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25: ties to even give 0
        const unsigned mant = (a & 0x7fffffu) | 0x800000u;
        const unsigned shift = 126u - (a >> 23);
        h = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    }
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
}

// ---------------------------------------------------------------------------------------------
// Fibers and the per-block scheduler.

enum class State { runnable, barrier, shuffle, exited };

struct Fiber {
    void* sp = nullptr;
    State state = State::exited;
};

struct Exchange {  // one warp's shuffle or __syncwarp in progress
    unsigned mask = 0, arrived = 0;
    int size = -1;
    unsigned long long value[32];
    int source[32];
    unsigned long long result[32];
};

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct Runtime {
    char* stacks = nullptr;  // kMaxThreads stacks, each above a PROT_NONE guard page
    std::vector<Fiber> fibers;
    std::vector<int> runnable;
    std::vector<Exchange> warps;
    void* scheduler_sp = nullptr;
    int current = -1;
    int threads = 0, live = 0, at_barrier = 0;
    bool failed = false;
    std::string error;
    std::mt19937_64 rng;
    void (*invoke)(void*, void**) = nullptr;
    void* fn = nullptr;
    void** args = nullptr;
    std::chrono::steady_clock::time_point deadline;
    unsigned long long ticks = 0;
};

inline Runtime& rt() {
    static Runtime r;
    return r;
}

inline std::string where() {
    char buf[160];
    std::snprintf(buf, sizeof buf, "block (%u, %u, %u) thread (%u, %u, %u)", blockIdx.x,
                  blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    return buf;
}

// Leave the current fiber for the scheduler (the fiber resumes when it is made runnable again).
inline void yield() {
    Runtime& r = rt();
    bncupy_emu_switch(&r.fibers[r.current].sp, r.scheduler_sp);
}

// Abort the launch with `message`; the failing fiber never resumes.
[[noreturn]] inline void fail(const std::string& message) {
    Runtime& r = rt();
    if (!r.failed) {
        r.failed = true;
        r.error = message + " (at " + where() + ")";
    }
    r.fibers[r.current].state = State::exited;
    yield();
    std::abort();  // unreachable: the scheduler never resumes a failed fiber
}

// A spinning block never reaches a barrier; time is checked in the primitives a spin loop calls.
inline void tick() {
    Runtime& r = rt();
    if ((++r.ticks & 1023u) == 0 && std::chrono::steady_clock::now() > r.deadline)
        fail("block hung: the time limit passed (a spin-wait on another block deadlocks when "
             "blocks run one at a time, as they may on a GPU)");
}

inline int lane_id() { return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31; }
inline int linear_tid() {
    return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

// Lanes of warp `w` that exist and have not exited.
inline unsigned live_lanes(int w) {
    Runtime& r = rt();
    unsigned m = 0;
    for (int l = 0; l < 32; ++l) {
        const int t = w * 32 + l;
        if (t < r.threads && r.fibers[t].state != State::exited) m |= 1u << l;
    }
    return m;
}

// Deposit `bytes` of this lane's value and the lane it reads (-1: its own) into the warp's
// exchange; returns the value of the source lane once every lane named in `mask` has arrived.
inline unsigned long long exchange(unsigned mask, unsigned long long value, int size, int source,
                                   const char* what) {
    Runtime& r = rt();
    const int tid = linear_tid(), lane = tid & 31, w = tid >> 5;
    char msg[200];
    if (!((mask >> lane) & 1u)) {
        std::snprintf(msg, sizeof msg, "%s: lane %d calls it with mask 0x%08x, which does not name it", what, lane, mask);
        fail(msg);
    }
    Exchange& e = r.warps[w];
    if (e.arrived == 0) {
        e.mask = mask;
        e.size = size;
    } else if (e.mask != mask || e.size != size) {
        std::snprintf(msg, sizeof msg, "%s: lanes of warp %d disagree (mask 0x%08x, %d bytes vs mask 0x%08x, %d bytes): divergent shuffles", what, w, mask, size, e.mask, e.size);
        fail(msg);
    }
    e.value[lane] = value;
    e.source[lane] = source;
    e.arrived |= 1u << lane;
    const unsigned gone = mask & ~live_lanes(w);
    if (gone) {
        std::snprintf(msg, sizeof msg, "%s: mask 0x%08x names lanes 0x%08x of warp %d that have exited or do not exist", what, mask, gone, w);
        fail(msg);
    }
    if (e.arrived == mask) {
        for (int l = 0; l < 32; ++l) {
            if (!((mask >> l) & 1u)) continue;
            const int s = e.source[l] < 0 ? l : e.source[l];
            if (!((mask >> s) & 1u)) {
                std::snprintf(msg, sizeof msg, "%s: lane %d reads lane %d, which is not in the mask 0x%08x", what, l, s, mask);
                fail(msg);
            }
            e.result[l] = e.value[s];
            const int t = w * 32 + l;
            if (t != tid && r.fibers[t].state == State::shuffle) {
                r.fibers[t].state = State::runnable;
                r.runnable.push_back(t);
            }
        }
        e.arrived = 0;
        r.runnable.push_back(tid);  // give the others a chance to run first
    } else {
        r.fibers[tid].state = State::shuffle;
    }
    yield();
    return e.result[lane];
}

template <typename T> inline T shuffle(unsigned mask, T var, int source, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = exchange(mask, bits, (int)sizeof(T), source, what);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline int segment(int lane, int width) { return lane / width * width; }

}  // namespace bncupy_emu

template <typename T> inline T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
    const int lane = bncupy_emu::lane_id();
    return bncupy_emu::shuffle(mask, var, bncupy_emu::segment(lane, width) + ((src % width + width) % width), "__shfl_sync");
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const int lane = bncupy_emu::lane_id();
    const int s = (lane % width) + (int)delta < width ? lane + (int)delta : -1;
    return bncupy_emu::shuffle(mask, var, s, "__shfl_down_sync");
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const int lane = bncupy_emu::lane_id();
    const int s = (lane % width) >= (int)delta ? lane - (int)delta : -1;
    return bncupy_emu::shuffle(mask, var, s, "__shfl_up_sync");
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    const int lane = bncupy_emu::lane_id();
    const int s = lane ^ lane_mask;
    return bncupy_emu::shuffle(mask, var, s < bncupy_emu::segment(lane, width) + width ? s : -1, "__shfl_xor_sync");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { bncupy_emu::exchange(mask, 0, 0, -1, "__syncwarp"); }

inline void __syncthreads() {
    bncupy_emu::Runtime& r = bncupy_emu::rt();
    r.fibers[r.current].state = bncupy_emu::State::barrier;
    ++r.at_barrier;
    bncupy_emu::yield();
}

inline int __ffs(int x) { return __builtin_ffs(x); }
namespace bncupy_emu {
inline unsigned long long rsqrts = 0;  // 1/sqrt evaluations of the current launch
}
inline float rsqrtf(float x) {
    ++bncupy_emu::rsqrts;
    return 1.0f / std::sqrt(x);
}
inline double rsqrt(double x) {
    ++bncupy_emu::rsqrts;
    return 1.0 / std::sqrt(x);
}
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline void __threadfence() { bncupy_emu::tick(); }
template <typename T> inline T __ldcg(const T* p) {
    bncupy_emu::tick();
    return *p;
}
template <typename T> inline T atomicAdd(T* p, T v) {
    bncupy_emu::tick();
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T> inline T atomicExch(T* p, T v) {
    bncupy_emu::tick();
    const T old = *p;
    *p = v;
    return old;
}
template <typename T> inline T atomicCAS(T* p, T expected, T v) {
    bncupy_emu::tick();
    const T old = *p;
    if (old == expected) *p = v;
    return old;
}

namespace bncupy_emu {

// ---------------------------------------------------------------------------------------------
// Launch: kernel entries with their parameter signatures, and the grid loop.

template <typename T> struct scalar_name;
template <> struct scalar_name<float> { static constexpr const char* value = "f32"; };
template <> struct scalar_name<double> { static constexpr const char* value = "f64"; };
template <> struct scalar_name<int> { static constexpr const char* value = "i32"; };
template <> struct scalar_name<unsigned int> { static constexpr const char* value = "u32"; };
template <> struct scalar_name<long long> { static constexpr const char* value = "i64"; };
template <> struct scalar_name<unsigned long long> { static constexpr const char* value = "u64"; };

// "f32" for a float parameter; "p:f32:12" for a pointer to 12-byte elements made of floats.
template <typename P> inline std::string param_kind() {
    if constexpr (std::is_pointer_v<P>) {
        typedef std::remove_cv_t<std::remove_pointer_t<P>> E;
        return std::string("p:") + scalar_name<E>::value + ":" + std::to_string(sizeof(E));
    } else {
        return scalar_name<std::remove_cv_t<P>>::value;
    }
}

template <typename... P, std::size_t... I>
inline void call_with(void (*f)(P...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
template <typename... P> inline void call(void* fn, void** args) {
    call_with(reinterpret_cast<void (*)(P...)>(fn), args, std::index_sequence_for<P...>{});
}

struct Entry {
    const char* name;
    void* fn;
    void (*invoke)(void*, void**);
    std::string signature;
};

template <typename... P> inline Entry entry(const char* name, void (*f)(P...)) {
    std::string sig;
    ((sig += (sig.empty() ? "" : ","), sig += param_kind<P>()), ...);
    return Entry{name, reinterpret_cast<void*>(f), &call<P...>, sig};
}

inline void allocate_stacks(Runtime& r) {
    if (r.stacks) return;
    const std::size_t total = kStackBytes * kMaxThreads;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("bncupy_emu: mmap");
        std::abort();
    }
    r.stacks = static_cast<char*>(p);
    for (int t = 0; t < kMaxThreads; ++t) mprotect(r.stacks + t * kStackBytes, 4096, PROT_NONE);
}

// A fresh stack for thread t whose first switch-in "returns" into bncupy_emu_fiber_entry.
inline void* initial_sp(Runtime& r, int t) {
    auto* top = reinterpret_cast<unsigned long long*>(r.stacks + (t + 1) * kStackBytes);
#if defined(__x86_64__)
    unsigned int csr[2] = {0, 0};
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    *--top = 0;  // the entry's return address: it never returns
    *--top = reinterpret_cast<unsigned long long>(&bncupy_emu_fiber_entry);
    for (int i = 0; i < 6; ++i) *--top = 0;  // rbp rbx r12 r13 r14 r15
    --top;
    std::memcpy(top, csr, 8);
#elif defined(__aarch64__)
    top -= 22;  // x19-x30, d8-d15 (see the switch below); x30 (lr) = entry
    std::memset(top, 0, 22 * 8);
    top[11] = reinterpret_cast<unsigned long long>(&bncupy_emu_fiber_entry);
#else
#error "tests/emulated/cuda_emu.h: fiber switch implemented for x86-64 and aarch64 only"
#endif
    return top;
}

inline std::vector<std::pair<char*, std::size_t>> shared_regions;
inline std::vector<unsigned char> dynamic_bytes;  // the launch's dynamic shared memory + 16
inline unsigned char* dynamic_base = nullptr;
inline std::size_t dynamic_size = 0;
inline unsigned char* dynamic_shared() { return dynamic_base; }
inline std::mutex launch_mutex;  // one launch at a time: __shared__ storage is static

inline void run_block(Runtime& r, const dim3& block) {
    for (const auto& region : shared_regions) std::memset(region.first, 0xff, region.second);
    if (dynamic_base) std::memset(dynamic_base, 0xff, dynamic_size);
    r.threads = (int)(block.x * block.y * block.z);
    r.live = r.threads;
    r.at_barrier = 0;
    r.fibers.assign(r.threads, Fiber{});
    r.warps.assign((r.threads + 31) / 32, Exchange{});
    r.runnable.clear();
    for (int t = 0; t < r.threads; ++t) {
        r.fibers[t].sp = initial_sp(r, t);
        r.fibers[t].state = State::runnable;
        r.runnable.push_back(t);
    }
    while (!r.failed) {
        if (r.runnable.empty()) {
            if (r.live == 0) return;
            if (r.at_barrier == r.live) {
                for (int t = 0; t < r.threads; ++t)
                    if (r.fibers[t].state == State::barrier) {
                        r.fibers[t].state = State::runnable;
                        r.runnable.push_back(t);
                    }
                r.at_barrier = 0;
                continue;
            }
            std::string who;
            for (int t = 0; t < r.threads; ++t) {
                const State s = r.fibers[t].state;
                if (s == State::shuffle || s == State::barrier) {
                    if (who.size() < 300) who += " " + std::to_string(t) + (s == State::shuffle ? ":shuffle" : ":barrier");
                }
            }
            r.failed = true;
            char head[120];
            std::snprintf(head, sizeof head, "deadlock in block (%u, %u, %u): %d of %d live threads wait at __syncthreads, the rest in warp collectives;", blockIdx.x, blockIdx.y, blockIdx.z, r.at_barrier, r.live);
            r.error = std::string(head) + who;
            return;
        }
        const std::size_t pick = r.rng() % r.runnable.size();
        const int t = r.runnable[pick];
        r.runnable[pick] = r.runnable.back();
        r.runnable.pop_back();
        r.current = t;
        threadIdx.x = (unsigned)t % block.x;
        threadIdx.y = (unsigned)t / block.x % block.y;
        threadIdx.z = (unsigned)t / (block.x * block.y);
        bncupy_emu_switch(&r.scheduler_sp, r.fibers[t].sp);
    }
}

}  // namespace bncupy_emu

extern "C" void bncupy_emu_fiber_entry() {
    bncupy_emu::Runtime& r = bncupy_emu::rt();
    r.invoke(r.fn, r.args);
    const int t = r.current;
    r.fibers[t].state = bncupy_emu::State::exited;
    --r.live;
    const int w = t >> 5;
    bncupy_emu::Exchange& e = r.warps[w];
    if (e.arrived && ((e.mask >> (t & 31)) & 1u)) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "thread exited while lanes 0x%08x of its warp wait in a warp collective (mask 0x%08x) that names it", e.arrived, e.mask);
        bncupy_emu::fail(msg);
    }
    bncupy_emu::yield();
    std::abort();
}

#if defined(__x86_64__)
asm(R"(
    .text
    .globl bncupy_emu_switch
    .type bncupy_emu_switch, @function
bncupy_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size bncupy_emu_switch, .-bncupy_emu_switch
)");
#elif defined(__aarch64__)
asm(R"(
    .text
    .globl bncupy_emu_switch
    .type bncupy_emu_switch, %function
bncupy_emu_switch:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #176
    ret
    .size bncupy_emu_switch, .-bncupy_emu_switch
)");
#endif

// The launch entry points the Python side calls through ctypes. A translation unit that includes
// this header and the kernels defines `bncupy_emu_table` (see tests/emulated/build.py).
extern const bncupy_emu::Entry bncupy_emu_table[];
extern const int bncupy_emu_table_size;

extern "C" int bncupy_emu_count() { return bncupy_emu_table_size; }
extern "C" void bncupy_emu_add_shared(void* p, unsigned long long size) {
    bncupy_emu::shared_regions.emplace_back(static_cast<char*>(p), (std::size_t)size);
}
extern "C" const char* bncupy_emu_name(int i) { return bncupy_emu_table[i].name; }
extern "C" unsigned long long bncupy_emu_rsqrts() { return bncupy_emu::rsqrts; }
extern "C" const char* bncupy_emu_signature(int i) { return bncupy_emu_table[i].signature.c_str(); }

// Runs kernel `index` over grid x block with `shared_bytes` of dynamic shared memory; order 0:
// blocks in index order, 1: a random permutation drawn from `seed` (which also orders the
// threads' turns). Returns 0, or 1 with `error` set.
// `ranges` holds n_ranges buffers (pairs lo, hi) whose traffic the launch counts into `counts`
// (triples: bytes read, bytes written, bytes of those moved by accesses under 16 bytes).
extern "C" int bncupy_emu_launch(int index, const unsigned* grid, const unsigned* block,
                                 unsigned long long shared_bytes, void** args, int order,
                                 unsigned long long seed,
                                 double seconds, char* error, int error_size,
                                 const unsigned long long* ranges, int n_ranges,
                                 unsigned long long* counts) {
    std::lock_guard<std::mutex> lock(bncupy_emu::launch_mutex);
    bncupy_emu::regions.clear();
    bncupy_emu::rsqrts = 0;
    for (int i = 0; i < n_ranges; ++i)
        bncupy_emu::regions.push_back({reinterpret_cast<const char*>(ranges[2 * i]),
                                       reinterpret_cast<const char*>(ranges[2 * i + 1]), 0, 0, 0});
    struct Report {  // the counts, however the launch ends
        unsigned long long* out;
        ~Report() {
            for (std::size_t i = 0; i < bncupy_emu::regions.size(); ++i) {
                out[3 * i] = bncupy_emu::regions[i].read;
                out[3 * i + 1] = bncupy_emu::regions[i].written;
                out[3 * i + 2] = bncupy_emu::regions[i].narrow;
            }
        }
    } report{counts};
    bncupy_emu::Runtime& r = bncupy_emu::rt();
    bncupy_emu::allocate_stacks(r);
    const bncupy_emu::Entry& e = bncupy_emu_table[index];
    r.invoke = e.invoke;
    r.fn = e.fn;
    r.args = args;
    r.failed = false;
    r.error.clear();
    r.rng.seed(seed);
    r.deadline = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
    // the launch's dynamic shared memory, 16-byte aligned, then canary bytes checked after it
    bncupy_emu::dynamic_size = (std::size_t)shared_bytes;
    bncupy_emu::dynamic_bytes.assign(shared_bytes ? shared_bytes + 16 + 64 : 0, 0xa5);
    unsigned char* const raw = bncupy_emu::dynamic_bytes.data();
    bncupy_emu::dynamic_base =
        shared_bytes ? raw + (16 - reinterpret_cast<std::uintptr_t>(raw) % 16) % 16 : nullptr;
    gridDim.x = grid[0], gridDim.y = grid[1], gridDim.z = grid[2];
    blockDim.x = block[0], blockDim.y = block[1], blockDim.z = block[2];
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    std::vector<unsigned long long> sequence(blocks);
    for (unsigned long long b = 0; b < blocks; ++b) sequence[b] = b;
    if (order == 1) std::shuffle(sequence.begin(), sequence.end(), r.rng);
    for (unsigned long long b : sequence) {
        blockIdx.x = (unsigned)(b % grid[0]);
        blockIdx.y = (unsigned)(b / grid[0] % grid[1]);
        blockIdx.z = (unsigned)(b / ((unsigned long long)grid[0] * grid[1]));
        bncupy_emu::run_block(r, blockDim);
        if (r.failed) break;
    }
    if (!r.failed && bncupy_emu::dynamic_base)
        for (int i = 0; i < 64; ++i)
            if (bncupy_emu::dynamic_base[bncupy_emu::dynamic_size + i] != 0xa5) {
                r.failed = true;
                r.error = "a block wrote past the launch's dynamic shared memory";
                break;
            }
    if (r.failed) {
        std::snprintf(error, (std::size_t)error_size, "%s", r.error.c_str());
        return 1;
    }
    return 0;
}

// The software float16 conversions, exposed so the tests can compare them with NumPy's.
extern "C" void bncupy_emu_half_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = bncupy_emu::half_to_float(in[i]);
}
extern "C" void bncupy_emu_float_to_half(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = bncupy_emu::float_to_half(in[i]);
}
