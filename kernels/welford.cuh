// bncupy: the one Welford state, the one merge, and the reductions built on them.
//
// Every level (thread states, warp shuffle, block, grid partials, ranks on the host) combines
// statistics with merge() below, in a fixed order, so results are bitwise reproducible.
#pragma once

namespace bncupy {

// float16 storage without cuda_fp16.h, so the sources compile with a bare NVRTC.
struct __align__(2) half_t {
    unsigned short bits;
};

// bfloat16 storage: the upper half of a float32, so conversions are integer operations that
// need no header and no sm_80 instruction.
struct __align__(2) bf16_t {
    unsigned short bits;
};
template <typename T> struct is_bf16 { enum { value = 0 }; };
template <> struct is_bf16<bf16_t> { enum { value = 1 }; };

// Accumulator type: float for float16/bfloat16/float32 data, double for float64.
template <typename T> struct acc_of { typedef float type; };
template <> struct acc_of<double> { typedef double type; };

// The PTX conversions; a host build of the kernels (tests/emulated) defines both macros first,
// with a bit-exact software version.
#ifndef BNCUPY_HALF_TO_FLOAT
#define BNCUPY_HALF_TO_FLOAT(f, h) asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h))
#define BNCUPY_FLOAT_TO_HALF(h, f) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f))
#endif

__device__ __forceinline__ float to_acc(half_t v) {
    float f;
    BNCUPY_HALF_TO_FLOAT(f, v.bits);
    return f;
}
#ifndef BNCUPY_BITS_TO_FLOAT
#define BNCUPY_BITS_TO_FLOAT(u) __uint_as_float(u)
#define BNCUPY_FLOAT_TO_BITS(f) __float_as_uint(f)
#endif

__device__ __forceinline__ float to_acc(bf16_t v) {
    return BNCUPY_BITS_TO_FLOAT((unsigned int)v.bits << 16);
}
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename acc_of<T>::type v);
template <> __device__ __forceinline__ half_t from_acc<half_t>(float v) {
    half_t h;
    BNCUPY_FLOAT_TO_HALF(h.bits, v);
    return h;
}
// Round to nearest even; NaN stays NaN (quiet, sign kept).
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) {
    unsigned int u = BNCUPY_FLOAT_TO_BITS(v);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        b.bits = (unsigned short)(u >> 16);
    }
    return b;
}
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// V elements loaded or stored as one 16-byte (or narrower) transaction.
template <typename T, int V> struct __align__(sizeof(T) * V) vec_t {
    T v[V];
};

// Every load and store of a tensor (x, dy, residual, y, dx; not of per-channel vectors or
// partials) goes through ld/st, so that the CPU execution target can count each launch's traffic
// per buffer; on a GPU they are plain accesses.
#ifndef BNCUPY_LOAD
#define BNCUPY_LOAD(p) (*(p))
#define BNCUPY_STORE(p, v) (*(p) = (v))
#endif
// A kernel's dynamic shared memory (the launch's shared_mem bytes), 16-byte aligned; the CPU
// execution target defines it first.
#ifndef BNCUPY_DYNAMIC_SHARED
#define BNCUPY_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
template <typename P> __device__ __forceinline__ P ld(const P* p) { return BNCUPY_LOAD(p); }
template <typename P> __device__ __forceinline__ void st(P* p, const P& v) { BNCUPY_STORE(p, v); }

