// bncupy forward kernels. Channel-first data is a contiguous (rows, C, inner) view (NCHW is
// (N, C, H*W), (N, C) is (N, C, 1)); channels-last data (CL) is a contiguous (rows, C) view.
//
// T: element type (half_t, float, double); A: accumulator (float, or double for double);
// V: elements per vector load (16 bytes when the innermost extent is a multiple of V and the
// pointers are aligned, else 1); I: index type (unsigned int below 2^31 elements, else 64-bit).
// Optional pointers are null (never CuPy's None, which CuPy 13 passes as a garbage address).
#include "reduce.cuh"

namespace bncupy {

// Training statistics. Values are shifted by a per-channel pilot (the channel's first value)
// before entering Welford, so a large mean costs no precision. The channel's last block writes the
// STAT_* rows of `stats` (see reduce.cuh): center + lo is the exact mean and shift absorbs lo, so
// a constant channel maps to exactly beta.
template <typename TT> struct StatsOp : WelfordOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 0 };

    const A* weight;
    const A* bias;
    A eps;
    double count;
    A* stats;
    unsigned long long channels;
    int rms;

    template <typename I>
    __device__ void finalize(const Welford<A> w, const I c, const A pilot) const {
        const Moments<A> m = moments_of(w, count, pilot, eps, rms);
        const A scale = (weight ? weight[c] : A(1)) * m.invstd;
        A* out = stats + c;
        out[STAT_CENTER * channels] = m.center;
        out[STAT_INVSTD * channels] = m.invstd;
        out[STAT_LO * channels] = m.lo;
        out[STAT_SCALE * channels] = scale;
        out[STAT_SHIFT * channels] = (bias ? bias[c] : A(0)) - m.lo * scale;
        out[STAT_UNBIASED * channels] =
            count > 1.0 ? (A)((double)m.var * (count * inv_of(count - 1.0))) : (A)m.var;
        out[STAT_M2 * channels] = w.m2;
    }
};

// Grid: channel-first, C * splits blocks; channels-last, ceil(C / V / lanes) * splits blocks.
// inner is the values per channel plane (channel-first) or C / V (channels-last); head the
// elements before x's first 16-byte boundary (channel-first). Also the statistics of contiguous
// groups (GroupNorm, long LayerNorm and RMSNorm rows): rows = 1, channels = groups; rms != 0
// for RMSNorm's moments (see moments_of).
template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) forward_stats(
    const T* __restrict__ x, const I rows, const I channels, const I inner, const I head,
    const int splits, const int lanes, Welford<typename acc_of<T>::type>* __restrict__ partials,
    unsigned int* __restrict__ counters, const typename acc_of<T>::type* weight,
    const typename acc_of<T>::type* bias, const typename acc_of<T>::type eps,
    const double count, typename acc_of<T>::type* stats, const int rms) {
    const StatsOp<T> op = {{}, weight, bias, eps, count, stats, (unsigned long long)channels,
                           rms};
    if (CL)
        reduce_nhwc<StatsOp<T>, V, I>(op, x, (const T*)0, (const T*)0, rows, inner, splits,
                                      lanes, partials, counters);
    else
        reduce_nchw<StatsOp<T>, V, I>(op, x, (const T*)0, (const T*)0, rows, channels, inner,
                                      head, splits, partials, counters);
}

// ReLU that keeps NaN (max() would turn it into 0).
template <typename A> __device__ __forceinline__ A relu(const A v) { return v < A(0) ? A(0) : v; }

// Evaluation coefficients of channel c from the running statistics (the apply computes them per
// block and channel, or per value, and its first C threads store the same bits for a backward
// pass).
template <typename A>
__device__ __forceinline__ void eval_coefficients(const A* running_mean, const A* running_var,
                                                  const A* weight, const A* bias, const A eps,
                                                  const unsigned long long c, A& center,
                                                  A& invstd, A& scale, A& shift) {
    center = running_mean[c];
    invstd = rsqrt_of(running_var[c] + eps);
    scale = (weight ? weight[c] : A(1)) * invstd;
    shift = bias ? bias[c] : A(0);
}

