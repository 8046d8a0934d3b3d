// bncupy: the skeletons every kernel is built on. Reductions (per channel, channel-first or
// channels-last, and per row) and one elementwise loop.
//
// A reduction's Op supplies the state (Welford or SumPair), how a chunk of values enters it, and
// what the last block of a channel (cell, row) writes from the merged total:
//
//   typedef T (element), A (accumulator), State;   enum { needs_dy, gated };
//   A context(A first_value, I channel)            per-channel constant (pilot or centre)
//   static State empty();
//   void push(State&, A context, const Values& v)  a chunk of values: v.size of them at most,
//                                                  v.n valid; v.x(i), v.g(i) (dy, masked by a
//                                                  fused activation), v.r(i) (its row)
//   void finalize(State total, I channel, A context)
//   Gate gate_of(I channel); A gate(Gate, A x, A dy, A z)   only when gated (a fused ReLU's
//                                                   mask on dy; z is the residual, if any)
//
// Grids are one-dimensional and every merge happens in a fixed order, so results are bitwise
// reproducible. Loads of whole vectors are 16 bytes wide: a tensor's elements before its first
// 16-byte boundary (`head`) and those after its last whole vector go one at a time.
#pragma once
#include "welford.cuh"

namespace bncupy {

// Blocks of 256 threads a reduction keeps resident per SM (its __launch_bounds__: at most
// 65536 / (256 * blocks) registers a thread): 4 on the 32-bit index path, 2 on the 64-bit one
// (whose indices and addresses take twice the registers). No specialisation spills on sm_75,
// sm_80 or sm_90 (NVRTC -Xptxas -v; tests/test_nvrtc.py checks every one).
template <typename I> struct reduce_blocks {
    enum { value = sizeof(I) == 8 ? 2 : 4 };
};

// Vectors of each tensor of type T in flight per thread and loop trip (independent chains hide
// memory latency): 4, or 2 of 16-bit data; the gradient reductions, which load dy (and the
// residual) too, hold half as many of float64 and of bfloat16 (whose rounding is integer
// arithmetic), so they fit 64 registers: 4 blocks of 256 threads per SM still keep at least
// 2 x 16 bytes per thread, 32 KB per SM, in flight.
template <typename T, int V, int NeedsDy = 0> struct unroll_of {
    enum { value = (V >= 8 ? 2 : 4) / (NeedsDy && (V == 2 || is_bf16<T>::value) ? 2 : 1) };
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

// A chunk of values of one channel, read where the loaded vectors hold them (no copies: every
// register counts): every value of U vectors (All), or value `lane` of each of them (a
// channels-last channel). The first n are valid; z (the residual) only when has_z. An Op with
// `scaled` multiplies dy by op.dy_scale(column), column = col0 + the value's place in a vector.
template <class Op, int U, int V, bool All, typename I> struct Values {
    typedef typename Op::A A;
    typedef vec_t<typename Op::T, V> vec;
    enum { size = All ? U * V : U };
    const Op& op;
    const typename Op::Gate& gate;
    const vec (&xb)[U];
    const vec (&gb)[U];
    const vec (&zb)[U];
    const I (&rows)[U];
    const int n;
    const bool has_z;
    const int lane;
    const I col0;

    __device__ __forceinline__ int u(const int i) const { return All ? i / V : i; }
    __device__ __forceinline__ int k(const int i) const { return All ? i % V : lane; }
    __device__ __forceinline__ A x(const int i) const { return to_acc(xb[u(i)].v[k(i)]); }
    __device__ __forceinline__ A g(const int i) const {
        if constexpr (!Op::needs_dy) {
            return A(0);
        } else {
            const A dy = to_acc(gb[u(i)].v[k(i)]);
            if constexpr (Op::scaled) return op.dy_scale(col0 + k(i)) * dy;
            return gated_dy(op, gate, x(i), dy,
                            (Op::gated && has_z) ? to_acc(zb[u(i)].v[k(i)]) : A(0));
        }
    }
    __device__ __forceinline__ I r(const int i) const { return rows[u(i)]; }
};

// Channel-first data: `rows` planes of `inner` values per channel, a contiguous (rows, C, inner)
// array, the tensors' first 16-byte boundary `head` elements in. Block b reduces the
// (b % splits)-th slice of channel b / splits. Each plane holds `whole` aligned vectors from its
// own first 16-byte boundary on, and `left` values outside them, read one at a time; `z` (gated
// Ops only) may be null.
template <class Op, int V, typename I>
__device__ __forceinline__ void reduce_nchw(const Op& op, const typename Op::T* __restrict__ x,
                                            const typename Op::T* __restrict__ dy,
                                            const typename Op::T* __restrict__ z, const I rows,
                                            const I channels, const I inner, const I head,
                                            const int splits,
                                            typename Op::State* __restrict__ partials,
                                            unsigned int* __restrict__ counters) {
    typedef typename Op::T T;
    typedef typename Op::A A;
    typedef typename Op::State S;
    typedef vec_t<T, V> vec;
    const int U = unroll_of<T, V, Op::needs_dy>::value;
    __shared__ S scratch[32];

    const I c = blockIdx.x / splits;
    const int split = blockIdx.x % splits;
    const I whole = inner >= (I)(V - 1) ? (inner - (I)(V - 1)) / (I)V : I(0);
    const I left = inner - whole * V;
    const A ctx = op.context(to_acc(x[(size_t)c * inner]), c);  // a per-channel pilot: not traffic
    const typename Op::Gate gate = op.gate_of(c);
    S s = Op::empty();

    // Whole vectors: slot j is vector j % whole of plane j / whole.
    const unsigned long long slots = (unsigned long long)rows * whole;
    const I v0 = (I)(slots * split / splits), v1 = (I)(slots * (split + 1) / splits);
    for (I j0 = v0 + threadIdx.x; j0 < v1; j0 += U * blockDim.x) {
        vec xb[U], gb[U], zb[U];
        I row[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const I j = j0 + u * blockDim.x;
            if (j < v1) {
                const I a = j / whole;
                const I plane = (a * channels + c) * inner;
                const I offset = plane + ((head - plane) & (I)(V - 1)) + (j - a * whole) * V;
                row[u] = a;
                xb[u] = ld(reinterpret_cast<const vec*>(x + offset));
                if (Op::needs_dy) gb[u] = ld(reinterpret_cast<const vec*>(dy + offset));
                if (Op::gated && z) zb[u] = ld(reinterpret_cast<const vec*>(z + offset));
            }
        }
        int valid = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) valid += j0 + u * blockDim.x < v1 ? V : 0;
        op.push(s, ctx, Values<Op, U, V, true, I>{op, gate, xb, gb, zb, row, valid, z != 0, 0, 0});
    }
    // The values outside the whole vectors: slot t is value t % left of plane t / left.
    const unsigned long long singles = (unsigned long long)rows * left;
    const I t0 = (I)(singles * split / splits), t1 = (I)(singles * (split + 1) / splits);
    for (I j0 = t0 + threadIdx.x; j0 < t1; j0 += U * blockDim.x) {
        vec_t<T, 1> xs[U], gs[U], zs[U];
        I row[U];
        int valid = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const I t = j0 + u * blockDim.x;
            if (t < t1) {
                const I a = t / left, p = t - a * left;
                const I plane = (a * channels + c) * inner;
                const I lead = (head - plane) & (I)(V - 1);  // the plane's values before its vectors
                const I offset = plane + (p < lead ? p : p + whole * V);
                row[u] = a;
                xs[u].v[0] = ld(x + offset);
                if (Op::needs_dy) gs[u].v[0] = ld(dy + offset);
                if (Op::gated && z) zs[u].v[0] = ld(z + offset);
                ++valid;
            }
        }
        op.push(s, ctx, Values<Op, U, 1, true, I>{op, gate, xs, gs, zs, row, valid, z != 0, 0, 0});
    }
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

// Splits merged per cluster by the cluster's last block, then clusters by the last cluster's: no
// thread walks more than CLUSTER / height partials one after another.
enum { CLUSTER = 32 };

// The block-wide merge of `count` partials (stride `step` apart) of each of a block's V cells per
// lane into sh[tx] for ty = 0 (the caller syncs): entries are read by ty, independently.
template <typename S, int V>
__device__ __forceinline__ void merge_partials(S* sh, const S* __restrict__ partials,
                                               const int count, const int stride,
                                               const size_t first_cell, const bool active,
                                               const int tx, const int ty, const int height,
                                               const int lanes, const S identity, S (&out)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
        S s = identity;
        if (active)
            for (int p = ty; p < count; p += height)
                s = merge(s, load_cg(&partials[(first_cell + k) * stride + p]));
        sh[threadIdx.x] = s;
        __syncthreads();
        merge_tree(sh, height, lanes, ty);
        out[k] = sh[tx];
        __syncthreads();
    }
}

