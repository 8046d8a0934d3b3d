// bncupy: the per-channel reduction skeletons shared by the forward statistics and the backward
// sums, for both layouts. An Op supplies the state (Welford or SumPair), how one element enters it,
// and what the channel's last block writes from the merged total:
//
//   typedef T (element), A (accumulator), State;   enum { needs_dy };
//   A context(A first_value, I channel)            per-channel constant (pilot or centre)
//   static State empty();
//   static void push(State&, A context, A x, A dy)
//   void finalize(State total, I channel, A context)
//
// Grids are one-dimensional (block = group * splits + split), blocks have 256 threads, and every
// merge happens in a fixed order, so results are bitwise reproducible.
#pragma once
#include "welford.cuh"

namespace bncupy {

// Vectors in flight per thread and loop trip: independent chains hide memory latency.
template <int V> struct unroll_of {
    enum { value = V >= 8 ? 2 : 4 };
};

// Channel-first data, a contiguous (rows, C, inner) view; inner_vecs = inner / V. Block b reduces
// the (b % splits)-th slice of channel b / splits.
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_nchw(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy, const I rows,
                                            const I channels, const I inner_vecs, const int splits,
                                            typename Op::State* __restrict__ partials,
                                            unsigned int* __restrict__ counters) {
    typedef typename Op::T T;
    typedef typename Op::A A;
    typedef typename Op::State S;
    typedef vec_t<T, V> vec;
    const int U = unroll_of<V>::value;
    __shared__ S scratch[32];

    const I c = blockIdx.x / splits;
    const I split = blockIdx.x % splits;
    const unsigned long long per_channel = (unsigned long long)rows * inner_vecs;
    const I begin = (I)(per_channel * split / splits);
    const I end = (I)(per_channel * (split + 1) / splits);
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* gv = reinterpret_cast<const vec*>(dy);
    const A ctx = op.context(to_acc(x[(size_t)c * inner_vecs * V]), c);

    S st[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k) st[u][k] = Op::empty();
    for (I j0 = begin + threadIdx.x; j0 < end; j0 += U * blockDim.x) {
        vec xb[U], gb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const I j = j0 + u * blockDim.x;
            if (j < end) {
                const I a = j / inner_vecs;
                const I offset = (a * channels + c) * inner_vecs + (j - a * inner_vecs);
                xb[u] = xv[offset];
                if (Op::needs_dy) gb[u] = gv[offset];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j0 + u * blockDim.x < end) {
#pragma unroll
                for (int k = 0; k < V; ++k)
                    Op::push(st[u][k], ctx, to_acc(xb[u].v[k]),
                             Op::needs_dy ? to_acc(gb[u].v[k]) : A(0));
            }
        }
    }
    S s = Op::empty();
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k) s = merge(s, st[u][k]);
    s = block_reduce(s, scratch, Op::empty());
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
    if (!last_block_done(&counters[c], (unsigned int)splits)) return;

    s = Op::empty();
    for (int p = threadIdx.x; p < splits; p += blockDim.x)
        s = merge(s, load_cg(&partials[(size_t)c * splits + p]));
    s = block_reduce(s, scratch, Op::empty());
    if (threadIdx.x == 0) op.finalize(s, c, ctx);
}

// Tree merge, in a fixed order, of the `height` (a power of two) entries sh[threadIdx.x + i * step]
// whose thread has index ty = i among them, into the one of ty = 0.
template <typename S>
__device__ __forceinline__ void merge_tree(S* sh, const int height, const int step, const int ty) {
    for (int stride = height / 2; stride > 0; stride >>= 1) {
        if (ty < stride) sh[threadIdx.x] = merge(sh[threadIdx.x], sh[threadIdx.x + stride * step]);
        __syncthreads();
    }
}