// y = act((x - center[c]) * scale[c] + shift[c] + residual), act = ReLU when relu != 0; residual
// may be null. The channel's coefficients are in three rows (the statistics buffer's STAT rows in
// training, a block's shared table in evaluation); where `vectors` (each row on a 16-byte
// boundary), channels-last vectors whose channels start on a multiple of W take them 16 bytes at
// a time.
template <typename T, bool CL, typename I> struct ApplyOp {
    typedef typename acc_of<T>::type A;
    enum { CW = 16 / sizeof(A) };  // coefficients per 16-byte load
    const T* __restrict__ x;
    T* __restrict__ y;
    const T* __restrict__ residual;
    const A* center;
    const A* scale;
    const A* shift;
    int vectors, relu_flag;
    I channels, inner;

    template <int W> __device__ __forceinline__ void run(const I i) const {
        typedef vec_t<T, W> vec;
        const vec in = ld(reinterpret_cast<const vec*>(x + i));
        vec z;
        if (residual) z = ld(reinterpret_cast<const vec*>(residual + i));
        ChannelWalk<CL, I> ch(i, channels, inner);
        vec out;
        if (CL && W % CW == 0 && vectors && ch.c % W == 0 && ch.c + W <= channels) {
            const A* rows[3] = {center, scale, shift};
            A k[3][W];  // center, scale, shift of the W channels
#pragma unroll
            for (int row = 0; row < 3; ++row)
#pragma unroll
                for (int q = 0; q < W; q += CW) {
                    const vec_t<A, CW> v =
                        *reinterpret_cast<const vec_t<A, CW>*>(rows[row] + ch.c + q);
#pragma unroll
                    for (int e = 0; e < CW; ++e) k[row][q + e] = v.v[e];
                }
#pragma unroll
            for (int e = 0; e < W; ++e) {
                const A v = pre_activation(to_acc(in.v[e]), k[0][e], k[1][e], k[2][e],
                                           residual != 0, residual ? to_acc(z.v[e]) : A(0));
                out.v[e] = from_acc<T>(relu_flag ? relu(v) : v);
            }
        } else {
#pragma unroll
            for (int e = 0; e < W; ++e) {
                const I c = ch.c;
                const A v = pre_activation(to_acc(in.v[e]), center[c], scale[c], shift[c],
                                           residual != 0, residual ? to_acc(z.v[e]) : A(0));
                out.v[e] = from_acc<T>(relu_flag ? relu(v) : v);
                ch.next();
            }
        }
        st(reinterpret_cast<vec*>(y + i), out);
    }
};

// The evaluation apply with each value's coefficients computed from the running statistics
// (channels too many for a block's shared table).
template <typename T, bool CL, typename I> struct EvalPerValueOp {
    typedef typename acc_of<T>::type A;
    const T* __restrict__ x;
    T* __restrict__ y;
    const T* __restrict__ residual;
    const A* running_mean;
    const A* running_var;
    const A* __restrict__ weight;
    const A* __restrict__ bias;
    A eps;
    int relu_flag;
    I channels, inner;

    template <int W> __device__ __forceinline__ void run(const I i) const {
        typedef vec_t<T, W> vec;
        const vec in = ld(reinterpret_cast<const vec*>(x + i));
        vec z;
        if (residual) z = ld(reinterpret_cast<const vec*>(residual + i));
        ChannelWalk<CL, I> ch(i, channels, inner);
        vec out;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            A center, invstd, scale, shift;
            eval_coefficients(running_mean, running_var, weight, bias, eps, ch.c, center, invstd,
                              scale, shift);
            const A v = pre_activation(to_acc(in.v[k]), center, scale, shift, residual != 0,
                                       residual ? to_acc(z.v[k]) : A(0));
            out.v[k] = from_acc<T>(relu_flag ? relu(v) : v);
            ch.next();
        }
        st(reinterpret_cast<vec*>(y + i), out);
    }
};