// Channels-last data: `samples` contiguous (rows, C) views one after another; cvecs = C / V. The
// block is lanes x (256 / lanes): lane tx reads V adjacent channels of a row (coalesced across the
// warp), rows are strided over ty. Block b = (sample * groups + group) * splits + split covers
// channel group `group` (lanes * V channels) of one sample and the split-th slice of its rows.
// Channel c of sample s is cell s * C + c: partials, finalize and context are per cell. Partials
// are merged by the last block of each cluster of CLUSTER splits, then by the last cluster's
// (partials holds cells * splits level-one and cells * clusters level-two entries; counters
// chunks * (clusters + 1)).
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
    // rows in flight per thread: V states per thread already hold registers (16-bit gradient
    // sums, with dy's vectors too: one row)
    const int U = V >= 8 && Op::needs_dy ? 1 : 2;
    __shared__ S sh[256];

    const int tx = threadIdx.x % lanes;
    const int ty = threadIdx.x / lanes;
    const int height = blockDim.x / lanes;
    const I groups = (cvecs + lanes - 1) / lanes;
    const I chunk = blockIdx.x / splits;  // sample * groups + group
    const int split = blockIdx.x % splits;
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

    // A channel's context (its pilot or centre) is read again where it is needed, from the
    // cache, rather than held: registers.
    const T* pilots = x + (base + cv) * V;  // the sample's first row
    S st[V];