// 1/sqrt: the hardware's approximation in float (a few ulp), exact in double. Evaluation
// coefficients use it in the apply and in what it stores for a backward pass alike.
__device__ __forceinline__ float rsqrt_of(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_of(double v) { return rsqrt(v); }

// 1 / v correctly rounded (the bits of a division) without the division's slow-path call, whose
// calling convention makes ptxas spill in double.
__device__ __forceinline__ float inv_of(float v) { return __frcp_rn(v); }
__device__ __forceinline__ double inv_of(double v) { return __drcp_rn(v); }

// a / b where a few ulp do not matter (merge weights in the hot loops): fast in float.
__device__ __forceinline__ float ratio(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double ratio(double a, double b) { return a * inv_of(b); }

template <typename A> struct Welford {
    A mean;
    A m2;
    A n;
};

template <typename A> __device__ __forceinline__ Welford<A> welford_empty() {
    Welford<A> w;
    w.mean = A(0);
    w.m2 = A(0);
    w.n = A(0);
    return w;
}

// Chan et al. parallel merge. Empty sides return the other unchanged (no 0 * inf NaNs).
template <typename A> __device__ __forceinline__ Welford<A> merge(Welford<A> a, Welford<A> b) {
    if (b.n == A(0)) return a;
    if (a.n == A(0)) return b;
    Welford<A> r;
    r.n = a.n + b.n;
    const A delta = b.mean - a.mean;
    const A wb = b.n * inv_of(r.n);
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
    return r;
}

// Chan merge of a chunk of nb values (mean mb, sum of squared deviations qb) into a, with the
// fast ratio: the hot loops' merge, one division per chunk instead of one per value.
template <typename A>
__device__ __forceinline__ void merge_chunk(Welford<A>& a, const A nb, const A mb, const A qb) {
    const A n = a.n + nb;
    const A delta = mb - a.mean;
    const A wb = ratio(nb, n);
    a.mean += delta * wb;
    a.m2 += qb + delta * delta * a.n * wb;
    a.n = n;
}

// Per-channel sums for the backward pass: sum(dy) and sum(dy * (x - mean)).
template <typename A> struct SumPair {
    A dy;
    A dy_xmu;
};

template <typename A> __device__ __forceinline__ SumPair<A> merge(SumPair<A> a, SumPair<A> b) {
    SumPair<A> r;
    r.dy = a.dy + b.dy;
    r.dy_xmu = a.dy_xmu + b.dy_xmu;
    return r;
}

template <typename A> __device__ __forceinline__ Welford<A> shfl_down(Welford<A> w, int offset) {
    w.mean = __shfl_down_sync(0xffffffffu, w.mean, offset);
    w.m2 = __shfl_down_sync(0xffffffffu, w.m2, offset);
    w.n = __shfl_down_sync(0xffffffffu, w.n, offset);
    return w;
}

template <typename A> __device__ __forceinline__ SumPair<A> shfl_down(SumPair<A> s, int offset) {
    s.dy = __shfl_down_sync(0xffffffffu, s.dy, offset);
    s.dy_xmu = __shfl_down_sync(0xffffffffu, s.dy_xmu, offset);
    return s;
}

// Tree merge across a full warp; lane 0 ends with the warp's total.
template <typename S> __device__ __forceinline__ S warp_reduce(S s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, shfl_down(s, offset));
    return s;
}

// Merge across the block (blockDim.x a multiple of 32, at most 1024); thread 0 ends with the
// total. `scratch` holds 32 entries; the block may reuse it after this returns.
template <typename S> __device__ __forceinline__ S block_reduce(S s, S* scratch, S identity) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    s = warp_reduce(s);
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    s = (lane < (int)(blockDim.x >> 5)) ? scratch[lane] : identity;
    if (warp == 0) s = warp_reduce(s);
    __syncthreads();
    return s;
}

// Grid-level completion: returns true in exactly one block per channel, the last one to finish
// writing its partial. That block resets the counter so the next launch on the stream finds 0.
__device__ __forceinline__ bool last_block_done(unsigned int* counter, unsigned int blocks) {
    __shared__ bool is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned int done = atomicAdd(counter, 1u);
        is_last = (done == blocks - 1);
        if (is_last) *counter = 0u;
    }
    __syncthreads();
    if (is_last) __threadfence();
    return is_last;
}

// Read another block's partial from L2, bypassing this SM's (non-coherent) L1.
template <typename A> __device__ __forceinline__ Welford<A> load_cg(const Welford<A>* p) {
    Welford<A> w;
    w.mean = __ldcg(&p->mean);
    w.m2 = __ldcg(&p->m2);
    w.n = __ldcg(&p->n);
    return w;
}

template <typename A> __device__ __forceinline__ SumPair<A> load_cg(const SumPair<A>* p) {
    SumPair<A> s;
    s.dy = __ldcg(&p->dy);
    s.dy_xmu = __ldcg(&p->dy_xmu);
    return s;
}

}  // namespace bncupy