// The apply over `total` values (`head` before the tensors' first 16-byte boundary); inner is
// the values per channel plane (channel-first). Training (eval = 0): the first C threads move the
// running statistics (when given) towards the batch's: the last launch of the step makes the only
// change to the caller's state, so a step that fails earlier changes nothing. Evaluation
// (eval != 0): the first C threads write the coefficients into `stats` (center, invstd, lo = 0,
// scale, shift) for a later backward pass; with eval = 2 every block first computes every
// channel's coefficients once into its dynamic shared memory (3 * round_up(C, 4) values: the
// launch's shared_mem), so 1/sqrt is taken per block and channel, not per value; eval = 1 (more
// channels than that holds) computes them per value.
template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256, 4) apply(
    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual, const I total,
    const I head, const I channels, const I inner, typename acc_of<T>::type* __restrict__ stats,
    typename acc_of<T>::type* running_mean, typename acc_of<T>::type* running_var,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ bias, const typename acc_of<T>::type eps,
    const double momentum, const int eval, const int relu_flag) {
    typedef typename acc_of<T>::type A;
    const I stride = (I)gridDim.x * blockDim.x;
    for (I c = (I)blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += stride) {
        if (eval) {
            A center, invstd, scale, shift;
            eval_coefficients(running_mean, running_var, weight, bias, eps, c, center, invstd,
                              scale, shift);
            stats[STAT_CENTER * channels + c] = center;
            stats[STAT_INVSTD * channels + c] = invstd;
            stats[STAT_LO * channels + c] = A(0);
            stats[STAT_SCALE * channels + c] = scale;
            stats[STAT_SHIFT * channels + c] = shift;
        } else if (running_mean) {
            const double m = (double)stats[STAT_CENTER * channels + c] +
                             (double)stats[STAT_LO * channels + c];
            const double v = (double)stats[STAT_UNBIASED * channels + c];
            running_mean[c] = (A)((1.0 - momentum) * (double)running_mean[c] + momentum * m);
            running_var[c] = (A)((1.0 - momentum) * (double)running_var[c] + momentum * v);
        }
    }
    if (eval == 2) {
        BNCUPY_DYNAMIC_SHARED(table);
        A* coef = reinterpret_cast<A*>(table);
        const unsigned int rows = ((unsigned int)channels + 3u) & ~3u;
        for (unsigned int c = threadIdx.x; c < (unsigned int)channels; c += blockDim.x) {
            A center, invstd, scale, shift;
            eval_coefficients(running_mean, running_var, weight, bias, eps, c, center, invstd,
                              scale, shift);
            coef[c] = center;
            coef[rows + c] = scale;
            coef[2 * rows + c] = shift;
        }
        __syncthreads();
        const ApplyOp<T, CL, I> op = {x, y, residual, coef, coef + rows, coef + 2 * rows, 1,
                                      relu_flag, channels, inner};
        elementwise<ApplyOp<T, CL, I>, V, I>(op, total, head);
    } else if (eval) {
        const EvalPerValueOp<T, CL, I> op = {x,    y,   residual,  running_mean, running_var,
                                             weight, bias, eps, relu_flag, channels, inner};
        elementwise<EvalPerValueOp<T, CL, I>, V, I>(op, total, head);
    } else {
        // the rows start on 16-byte boundaries when C is a multiple of the 16-byte count
        const int vectors = channels % ApplyOp<T, CL, I>::CW == 0 &&
                            (unsigned long long)stats % 16 == 0;
        const ApplyOp<T, CL, I> op = {x,
                                      y,
                                      residual,
                                      stats + STAT_CENTER * channels,
                                      stats + STAT_SCALE * channels,
                                      stats + STAT_SHIFT * channels,
                                      vectors,
                                      relu_flag,
                                      channels,
                                      inner};
        elementwise<ApplyOp<T, CL, I>, V, I>(op, total, head);
    }
}

// Per-cell Welford moments of channels-last groups (GroupNorm, InstanceNorm over (n, S, C)): the
// cell's mean and sum of squared deviations in double, merged per group by group_merge.
template <typename TT> struct CellStatsOp : WelfordOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 0 };

    double* mean;
    double* m2;

    template <typename I>
    __device__ void finalize(const Welford<A> w, const I cell, const A pilot) const {
        mean[cell] = (double)pilot + (double)w.mean;
        m2[cell] = (double)w.m2;
    }
};