#pragma unroll
    for (int k = 0; k < V; ++k) st[k] = Op::empty();
    if (active) {
        for (I r = r0 + ty; r < r1; r += U * height) {
            vec xb[U], gb[U], zb[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const I row = r + u * height;
                if (row < r1) {
                    xb[u] = ld(xv + row * cvecs + cv);
                    if (Op::needs_dy) gb[u] = ld(gv + row * cvecs + cv);
                    if (Op::gated && z) zb[u] = ld(zv + row * cvecs + cv);
                }
            }
            I row[U];
            int valid = 0;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                row[u] = r + u * height;
                valid += row[u] < r1 ? 1 : 0;
            }
#pragma unroll
            for (int k = 0; k < V; ++k) {
                // the gate's coefficients from memory (cached), not held: registers
                const typename Op::Gate gate = op.gate_of(cell0 + k);
                op.push(st[k], op.context(to_acc(pilots[k]), cell0 + k),
                        Values<Op, U, V, false, I>{op, gate, xb, gb, zb, row, valid, z != 0, k,
                                                   0});
            }
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
        sh[threadIdx.x] = st[k];
        __syncthreads();
        merge_tree(sh, height, lanes, ty);
        if (ty == 0 && active) partials[(size_t)(cell0 + k) * splits + split] = sh[tx];
        __syncthreads();
    }
    const int clusters = (splits + CLUSTER - 1) / CLUSTER;
    const int cluster = split / CLUSTER;
    const int first = cluster * CLUSTER;
    const int count = splits - first < CLUSTER ? splits - first : CLUSTER;
    unsigned int* level = counters + (size_t)chunk * (clusters + 1);
    if (!last_block_done(&level[cluster], (unsigned int)count)) return;

    S merged[V];
    merge_partials<S, V>(sh, partials + first, count, splits, cell0, active, tx, ty, height,
                         lanes, Op::empty(), merged);
    if (clusters == 1) {
        if (ty == 0 && active)
#pragma unroll
            for (int k = 0; k < V; ++k)
                op.finalize(merged[k], cell0 + k, op.context(to_acc(pilots[k]), cell0 + k));
        return;
    }
    const size_t all_cells = (size_t)(gridDim.x / splits / groups) * cvecs * V;
    S* level_two = partials + all_cells * splits;  // after every cell's level-one entries
    if (ty == 0 && active)
#pragma unroll
        for (int k = 0; k < V; ++k) level_two[(size_t)(cell0 + k) * clusters + cluster] = merged[k];
    if (!last_block_done(&level[clusters], (unsigned int)clusters)) return;
    merge_partials<S, V>(sh, level_two, clusters, clusters, cell0, active, tx, ty, height, lanes,
                         Op::empty(), merged);
    if (ty == 0 && active)
#pragma unroll
        for (int k = 0; k < V; ++k)
            op.finalize(merged[k], cell0 + k, op.context(to_acc(pilots[k]), cell0 + k));
}

