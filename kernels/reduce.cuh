// bncupy: the reduction skeletons shared by every statistics and gradient-sum kernel, for both
// layouts and for rows. An Op supplies the state (Welford or SumPair), how one element enters it,
// and what the last block of a channel (cell, row) writes from the merged total:
//
//   typedef T (element), A (accumulator), State;   enum { needs_dy, gated };
//   A context(A first_value, I channel)            per-channel constant (pilot or centre)
//   static State empty();
//   void push(State&, A context, A x, A dy, I row) one element; `row` is its row (sample)
//   void finalize(State total, I channel, A context)
//   Gate gate_of(I channel); A gate(Gate, A x, A dy, A z)   only when gated (a fused ReLU's
//                                                   mask on dy; z is the residual, if any)
//
// Grids are one-dimensional, blocks have 256 threads, and every merge happens in a fixed order,
// so results are bitwise reproducible.
#pragma once
#include "welford.cuh"

namespace bncupy {

// Vectors in flight per thread and loop trip: independent chains hide memory latency.
template <int V> struct unroll_of {
    enum { value = V >= 8 ? 2 : 4 };
};

// Ops without a fused activation in their gradient.
struct Ungated {
    enum { gated = 0 };
    struct Gate {};
    template <typename I> __device__ Gate gate_of(const I) const { return Gate(); }
};

// dy as an Op's push sees it: masked by a fused activation when the Op has one.
template <class Op, typename A>
__device__ __forceinline__ A gated_dy(const Op& op, const typename Op::Gate& gate, const A x,
                                      const A dy, const A z) {
    if constexpr (Op::gated)
        return op.gate(gate, x, dy, z);
    else
        return dy;
}

// Channel-first data, a contiguous (rows, C, inner) view; inner_vecs = inner / V. Block b reduces
// the (b % splits)-th slice of channel b / splits. `z` (gated Ops only) may be null.
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_nchw(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy,
                                            const typename Op::T* __restrict__ z, const I rows,
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
    const vec* zv = reinterpret_cast<const vec*>(z);
    const A ctx = op.context(to_acc(x[(size_t)c * inner_vecs * V]), c);
    const typename Op::Gate gate = op.gate_of(c);

    S st[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k) st[u][k] = Op::empty();
    for (I j0 = begin + threadIdx.x; j0 < end; j0 += U * blockDim.x) {
        vec xb[U], gb[U], zb[U];
        I row[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const I j = j0 + u * blockDim.x;
            if (j < end) {
                const I a = j / inner_vecs;
                const I offset = (a * channels + c) * inner_vecs + (j - a * inner_vecs);
                row[u] = a;
                xb[u] = xv[offset];
                if (Op::needs_dy) gb[u] = gv[offset];
                if (Op::gated && z) zb[u] = zv[offset];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j0 + u * blockDim.x < end) {
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A xk = to_acc(xb[u].v[k]);
                    const A g = Op::needs_dy
                                    ? gated_dy(op, gate, xk, to_acc(gb[u].v[k]),
                                               (Op::gated && z) ? to_acc(zb[u].v[k]) : A(0))
                                    : A(0);
                    op.push(st[u][k], ctx, xk, g, row[u]);
                }
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

// Channels-last data: `samples` contiguous (rows, C) views one after another; cvecs = C / V. The
// block is lanes x (256 / lanes): lane tx reads V adjacent channels of a row (coalesced across the
// warp), rows are strided over ty. Block b = (sample * groups + group) * splits + split covers
// channel group `group` (lanes * V channels) of one sample and the split-th slice of its rows.
// Channel c of sample s is cell s * C + c: partials, finalize and context are per cell, counters
// per (sample, group).
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_nhwc(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy,
                                            const typename Op::T* __restrict__ z, const I rows,
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
    const I groups = (cvecs + lanes - 1) / lanes;
    const I chunk = blockIdx.x / splits;  // sample * groups + group
    const I split = blockIdx.x % splits;
    const I sample = chunk / groups;
    const I cv = (chunk - sample * groups) * lanes + tx;
    const bool active = cv < cvecs;
    const I r0 = (I)((unsigned long long)rows * split / splits);
    const I r1 = (I)((unsigned long long)rows * (split + 1) / splits);
    const size_t base = (size_t)sample * rows * cvecs;
    const vec* xv = reinterpret_cast<const vec*>(x) + base;
    const vec* gv = reinterpret_cast<const vec*>(dy) + base;
    const vec* zv = reinterpret_cast<const vec*>(z) + base;
    const I cell0 = sample * cvecs * V + cv * V;

    A ctx[V];
    typename Op::Gate gate[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        ctx[k] = active ? op.context(to_acc(x[(base + cv) * V + k]), cell0 + k) : A(0);
        gate[k] = op.gate_of(active ? cell0 + k : I(0));
    }
    S st[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k) st[u][k] = Op::empty();
    if (active) {
        for (I r = r0 + ty; r < r1; r += U * height) {
            vec xb[U], gb[U], zb[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const I row = r + u * height;
                if (row < r1) {
                    xb[u] = xv[row * cvecs + cv];
                    if (Op::needs_dy) gb[u] = gv[row * cvecs + cv];
                    if (Op::gated && z) zb[u] = zv[row * cvecs + cv];
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const I row = r + u * height;
                if (row < r1) {
#pragma unroll
                    for (int k = 0; k < V; ++k) {
                        const A xk = to_acc(xb[u].v[k]);
                        const A g = Op::needs_dy
                                        ? gated_dy(op, gate[k], xk, to_acc(gb[u].v[k]),
                                                   (Op::gated && z) ? to_acc(zb[u].v[k]) : A(0))
                                        : A(0);
                        op.push(st[u][k], ctx[k], xk, g, row);
                    }
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
        merge_tree(sh, height, lanes, ty);
        if (ty == 0 && active) partials[(size_t)(cell0 + k) * splits + split] = sh[tx];
        __syncthreads();
    }
    if (!last_block_done(&counters[chunk], (unsigned int)splits)) return;

#pragma unroll
    for (int k = 0; k < V; ++k) {
        S s = Op::empty();
        if (active)
            for (int p = ty; p < splits; p += height)
                s = merge(s, load_cg(&partials[(size_t)(cell0 + k) * splits + p]));
        sh[threadIdx.x] = s;
        __syncthreads();
        merge_tree(sh, height, lanes, ty);
        if (ty == 0 && active) op.finalize(sh[tx], cell0 + k, ctx[k]);
        __syncthreads();
    }
}

// Contiguous rows (LayerNorm rows; GroupNorm and InstanceNorm groups of channel-first data),
// several per block: `height` consecutive threads (a power of two) serve one row, so height = 32
// is a warp per row and height = blockDim.x a block per row; row_vecs = row length / V. Returns
// the row's merged total to every thread of the row; `active` is false for threads past the
// last row. An Op whose push takes dy scales it by op.dy_scale(column) (LayerNorm's weight).
template <class Op, int V, typename I>
__device__ __forceinline__ typename Op::State rows_reduce(
    const Op& op, const typename Op::T* __restrict__ x, const typename Op::T* __restrict__ dy,
    const I rows, const I row_vecs, const int height, I& row, bool& active,
    typename Op::A& ctx) {
    typedef typename Op::State S;
    typedef vec_t<typename Op::T, V> vec;
    __shared__ S sh[256];

    const int ty = threadIdx.x & (height - 1);
    const int shift = __ffs(height) - 1;  // height is a power of two; no integer division
    row = (I)blockIdx.x * (blockDim.x >> shift) + (threadIdx.x >> shift);
    active = row < rows;
    const size_t base = active ? (size_t)row * row_vecs : 0;
    const vec* xv = reinterpret_cast<const vec*>(x) + base;
    const vec* gv = reinterpret_cast<const vec*>(dy) + base;
    ctx = active ? op.context(to_acc(x[base * V]), row) : typename Op::A(0);
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
                    op.push(st[k], ctx, to_acc(xb.v[k]),
                            op.dy_scale(j * V + k) * to_acc(gb.v[k]), row);
            } else {
#pragma unroll
                for (int k = 0; k < V; ++k)
                    op.push(st[k], ctx, to_acc(xb.v[k]), typename Op::A(0), row);
            }
        }
    }
    S s = st[0];
#pragma unroll
    for (int k = 1; k < V; ++k) s = merge(s, st[k]);
    sh[threadIdx.x] = s;
    __syncthreads();
    merge_tree(sh, height, 1, ty);
    s = sh[threadIdx.x - ty];
    __syncthreads();  // the block may reuse sh after this returns
    return s;
}

// rows_reduce whose first thread of each row hands the total to op.finalize.
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_rows(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy, const I rows,
                                            const I row_vecs, const int height) {
    I row;
    bool active;
    typename Op::A ctx;
    const typename Op::State s = rows_reduce<Op, V, I>(op, x, dy, rows, row_vecs, height, row,
                                                      active, ctx);
    if ((threadIdx.x & (height - 1)) == 0 && active) op.finalize(s, row, ctx);
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
template <typename A> struct WelfordOps : Ungated {
    typedef Welford<A> State;
    template <typename I> __device__ A context(const A first, const I) const { return first; }
    __device__ static State empty() { return welford_empty<A>(); }
    template <typename I>
    __device__ void push(State& s, const A pilot, const A x, const A, const I) const {
        const A y = x - pilot;
        s.n += A(1);
        const A d = y - s.mean;
        s.mean += d / s.n;
        s.m2 += d * (y - s.mean);
    }
};

// How one element enters per-channel (or per-row) gradient sums: sum(g) and sum(g * (x - m)).
template <typename A> struct SumOps : Ungated {
    typedef SumPair<A> State;
    __device__ static State empty() {
        State s;
        s.dy = s.dy_xmu = A(0);
        return s;
    }
    template <typename I>
    __device__ void push(State& s, const A m, const A x, const A g, const I) const {
        s.dy += g;
        s.dy_xmu += g * (x - m);
    }
};

// Rows of the per-channel (per-group) statistics buffer a forward pass writes, each `channels`
// long, in the accumulator type: the mean split as center + lo (center = the mean rounded to A, lo
// the rounding residual), 1/sqrt(var + eps), the apply coefficients y = (x - center) * scale +
// shift, the unbiased variance (for the running statistics) and the sum of squared deviations.
enum { STAT_CENTER = 0, STAT_INVSTD = 1, STAT_LO = 2, STAT_SCALE = 3, STAT_SHIFT = 4,
       STAT_UNBIASED = 5, STAT_M2 = 6, STAT_ROWS = 7 };

// From a merged Welford state of `count` values around `pilot`: center, lo, variance, invstd.
template <typename A> struct Moments {
    A center, lo, var, invstd;
};
template <typename A>
__device__ __forceinline__ Moments<A> moments_of(const Welford<A> w, const double count,
                                                 const A pilot, const A eps) {
    Moments<A> m;
    m.var = w.m2 / A(count);
    m.invstd = A(1) / sqrt(m.var + eps);
    m.center = pilot + w.mean;
    m.lo = w.mean - (m.center - pilot);  // exact when |pilot| >= |w.mean| (Fast2Sum)
    return m;
}

// The forward's pre-activation value. apply and the gated backward both use it, so the ReLU mask
// in the backward pass recomputes bit for bit what the forward computed.
template <typename A>
__device__ __forceinline__ A pre_activation(const A x, const A center, const A scale,
                                            const A shift, const bool has_residual, const A z) {
    const A v = (x - center) * scale + shift;
    return has_residual ? v + z : v;
}

}  // namespace bncupy