// Grid: samples * ceil(C / V / lanes) * splits blocks over (samples, rows, C) data.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) cell_stats(
    const T* __restrict__ x, const I rows, const I cvecs, const int splits, const int lanes,
    Welford<typename acc_of<T>::type>* __restrict__ partials, unsigned int* __restrict__ counters,
    double* mean, double* m2) {
    const CellStatsOp<T> op = {{}, mean, m2};
    reduce_nhwc<CellStatsOp<T>, V, I>(op, x, (const T*)0, (const T*)0, rows, cvecs, splits,
                                      lanes, partials, counters);
}

// Group statistics from cell moments: group g of sample n merges its `group_channels` cells of
// `count` values each, in channel order, and writes the STAT_CENTER/INVSTD/LO/M2 rows of `stats`
// (one thread per group).
template <typename A>
__global__ void group_merge(const double* __restrict__ mean, const double* __restrict__ m2,
                            const unsigned long long groups, const int group_channels,
                            const double count, const A eps, A* __restrict__ stats) {
    const unsigned long long g = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    double n = 0.0, mu = 0.0, q = 0.0;
    for (int i = 0; i < group_channels; ++i) {
        const unsigned long long cell = g * group_channels + i;
        const double nb = count, total = n + nb, delta = mean[cell] - mu;
        const double wb = nb * inv_of(total);
        q += m2[cell] + delta * delta * n * wb;
        mu += delta * wb;
        n = total;
    }
    const A center = (A)mu;
    const A var = (A)(q * inv_of(n));
    stats[STAT_CENTER * groups + g] = center;
    stats[STAT_INVSTD * groups + g] = inv_of(sqrt(var + eps));
    stats[STAT_LO * groups + g] = (A)(mu - (double)center);
    stats[STAT_M2 * groups + g] = (A)q;
}

// The statistics of one row (rows_reduce's Op for row_forward).
template <typename TT> struct RowStatsOp : WelfordOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 0 };
};

// Normalization of contiguous rows in one pass over them: LayerNorm (plane_vecs = 0: the affine
// map is per column) and channel-first GroupNorm/InstanceNorm groups (a row is one sample's group
// of group_channels channel planes of plane_vecs vectors; groups per sample = `groups`). Writes y
// and the STAT_CENTER/INVSTD/LO/M2 rows of `stats` (`rows` long). Grid: ceil(rows / (256 /
// height)) blocks of 256 threads.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) row_forward(
    const T* __restrict__ x, T* __restrict__ y, const I rows, const I row_vecs, const int height,
    const I plane_vecs, const I groups, const I group_channels,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ bias, const typename acc_of<T>::type eps,
    typename acc_of<T>::type* __restrict__ stats, const int rms) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    I row;
    bool active;
    A pilot;
    const Welford<A> w = rows_reduce<RowStatsOp<T>, V, I>(RowStatsOp<T>{}, x, (const T*)0, rows,
                                                          row_vecs, height, row, active, pilot);
    if (!active) return;
    const Moments<A> m = moments_of(w, (double)row_vecs * V, pilot, eps, rms);
    const int ty = threadIdx.x & (height - 1);
    if (ty == 0) {
        stats[STAT_CENTER * rows + row] = m.center;
        stats[STAT_INVSTD * rows + row] = m.invstd;
        stats[STAT_LO * rows + row] = m.lo;
        stats[STAT_M2 * rows + row] = w.m2;
    }
    const I channel0 = plane_vecs ? (row % groups) * group_channels : I(0);
    const vec* xv = reinterpret_cast<const vec*>(x) + (size_t)row * row_vecs;
    vec* yv = reinterpret_cast<vec*>(y) + (size_t)row * row_vecs;
    for (I j = ty; j < row_vecs; j += height) {
        const vec in = ld(xv + j);
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const I c = plane_vecs ? channel0 + j / plane_vecs : j * V + k;
            const A s = m.invstd * (weight ? weight[c] : A(1));
            out.v[k] = from_acc<T>(((to_acc(in.v[k]) - m.center) - m.lo) * s +
                                   (bias ? bias[c] : A(0)));
        }
        st(yv + j, out);
    }
}