// Channels-last data, a contiguous (rows, C) view; cvecs = C / V. The block is lanes x (256 /
// lanes): lane tx reads V adjacent channels of a row (coalesced across the warp), rows are strided
// over ty. Block b covers channel group b / splits (lanes * V channels) and the (b % splits)-th
// slice of the rows.
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_nhwc(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy, const I rows,
                                            const I cvecs, const int splits, const int lanes,
                                            typename Op::State* __restrict__ partials,
                                            unsigned int* __restrict__ counters) {
    typedef typename Op::T T;
    typedef typename Op::A A;
    typedef typename Op::State S;
    typedef vec_t<T, V> vec;
    const int U = unroll_of<V>::value;
    __shared__ S sh[256];

    const int tx = threadIdx.x % lanes;
    const int ty = threadIdx.x / lanes;
    const int height = blockDim.x / lanes;
    const I group = blockIdx.x / splits;
    const I split = blockIdx.x % splits;
    const I cv = group * lanes + tx;
    const bool active = cv < cvecs;
    const I r0 = (I)((unsigned long long)rows * split / splits);
    const I r1 = (I)((unsigned long long)rows * (split + 1) / splits);
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* gv = reinterpret_cast<const vec*>(dy);

    A ctx[V];
#pragma unroll
    for (int k = 0; k < V; ++k)
        ctx[k] = active ? op.context(to_acc(x[(size_t)cv * V + k]), cv * V + k) : A(0);
    S st[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k) st[u][k] = Op::empty();
    if (active) {
        for (I r = r0 + ty; r < r1; r += U * height) {
            vec xb[U], gb[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const I row = r + u * height;
                if (row < r1) {
                    xb[u] = xv[row * cvecs + cv];
                    if (Op::needs_dy) gb[u] = gv[row * cvecs + cv];
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (r + u * height < r1) {
#pragma unroll
                    for (int k = 0; k < V; ++k)
                        Op::push(st[u][k], ctx[k], to_acc(xb[u].v[k]),
                                 Op::needs_dy ? to_acc(gb[u].v[k]) : A(0));
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
        S s = st[0][k];
#pragma unroll
        for (int u = 1; u < U; ++u) s = merge(s, st[u][k]);
        sh[threadIdx.x] = s;
        __syncthreads();
        merge_tree(sh, (int)(blockDim.x / lanes), lanes, ty);
        if (ty == 0 && active) partials[(size_t)(cv * V + k) * splits + split] = sh[tx];
        __syncthreads();
    }
    if (!last_block_done(&counters[group], (unsigned int)splits)) return;

#pragma unroll
    for (int k = 0; k < V; ++k) {
        S s = Op::empty();
        if (active)
            for (int p = ty; p < splits; p += height)
                s = merge(s, load_cg(&partials[(size_t)(cv * V + k) * splits + p]));
        sh[threadIdx.x] = s;
        __syncthreads();
        merge_tree(sh, (int)(blockDim.x / lanes), lanes, ty);
        if (ty == 0 && active) op.finalize(sh[tx], cv * V + k, ctx[k]);
        __syncthreads();
    }
}

// Contiguous rows (LayerNorm rows; GroupNorm and InstanceNorm groups of channel-first data), several
// per block: `height` consecutive threads (a power of two) serve one row, so height = 32 is a warp
// per row and height = blockDim.x a block per row; row_vecs = row length / V. An Op whose push
// takes dy scales it by op.dy_scale(column) (LayerNorm's per-column weight).
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_rows(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy, const I rows,
                                            const I row_vecs, const int height) {
    typedef typename Op::A A;
    typedef typename Op::State S;
    typedef vec_t<typename Op::T, V> vec;
    __shared__ S sh[256];

    const int ty = threadIdx.x & (height - 1);
    const int shift = __ffs(height) - 1;  // height is a power of two; no integer division
    const I row = (I)blockIdx.x * (blockDim.x >> shift) + (threadIdx.x >> shift);
    const bool active = row < rows;
    const size_t base = active ? (size_t)row * row_vecs : 0;
    const vec* xv = reinterpret_cast<const vec*>(x) + base;
    const vec* gv = reinterpret_cast<const vec*>(dy) + base;
    const A ctx = active ? op.context(to_acc(x[base * V]), row) : A(0);
    S st[V];
#pragma unroll
    for (int k = 0; k < V; ++k) st[k] = Op::empty();
    if (active) {
        for (I j = ty; j < row_vecs; j += height) {
            const vec xb = xv[j];
            if constexpr (Op::needs_dy) {
                const vec gb = gv[j];
#pragma unroll
                for (int k = 0; k < V; ++k)
                    Op::push(st[k], ctx, to_acc(xb.v[k]), op.dy_scale(j * V + k) * to_acc(gb.v[k]));
            } else {
#pragma unroll
                for (int k = 0; k < V; ++k) Op::push(st[k], ctx, to_acc(xb.v[k]), A(0));
            }
        }
    }
    S s = st[0];
#pragma unroll
    for (int k = 1; k < V; ++k) s = merge(s, st[k]);
    sh[threadIdx.x] = s;
    __syncthreads();
    merge_tree(sh, height, 1, ty);
    if (ty == 0 && active) op.finalize(sh[threadIdx.x], row, ctx);
}

// Group and channel of element k of vector j for the normalizations over channel groups:
// L = 0 rows (group = row, channel = column; inner_vecs = columns / V), 1 channel-first (n, C, S)
// (inner_vecs = S / V), 2 channels-last (n, S, C) (inner_vecs = C / V, sample_vecs = S * C / V);
// a group is `group_channels` consecutive channels of one sample.
template <int L, typename I>
__device__ __forceinline__ void group_of(const I j, const int k, const I channels,
                                         const I inner_vecs, const I sample_vecs,
                                         const I group_channels, const int V, I& g, I& c) {
    if (L == 0) {
        g = j / inner_vecs;
        c = (j % inner_vecs) * V + k;
    } else if (L == 1) {
        const I plane = j / inner_vecs;
        c = plane % channels;
        g = plane / channels * (channels / group_channels) + c / group_channels;
    } else {
        c = (j % inner_vecs) * V + k;
        g = j / sample_vecs * (channels / group_channels) + c / group_channels;
    }
}

// Channel of element k of vector j: channel-first views have one channel per vector
// (inner_vecs = inner / V), channels-last views V consecutive ones (inner_vecs = C / V).
template <bool CL, typename I>
__device__ __forceinline__ I channel_of(const I j, const int k, const I channels,
                                        const I inner_vecs, const int V) {
    return CL ? (j % inner_vecs) * V + k : (j / inner_vecs) % channels;
}

// How one element enters the statistics: Welford on values shifted by a pilot (the group's first
// value), so a large mean costs no precision.
template <typename A> struct WelfordOps {
    typedef Welford<A> State;
    template <typename I> __device__ A context(const A first, const I) const { return first; }
    __device__ static State empty() { return welford_empty<A>(); }
    __device__ static void push(State& s, const A pilot, const A x, const A) {
        const A y = x - pilot;
        s.n += A(1);
        const A d = y - s.mean;
        s.mean += d / s.n;
        s.m2 += d * (y - s.mean);
    }
};

// How one element enters per-channel (or per-row) backward sums: sum(g) and sum(g * (x - m)).
template <typename A> struct SumOps {
    typedef SumPair<A> State;
    __device__ static State empty() {
        State s;
        s.dy = s.dy_xmu = A(0);
        return s;
    }
    __device__ static void push(State& s, const A m, const A x, const A g) {
        s.dy += g;
        s.dy_xmu += g * (x - m);
    }
};

// The forward's pre-activation value. apply and relu_grad both use it, so the ReLU mask in the
// backward pass recomputes bit for bit what the forward computed.
template <typename A>
__device__ __forceinline__ A pre_activation(const A x, const A center, const A scale,
                                            const A shift, const bool has_residual, const A z) {
    const A v = (x - center) * scale + shift;
    return has_residual ? v + z : v;
}

}  // namespace bncupy