// Contiguous rows (LayerNorm rows; GroupNorm and InstanceNorm groups of channel-first data),
// several per block: `height` consecutive threads (a power of two) serve one row, so height = 32
// is a warp per row and height = blockDim.x a block per row; row_vecs = row length / V. Returns
// the row's merged total to every thread of the row; `active` is false for threads past the
// last row. An Op with `scaled` multiplies dy by op.dy_scale(column) (LayerNorm's weight).
template <class Op, int V, typename I>
__device__ __forceinline__ typename Op::State rows_reduce(
    const Op& op, const typename Op::T* __restrict__ x, const typename Op::T* __restrict__ dy,
    const I rows, const I row_vecs, const int height, I& row, bool& active,
    typename Op::A& ctx) {
    typedef typename Op::A A;
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
    ctx = active ? op.context(to_acc(x[base * V]), row) : A(0);
    S s = Op::empty();
    if (active) {
        const typename Op::Gate gate = op.gate_of(row);
        for (I j = ty; j < row_vecs; j += height) {
            vec xb[1] = {ld(xv + j)}, gb[1];
            if (Op::needs_dy) gb[0] = ld(gv + j);
            const I rs[1] = {row};
            op.push(s, ctx, Values<Op, 1, V, true, I>{op, gate, xb, gb, gb, rs, V, false, 0,
                                                      j * V});
        }
    }
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

// Vectors of a row each thread keeps in the single-read row kernels: E values (forward 16 in
// registers; backward 8 in registers, as it also keeps x's and dy's column sums there, or 16 in
// shared memory), so rows of up to 16384 values are read once (1024 threads a row).
template <int V, int E> struct row_regs {
    enum { value = V >= E ? 1 : E / V };
};

// The sums of a pair of values over each slot of `height` consecutive threads (a power of two
// from 32 to blockDim.x), in a fixed order, returned to every thread of the slot; `scratch` holds
// 32 pairs. Every thread of the block calls it.
template <typename A>
__device__ __forceinline__ SumPair<A> slot_sum(SumPair<A> s, const int height,
                                               SumPair<A>* scratch) {
    s = warp_reduce(s);
    if (height == 32) {
        s.dy = __shfl_sync(0xffffffffu, s.dy, 0);
        s.dy_xmu = __shfl_sync(0xffffffffu, s.dy_xmu, 0);
        return s;
    }
    const int warp = threadIdx.x >> 5;
    __syncthreads();  // the previous call's readers are done with scratch
    if ((threadIdx.x & 31) == 0) scratch[warp] = s;
    __syncthreads();
    const int per = height >> 5;
    const int first = warp / per * per;
    SumPair<A> total = scratch[first];
    for (int w = 1; w < per; ++w) total = merge(total, scratch[first + w]);
    return total;
}

// The channel of element i of a per-channel layout (channel-first: planes of `inner` values;
// channels-last: channels innermost), computed once and then advanced one element at a time
// without division.
// Channels and plane positions fit 32 bits even where the tensor's index needs 64.
template <bool CL, typename I> struct ChannelWalk {
    unsigned int c, r;
    const unsigned int channels, inner;

    __device__ __forceinline__ ChannelWalk(const I i, const I channels_, const I inner_)
        : channels((unsigned int)channels_), inner((unsigned int)inner_) {
        if (CL) {
            c = (unsigned int)(i % channels_);
            r = 0;
        } else {
            const I q = i / inner_;
            c = (unsigned int)(q % channels_);
            r = (unsigned int)(i - q * inner_);
        }
    }
    __device__ __forceinline__ void next() {
        if (CL || ++r == inner) {
            r = 0;
            if (++c == channels) c = 0;
        }
    }
};

// Group and channel of element i for the normalizations over channel groups: L = 0 rows (group =
// row, channel = column; `inner` = columns), 1 channel-first (n, C, S) (`inner` = S), 2
// channels-last (n, S, C) (`inner` = S); a group is `group_channels` consecutive channels of one
// sample. Advanced one element at a time like ChannelWalk.
template <int L, typename I> struct GroupWalk {
    I g, c, r, k, base;
    const I channels, inner, group_channels;

    __device__ __forceinline__ GroupWalk(const I i, const I channels_, const I inner_,
                                         const I group_channels_)
        : channels(channels_), inner(inner_), group_channels(group_channels_) {
        if (L == 0) {
            g = i / inner;
            c = i - g * inner;
            r = k = base = 0;
        } else if (L == 1) {
            const I plane = i / inner;
            r = i - plane * inner;
            c = plane % channels;
            k = c % group_channels;
            g = plane / group_channels;  // groups are contiguous in channel-first memory
            base = 0;
        } else {
            const I cell = i / channels;  // sample * S + position
            c = i - cell * channels;
            k = c % group_channels;
            const I sample = cell / inner;
            r = cell - sample * inner;
            base = sample * (channels / group_channels);
            g = base + c / group_channels;
        }
    }
    __device__ __forceinline__ void next() {
        if (L == 0) {
            if (++c == inner) {
                c = 0;
                ++g;
            }
        } else if (L == 1) {
            if (++r == inner) {
                r = 0;
                if (++c == channels) c = 0;
                if (++k == group_channels) {
                    k = 0;
                    ++g;
                }
            }
        } else if (++c == channels) {  // the next position: the sample's first group again
            c = k = 0;
            if (++r == inner) {
                r = 0;
                base += channels / group_channels;
            }
            g = base;
        } else if (++k == group_channels) {
            k = 0;
            ++g;
        }
    }
};

// The one elementwise loop: elements [0, head) and those after the last whole vector one at a
// time, the rest as V-wide vectors (16-byte loads: every tensor of the op is 16-byte aligned
// `head` elements in). Op::run<W>(i) handles elements i .. i + W - 1. Grid-stride over a flat grid.
template <class Op, int V, typename I>
__device__ __forceinline__ void elementwise(const Op& op, const I total, const I head) {
    const I first = (I)blockIdx.x * blockDim.x + threadIdx.x;
    const I stride = (I)gridDim.x * blockDim.x;
    const I lead = head < total ? head : total;
    const I body = (total - lead) / V;
    for (I j = first; j < body; j += stride) op.template run<V>(lead + j * V);
    const I tail = lead + body * V;
    const I singles = lead + (total - tail);
    for (I t = first; t < singles; t += stride) op.template run<1>(t < lead ? t : tail + (t - lead));
}

// How a chunk of values enters the statistics: Welford on values shifted by a pilot (the
// channel's first value), so a large mean costs no precision; the chunk's own mean and sum of
// squared deviations (two passes over registers) join the state by a Chan merge, one division
// per chunk.
template <typename A> struct WelfordOps : Ungated {
    typedef Welford<A> State;
    enum { scaled = 0 };
    template <typename I> __device__ A context(const A first, const I) const { return first; }
    __device__ static State empty() { return welford_empty<A>(); }
    template <class Vals> __device__ void push(State& s, const A pilot, const Vals& v) const {
        if (v.n == 0) return;
        A sum = A(0);
#pragma unroll
        for (int i = 0; i < Vals::size; ++i)
            if (i < v.n) sum += v.x(i) - pilot;
        const A mean = sum * inv_of(A(v.n));
        A q = A(0);
#pragma unroll
        for (int i = 0; i < Vals::size; ++i)
            if (i < v.n) {
                const A d = (v.x(i) - pilot) - mean;
                q += d * d;
            }
        merge_chunk(s, A(v.n), mean, q);
    }
};

// How a chunk enters per-channel (or per-row) gradient sums: sum(g) and sum(g * (x - m)).
template <typename A> struct SumOps : Ungated {
    typedef SumPair<A> State;
    enum { scaled = 0 };
    __device__ static State empty() {
        State s;
        s.dy = s.dy_xmu = A(0);
        return s;
    }
    template <class Vals> __device__ void push(State& s, const A m, const Vals& v) const {
#pragma unroll
        for (int i = 0; i < Vals::size; ++i)
            if (i < v.n) {
                const A g = v.g(i);
                s.dy += g;
                s.dy_xmu += g * (v.x(i) - m);
            }
    }
};

// Rows of the per-channel (per-group) statistics buffer a forward pass writes, each `channels`
// long, in the accumulator type: the mean split as center + lo (center = the mean rounded to A, lo
// the rounding residual), 1/sqrt(var + eps), the apply coefficients y = (x - center) * scale +
// shift, the unbiased variance (for the running statistics) and the sum of squared deviations.
enum { STAT_CENTER = 0, STAT_INVSTD = 1, STAT_LO = 2, STAT_SCALE = 3, STAT_SHIFT = 4,
       STAT_UNBIASED = 5, STAT_M2 = 6, STAT_ROWS = 7 };

// From a merged Welford state of `count` values around `pilot`: center, lo, variance, invstd.
// RMSNorm (rms != 0) normalizes around 0: var is the mean square (variance + mean^2, no
// cancellation) and center = lo = 0.
template <typename A> struct Moments {
    A center, lo, var, invstd;
};
template <typename A>
__device__ __forceinline__ Moments<A> moments_of(const Welford<A> w, const double count,
                                                 const A pilot, const A eps, const int rms = 0) {
    Moments<A> m;
    m.var = w.m2 * inv_of(A(count));
    m.center = pilot + w.mean;
    m.lo = w.mean - (m.center - pilot);  // exact when |pilot| >= |w.mean| (Fast2Sum)
    if (rms) {
        const A mean = m.center + m.lo;
        m.var += mean * mean;
        m.center = m.lo = A(0);
    }
    m.invstd = inv_of(sqrt(m.var + eps));
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