// Normalization of rows held in registers: `height` threads (a slot; a power of two, 32 or more)
// per row, several slots per block, grid-stride over the rows; each thread keeps up to R vectors
// of its row, so x is read once. LayerNorm and RMSNorm (plane_vecs = 0: the affine map is per
// column) and short channel-first groups (a row is one sample's group of group_channels planes of
// plane_vecs vectors; groups per sample = `groups`). Mean and variance by two passes over the
// registers around the row's first value; writes y and the STAT_CENTER/INVSTD/LO/M2 rows of
// `stats` (`rows` long); rms != 0: RMSNorm's moments (see moments_of).
//
// The fused residual add (transformer pre-norm blocks): the row normalized is
// h = H(x + residual), added in A and rounded to the residual stream's type H (residual may be
// null: h = H(x)); h is written to `sum` when that is not null. H is T, or float for 16-bit T
// (a float32 residual stream).
template <typename T, typename H, int V, typename I>
__global__ void __launch_bounds__(1024, 1) row_norm(
    const T* __restrict__ x, T* __restrict__ y, const I rows, const I row_vecs, const int height,
    const I plane_vecs, const I groups, const I group_channels,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ bias, const typename acc_of<T>::type eps,
    typename acc_of<T>::type* __restrict__ stats, const H* __restrict__ residual,
    H* __restrict__ sum, const int rms) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    typedef vec_t<H, V> hvec;
    // fewer values in double, and one at a time without vectors: registers
    const int R = row_regs<V, (sizeof(A) == 8 || V == 1) ? 4 : 16>::value;
    __shared__ SumPair<A> scratch[32];
    const A inv_n = inv_of(A((double)row_vecs * V));
    const int slots = blockDim.x / height;
    const int slot = threadIdx.x / height, ty = threadIdx.x % height;
    for (I first = (I)blockIdx.x * slots; first < rows; first += (I)gridDim.x * slots) {
        const I row = first + slot;
        const bool active = row < rows;
        const size_t base = (size_t)row * row_vecs;
        hvec hr[R];
        SumPair<A> s = {A(0), A(0)};
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const unsigned int j = ty + (unsigned int)r * height;
            if (active && j < row_vecs) {
                const vec xi = ld(reinterpret_cast<const vec*>(x) + base + j);
                hvec zi;
                if (residual) zi = ld(reinterpret_cast<const hvec*>(residual) + base + j);
#pragma unroll
                for (int k = 0; k < V; ++k)
                    hr[r].v[k] = from_acc<H>(residual ? to_acc(xi.v[k]) + to_acc(zi.v[k])
                                                      : to_acc(xi.v[k]));
                if (sum) st(reinterpret_cast<hvec*>(sum) + base + j, hr[r]);
            }
        }
        // a per-row pilot, h's first value (cached loads, not traffic)
        const size_t at = base * V;
        const A pilot = !active ? A(0) : to_acc(from_acc<H>(
            residual ? to_acc(x[at]) + to_acc(residual[at]) : to_acc(x[at])));
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (active && ty + (unsigned int)r * height < row_vecs)
#pragma unroll
                for (int k = 0; k < V; ++k) s.dy += to_acc(hr[r].v[k]) - pilot;
        const A shifted = slot_sum(s, height, scratch).dy * inv_n;
        s.dy = A(0);
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (active && ty + (unsigned int)r * height < row_vecs)
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A d = (to_acc(hr[r].v[k]) - pilot) - shifted;
                    s.dy += d * d;
                }
        const A m2 = slot_sum(s, height, scratch).dy;
        if (!active) continue;
        Welford<A> w;
        w.mean = shifted;
        w.m2 = m2;
        w.n = A((double)row_vecs * V);
        const Moments<A> m = moments_of(w, (double)row_vecs * V, pilot, eps, rms);
        if (ty == 0) {
            stats[STAT_CENTER * rows + row] = m.center;
            stats[STAT_INVSTD * rows + row] = m.invstd;
            stats[STAT_LO * rows + row] = m.lo;
            stats[STAT_M2 * rows + row] = m2;
        }
        const I channel0 = plane_vecs ? (row % groups) * group_channels : I(0);
        vec* yv = reinterpret_cast<vec*>(y) + base;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const unsigned int j = ty + (unsigned int)r * height;
            if (j < row_vecs) {
                vec out;
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const I c = plane_vecs ? channel0 + j / plane_vecs : j * V + k;
                    out.v[k] = from_acc<T>(((to_acc(hr[r].v[k]) - m.center) - m.lo) *
                                               (m.invstd * (weight ? weight[c] : A(1))) +
                                           (bias ? bias[c] : A(0)));
                }
                st(yv + j, out);
            }
        }
    }
}

// The normalizations over groups (see GroupWalk for L), each group's mean being center + lo (lo
// may be null: 0):
//   y = ((x - center[g]) - lo[g]) * (invstd[g] * w[c]) + b[c].
template <typename T, int L, typename I> struct GroupApplyOp {
    typedef typename acc_of<T>::type A;
    const T* __restrict__ x;
    T* __restrict__ y;
    const A* __restrict__ center;
    const A* __restrict__ lo;
    const A* __restrict__ invstd;
    const A* __restrict__ weight;
    const A* __restrict__ bias;
    I channels, inner, group_channels;

    template <int W> __device__ __forceinline__ void run(const I i) const {
        typedef vec_t<T, W> vec;
        const vec in = ld(reinterpret_cast<const vec*>(x + i));
        GroupWalk<L, I> at(i, channels, inner, group_channels);
        vec out;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const A s = invstd[at.g] * (weight ? weight[at.c] : A(1));
            out.v[k] = from_acc<T>(((to_acc(in.v[k]) - center[at.g]) - (lo ? lo[at.g] : A(0))) *
                                       s +
                                   (bias ? bias[at.c] : A(0)));
            at.next();
        }
        st(reinterpret_cast<vec*>(y + i), out);
    }
};

// The group apply over `total` values (`head` before the first 16-byte boundary); inner is the
// columns (L = 0) or the positions S of a sample (L = 1, 2); `stats` the groups' statistics
// buffer (STAT_* rows of `groups` values: center, lo, invstd, m2). InstanceNorm's running
// statistics (when given; one group per (sample, channel)) move towards the batch average of the
// instance means and of m2 * unbias (the unbiased variances), in the first C threads: the last
// launch of the step makes the only change to the caller's state.
template <typename T, int V, typename I, int L>
__global__ void __launch_bounds__(256, 4) group_apply(
    const T* __restrict__ x, T* __restrict__ y, const I total, const I head, const I channels,
    const I inner, const I group_channels, const typename acc_of<T>::type* __restrict__ stats,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ bias, const I groups,
    typename acc_of<T>::type* running_mean, typename acc_of<T>::type* running_var,
    const double momentum, const double unbias) {
    typedef typename acc_of<T>::type A;
    const A* center = stats + STAT_CENTER * groups;
    const A* lo = stats + STAT_LO * groups;
    const A* invstd = stats + STAT_INVSTD * groups;
    const A* m2 = stats + STAT_M2 * groups;
    if (running_mean) {
        const I samples = groups / channels;
        const I stride = (I)gridDim.x * blockDim.x;
        for (I c = (I)blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += stride) {
            double m = 0.0, v = 0.0;
            for (I n = 0; n < samples; ++n) {
                const I g = n * channels + c;
                m += (double)center[g] + (lo ? (double)lo[g] : 0.0);
                v += (double)m2[g] * unbias;
            }
            const double per_sample = inv_of((double)samples);
            running_mean[c] = (A)((1.0 - momentum) * (double)running_mean[c] +
                                  momentum * m * per_sample);
            running_var[c] = (A)((1.0 - momentum) * (double)running_var[c] +
                                 momentum * v * per_sample);
        }
    }
    const GroupApplyOp<T, L, I> op = {x, y, center, lo, invstd, weight, bias, channels, inner,
                                      group_channels};
    elementwise<GroupApplyOp<T, L, I>, V, I>(op, total, head);
}

}  // namespace bncupy
