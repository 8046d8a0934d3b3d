// bncupy backward kernels, on the same views as forward.cu (see there for T, A, V, I, CL).
#include "reduce.cuh"

namespace bncupy {

// Per-channel sum(g) and sum(g * (x - center)), g being dy, or with a fused ReLU dy where the
// forward's output (recomputed from x, the forward's STAT rows `fwd` and the residual z) was
// positive. The mean is center + lo (lo may be null: 0); the channel's last block writes
//   grad_weight = sum(g * xhat), grad_bias = sum(g) (two arrays) and the coefficients
//   coef = [center, a, b, c] of dx = a * g + b * (x - center) + c (training: through the batch
//   statistics; eval: b = c = 0).
template <typename TT> struct GradOp : SumOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 1, gated = 1 };
    struct Gate {
        A center, scale, shift;
    };

    const A* mean;
    const A* lo;
    const A* invstd;
    const A* weight;
    const A* fwd;  // null: no fused ReLU
    double count;
    int training;
    A* grad_weight;
    A* grad_bias;
    A* coef;
    unsigned long long channels;

    template <typename I> __device__ A context(const A, const I c) const { return mean[c]; }
    template <typename I> __device__ Gate gate_of(const I c) const {
        Gate g = {A(0), A(0), A(0)};
        if (fwd) {
            g.center = fwd[STAT_CENTER * channels + c];
            g.scale = fwd[STAT_SCALE * channels + c];
            g.shift = fwd[STAT_SHIFT * channels + c];
        }
        return g;
    }
    __device__ A gate(const Gate& g, const A x, const A dy, const A z) const {
        if (!fwd) return dy;
        const A v = pre_activation(x, g.center, g.scale, g.shift, true, z);
        return to_acc(from_acc<T>(v)) > A(0) ? dy : A(0);
    }
    template <typename I> __device__ void finalize(const SumPair<A> s, const I c, const A m) const {
        const double residual = lo ? (double)lo[c] : 0.0;
        const double sum_dy = s.dy;
        const double sum_dy_xmu = (double)s.dy_xmu - residual * sum_dy;
        const double inv = invstd[c];
        const double a = (weight ? (double)weight[c] : 1.0) * inv;
        double b = 0.0, k = 0.0;
        if (training && count > 0.0) {
            const double per_value = inv_of(count);
            b = -a * inv * inv * sum_dy_xmu * per_value;
            k = -a * sum_dy * per_value - b * residual;
        }
        grad_weight[c] = (A)(sum_dy_xmu * inv);
        grad_bias[c] = (A)sum_dy;
        coef[c] = m;
        coef[channels + c] = (A)a;
        coef[2 * channels + c] = (A)b;
        coef[3 * channels + c] = (A)k;
    }
};

template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) backward_reduce(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    const I rows, const I channels, const I inner, const I head, const int splits,
    const int lanes, SumPair<typename acc_of<T>::type>* __restrict__ partials,
    unsigned int* __restrict__ counters, const typename acc_of<T>::type* mean,
    const typename acc_of<T>::type* lo, const typename acc_of<T>::type* invstd,
    const typename acc_of<T>::type* weight, const typename acc_of<T>::type* fwd,
    const double count, const int training, typename acc_of<T>::type* grad_weight,
    typename acc_of<T>::type* grad_bias, typename acc_of<T>::type* coef) {
    const GradOp<T> op = {{},          mean,      lo,   invstd, weight, fwd, count, training,
                          grad_weight, grad_bias, coef, (unsigned long long)channels};
    if (CL)
        reduce_nhwc<GradOp<T>, V, I>(op, x, dy, residual, rows, inner, splits, lanes, partials,
                                     counters);
    else
        reduce_nchw<GradOp<T>, V, I>(op, x, dy, residual, rows, channels, inner, head, splits,
                                     partials, counters);
}

// dx = a[c] * g + b[c] * (x - center[c]) + c[c] with the coefficients backward_reduce wrote; g is
// dy, or with a fused ReLU (fwd not null) dy masked where the forward's output was not positive.
// g_out (may be null) receives g: the gradient of the fused residual. With dx null, g alone
// (SyncBatchNorm's step through the ReLU; coef unused).
template <typename T, bool CL, typename I> struct BackwardApplyOp {
    typedef typename acc_of<T>::type A;
    const T* __restrict__ dy;
    const T* __restrict__ x;
    const T* __restrict__ residual;
    T* __restrict__ dx;
    T* __restrict__ g_out;
    const A* __restrict__ coef;
    const A* __restrict__ fwd;
    I channels, inner;

    template <int W> __device__ __forceinline__ void run(const I i) const {
        typedef vec_t<T, W> vec;
        const vec xi = ld(reinterpret_cast<const vec*>(x + i));
        vec gi = ld(reinterpret_cast<const vec*>(dy + i));
        vec z;
        if (residual) z = ld(reinterpret_cast<const vec*>(residual + i));
        const T zero = from_acc<T>(A(0));
        // the mask first, then dx: two loops keep fewer values live (4 blocks of 256 threads)
        if (fwd) {
            ChannelWalk<CL, I> ch(i, channels, inner);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const I c = ch.c;
                const A v = pre_activation(to_acc(xi.v[k]), fwd[STAT_CENTER * channels + c],
                                           fwd[STAT_SCALE * channels + c],
                                           fwd[STAT_SHIFT * channels + c], residual != 0,
                                           residual ? to_acc(z.v[k]) : A(0));
                if (!(to_acc(from_acc<T>(v)) > A(0))) gi.v[k] = zero;
                ch.next();
            }
        }
        vec out;
        if (dx) {
            ChannelWalk<CL, I> ch(i, channels, inner);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                const I c = ch.c;
                out.v[k] = from_acc<T>(coef[channels + c] * to_acc(gi.v[k]) +
                                       coef[2 * channels + c] * (to_acc(xi.v[k]) - coef[c]) +
                                       coef[3 * channels + c]);
                ch.next();
            }
        }
        if (dx) st(reinterpret_cast<vec*>(dx + i), out);
        if (g_out) st(reinterpret_cast<vec*>(g_out + i), gi);
    }
};

template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256, sizeof(I) == 4 ? 4 : 3) backward_apply(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    T* __restrict__ dx, T* __restrict__ g_out, const I total, const I head, const I channels,
    const I inner, const typename acc_of<T>::type* __restrict__ coef,
    const typename acc_of<T>::type* __restrict__ fwd) {
    const BackwardApplyOp<T, CL, I> op = {dy, x, residual, dx, g_out, coef, fwd, channels,
                                          inner};
    elementwise<BackwardApplyOp<T, CL, I>, V, I>(op, total, head);
}

// LayerNorm's per-row sums: sum(w[col] * dy) and sum(w[col] * dy * (x - center[row])).
template <typename TT> struct RowGradOp : SumOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 1, scaled = 1 };

    const A* center;
    const A* weight;

    template <typename I> __device__ A context(const A, const I row) const {
        return center ? center[row] : A(0);
    }
    __device__ A dy_scale(const unsigned long long col) const { return weight ? weight[col] : A(1); }
};

// LayerNorm's input gradient, one launch over rows (a row per `height` threads, as row_forward):
//   dx = rstd * w * dy - rstd * mean(w * dy) - (x - mean) * rstd^3 * mean(w * dy * (x - mean))
//        + grad_sum,
// the mean being center + lo (center and lo may be null: 0). RMSNorm (rms != 0; center null):
// the mean(w * dy) term drops. grad_sum (may be null) is the gradient reaching the pre-norm sum
// h = x + residual from its other consumers (prenorm).
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) row_backward(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const I rows,
    const I row_vecs, const int height, const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ lo,
    const typename acc_of<T>::type* __restrict__ rstd,
    const typename acc_of<T>::type* __restrict__ weight, const T* __restrict__ grad_sum,
    const int rms) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const RowGradOp<T> op = {{}, center, weight};
    I row;
    bool active;
    A m;
    const SumPair<A> s = rows_reduce<RowGradOp<T>, V, I>(op, x, dy, rows, row_vecs, height, row,
                                                         active, m);
    if (!active) return;
    const A n = A((double)row_vecs * V);
    const A residual = lo ? lo[row] : A(0);
    const A r = rstd[row];
    const A per_value = inv_of(n);
    const A q = -r * r * r * (s.dy_xmu - residual * s.dy) * per_value;
    const A k0 = rms ? A(0) : -r * s.dy * per_value;
    const vec* xv = reinterpret_cast<const vec*>(x) + (size_t)row * row_vecs;
    const vec* gv = reinterpret_cast<const vec*>(dy) + (size_t)row * row_vecs;
    const vec* sv = reinterpret_cast<const vec*>(grad_sum) + (size_t)row * row_vecs;
    vec* dxv = reinterpret_cast<vec*>(dx) + (size_t)row * row_vecs;
    for (I j = threadIdx.x & (height - 1); j < row_vecs; j += height) {
        const vec xi = ld(xv + j), gi = ld(gv + j);
        vec out;
        if (grad_sum) out = ld(sv + j);
#pragma unroll
        for (int k = 0; k < V; ++k)
            out.v[k] = from_acc<T>(r * op.dy_scale(j * V + k) * to_acc(gi.v[k]) +
                                   q * ((to_acc(xi.v[k]) - m) - residual) + k0 +
                                   (grad_sum ? to_acc(out.v[k]) : A(0)));
        st(dxv + j, out);
    }
}

// Where a thread of the single-read row backward keeps its R vectors of x and of dy of a row and
// the sums of dy over its columns: registers, or its own slots of (dynamic) shared memory, vector
// r at x[r * step] and the sum of value k of it at sums[(r * V + k) * step], which no other
// thread touches (no barrier); DbShared: the sums there too (else registers).
template <typename vec, typename A, int R, int V> struct HeldInRegisters {
    vec x[R], g[R];
    A sums[R][V];
    __device__ __forceinline__ vec& xs(const int r) { return x[r]; }
    __device__ __forceinline__ vec& gs(const int r) { return g[r]; }
    __device__ __forceinline__ A& db(const int r, const int k) { return sums[r][k]; }
};
template <typename vec, typename A, int R, int V, bool DbShared> struct HeldInShared {
    enum { step = 1024 };  // a constant: ptxas folds the slots' offsets into the accesses
    vec* x;
    vec* g;
    A* shared_sums;
    A sums[DbShared ? 1 : R][V];
    __device__ __forceinline__ vec& xs(const int r) { return x[r * step]; }
    __device__ __forceinline__ vec& gs(const int r) { return g[r * step]; }
    __device__ __forceinline__ A& db(const int r, const int k) {
        if constexpr (DbShared)
            return shared_sums[(r * V + k) * step];
        else
            return sums[r][k];
    }
};

// LayerNorm's and RMSNorm's backward over rows whose values each thread holds (slots of
// `height` threads per row as in row_norm): x and dy are read once and dx written once, with dx
// as in row_backward (rms, grad_sum likewise; `sum`: grad_sum is read, prenorm). A thread owns
// the same columns in every row, so it sums dy * xhat and dy of its columns over its rows in
// registers; several slots per block are merged in slot order through shared memory
// (2 * columns values, at most 32 KB) and written as the block's partials:
// partials[block][0 | 1][column], summed over blocks by column_sums.
template <typename T, int V, int R, int P, typename I, bool OneSlot, class Held>
__device__ __forceinline__ void row_norm_backward_rows(
    Held& held, const bool sum, const T* __restrict__ dy, const T* __restrict__ x,
    T* __restrict__ dx, const I rows, const I row_vecs, const int height,
    const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ lo,
    const typename acc_of<T>::type* __restrict__ rstd,
    const typename acc_of<T>::type* __restrict__ weight,
    typename acc_of<T>::type* __restrict__ partials, const T* __restrict__ grad_sum,
    const int rms) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    __shared__ SumPair<A> scratch[32];
    const A inv_n = inv_of(A((double)row_vecs * V));
    const I columns = row_vecs * V;
    const int slots = OneSlot ? 1 : blockDim.x / height;
    const int slot = OneSlot ? 0 : threadIdx.x / height, ty = threadIdx.x % height;
    A dw[R][V];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < V; ++k) dw[r][k] = held.db(r, k) = A(0);
    for (I first = (I)blockIdx.x * slots; first < rows; first += (I)gridDim.x * slots) {
        const I row = first + slot;
        const bool active = row < rows;
        const size_t base = (size_t)row * row_vecs;
        const A m = active && center ? center[row] : A(0), l = active && lo ? lo[row] : A(0);
        const A inv = active ? rstd[row] : A(0);
        SumPair<A> s = {A(0), A(0)};
        // P vectors of x and of dy in flight at a time (P < R: held in shared memory)
#pragma unroll 1
        for (int r0 = 0; r0 < R; r0 += P)
#pragma unroll
            for (int r = r0; r < r0 + P; ++r) {
                const unsigned int j = ty + (unsigned int)r * height;
                if (active && j < row_vecs) {
                    const vec xi = ld(reinterpret_cast<const vec*>(x) + base + j);
                    const vec gi = ld(reinterpret_cast<const vec*>(dy) + base + j);
                    held.xs(r) = xi;
                    held.gs(r) = gi;
#pragma unroll
                    for (int k = 0; k < V; ++k) {
                        const A wg = (weight ? weight[j * V + k] : A(1)) * to_acc(gi.v[k]);
                        s.dy += wg;
                        s.dy_xmu += wg * ((to_acc(xi.v[k]) - m) - l);
                    }
                }
            }
        s = slot_sum(s, height, scratch);
        if (!active) continue;
        const A q = -inv * inv * inv * s.dy_xmu * inv_n;
        const A k0 = rms ? A(0) : -inv * s.dy * inv_n;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const unsigned int j = ty + (unsigned int)r * height;
            if (j < row_vecs) {
                const vec xi = held.xs(r), gi = held.gs(r);
                vec out;  // holds grad_sum first: no extra registers
                if (sum) out = ld(reinterpret_cast<const vec*>(grad_sum) + base + j);
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A g = to_acc(gi.v[k]);
                    const A centred = (to_acc(xi.v[k]) - m) - l;
                    out.v[k] = from_acc<T>(inv * (weight ? weight[j * V + k] : A(1)) * g +
                                           q * centred + k0 + (sum ? to_acc(out.v[k]) : A(0)));
                    dw[r][k] += g * (centred * inv);
                    held.db(r, k) += g;
                }
                st(reinterpret_cast<vec*>(dx) + base + j, out);
            }
        }
    }
    A* mine = partials + (size_t)blockIdx.x * 2 * columns;
    if (OneSlot || slots == 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const unsigned int j = ty + (unsigned int)r * height;
            if (j < row_vecs)
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    mine[j * V + k] = dw[r][k];
                    mine[columns + j * V + k] = held.db(r, k);
                }
        }
        return;
    }
    if constexpr (!OneSlot) {
        // Slot by slot, each adding its sums to what the slots before it left in `merged`.
        __shared__ A merged[32768 / sizeof(A)];
        for (int turn = 0; turn < slots; ++turn) {
            __syncthreads();
            if (slot == turn)
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const unsigned int j = ty + (unsigned int)r * height;
                    if (j < row_vecs)
#pragma unroll
                        for (int k = 0; k < V; ++k) {
                            const I col = j * V + k;
                            merged[col] = turn ? merged[col] + dw[r][k] : dw[r][k];
                            merged[columns + col] = turn ? merged[columns + col] + held.db(r, k)
                                                         : held.db(r, k);
                        }
                }
        }
        __syncthreads();
        for (I col = threadIdx.x; col < 2 * columns; col += blockDim.x) mine[col] = merged[col];
    }
}

// The backward of rows held in registers: up to 8192 values (double 2048, unvectorized 4096)
// with 1024 threads of 64 registers. Sum: grad_sum is read too (prenorm); that specialisation
// runs 512 threads with twice the values per thread (128 registers each), so rows of the same
// length are read once.
template <typename T, int V, typename I, bool Sum>
__global__ void __launch_bounds__(Sum ? 512 : 1024, 1) row_norm_backward(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const I rows,
    const I row_vecs, const int height, const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ lo,
    const typename acc_of<T>::type* __restrict__ rstd,
    const typename acc_of<T>::type* __restrict__ weight,
    typename acc_of<T>::type* __restrict__ partials, const T* __restrict__ grad_sum,
    const int rms) {
    typedef typename acc_of<T>::type A;
    // fewer values in double, and one at a time without vectors: the registers of 64 per thread
    // (128 with Sum)
    const int R = row_regs<V, (sizeof(A) == 8 ? 2 : V == 1 ? 4 : 8) * (Sum ? 2 : 1)>::value;
    HeldInRegisters<vec_t<T, V>, A, R, V> held;
    row_norm_backward_rows<T, V, R, R, I, false>(held, Sum, dy, x, dx, rows, row_vecs, height,
                                              center, lo, rstd, weight, partials, grad_sum, rms);
}

// Rows too long for registers, up to 16384 values (double 8192): each thread keeps its 16
// values (double 8) of x and of dy, and with 16-bit data the sums of dy over its columns, in
// dynamic shared memory, 128 KB a block for every type (slots of 1024 threads: R vectors of x,
// R of dy, R * V sums), the sums of dy * xhat in registers; so no specialisation spills at 64
// registers. One row per block of height = blockDim.x threads (1024, or 512 for unvectorized
// rows of up to 8192 values), grid-stride over the rows; grad_sum may be null. One block is
// resident per SM on sm_80 and sm_90: 1024 threads of 64 registers fill the register file, and
// the 128 KB take most of the 164 KB (sm_80) or 228 KB (sm_90) of shared memory an SM has; the
// launch raises the kernel's dynamic shared memory limit above the default 48 KB.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(1024, 1) row_norm_backward_shared(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const I rows,
    const I row_vecs, const int height, const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ lo,
    const typename acc_of<T>::type* __restrict__ rstd,
    const typename acc_of<T>::type* __restrict__ weight,
    typename acc_of<T>::type* __restrict__ partials, const T* __restrict__ grad_sum,
    const int rms) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const int R = row_regs<V, sizeof(A) == 8 ? 8 : 16>::value;
    typedef HeldInShared<vec, A, R, V, (sizeof(T) < 4)> Held;
    BNCUPY_DYNAMIC_SHARED(rows_held);
    vec* const slots = reinterpret_cast<vec*>(rows_held);
    Held held;
    held.x = slots + threadIdx.x;
    held.g = slots + R * Held::step + threadIdx.x;
    held.shared_sums = reinterpret_cast<A*>(slots + 2 * R * Held::step) + threadIdx.x;
    // pass one's loads: one vector of x and of dy at a time, 4 of single values
    row_norm_backward_rows<T, V, R, (V == 1 ? 4 : 1), I, true>(
        held, grad_sum != 0, dy, x, dx, rows, row_vecs, (int)blockDim.x, center, lo, rstd,
        weight, partials, grad_sum, rms);
}

// The per-column sums of row_norm_backward's partials over its blocks, in block order:
// grad_weight = sum(dy * xhat), grad_bias = sum(dy) (one thread per column; grad_bias may be
// null: RMSNorm).
template <typename A>
__global__ void column_sums(const A* __restrict__ partials, const int blocks,
                            const unsigned long long columns, A* __restrict__ grad_weight,
                            A* __restrict__ grad_bias) {
    const unsigned long long col = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= columns) return;
    A dw = A(0), db = A(0);
    for (int b = 0; b < blocks; ++b) {
        dw += partials[(size_t)b * 2 * columns + col];
        db += partials[(size_t)b * 2 * columns + columns + col];
    }
    grad_weight[col] = dw;
    if (grad_bias) grad_bias[col] = db;
}

// LayerNorm's parameter gradients, per column over the rows: sum(dy * xhat) and sum(dy),
// xhat = ((x - center[row]) - lo[row]) * rstd[row] (a channels-last reduction, C = columns);
// grad_bias may be null (RMSNorm).
template <typename TT> struct ColumnGradOp : SumOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 1 };

    const A* center;
    const A* lo;
    const A* rstd;
    A* grad_weight;
    A* grad_bias;

    template <typename I> __device__ A context(const A, const I) const { return A(0); }
    template <class Vals> __device__ void push(SumPair<A>& s, const A, const Vals& v) const {
#pragma unroll
        for (int i = 0; i < Vals::size; ++i)
            if (i < v.n) {
                const auto r = v.r(i);
                const A g = v.g(i);
                s.dy += g;
                s.dy_xmu += g * (((v.x(i) - (center ? center[r] : A(0))) -
                                  (lo ? lo[r] : A(0))) * rstd[r]);
            }
    }
    template <typename I> __device__ void finalize(const SumPair<A> s, const I c, const A) const {
        grad_weight[c] = s.dy_xmu;
        if (grad_bias) grad_bias[c] = s.dy;
    }
};

template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) column_grads(
    const T* __restrict__ dy, const T* __restrict__ x, const I rows, const I cvecs,
    const int splits, const int lanes, SumPair<typename acc_of<T>::type>* __restrict__ partials,
    unsigned int* __restrict__ counters, const typename acc_of<T>::type* center,
    const typename acc_of<T>::type* lo, const typename acc_of<T>::type* rstd,
    typename acc_of<T>::type* grad_weight, typename acc_of<T>::type* grad_bias) {
    const ColumnGradOp<T> op = {{}, center, lo, rstd, grad_weight, grad_bias};
    reduce_nhwc<ColumnGradOp<T>, V, I>(op, x, dy, (const T*)0, rows, cvecs, splits, lanes,
                                       partials, counters);
}

// Per-cell gradient sums of the normalizations over channel groups: for cell (n, c) of group
// g = (n, c / group_channels), sum(dy) and sum(dy * (x - mean[g])) in double, the group's mean
// being center + lo (lo may be null: 0).
template <typename TT> struct CellGradOp : SumOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 1 };

    const A* center;
    const A* lo;
    unsigned long long channels;
    unsigned long long group_channels;
    double* sums;
    unsigned long long cells;

    template <typename I> __device__ unsigned long long group(const I cell) const {
        return (unsigned long long)cell / channels * (channels / group_channels) +
               (unsigned long long)cell % channels / group_channels;
    }
    template <typename I> __device__ A context(const A, const I cell) const {
        return center[group(cell)];
    }
    template <typename I> __device__ void finalize(const SumPair<A> s, const I cell, const A) const {
        const double residual = lo ? (double)lo[group(cell)] : 0.0;
        sums[cell] = s.dy;
        sums[cells + cell] = (double)s.dy_xmu - residual * (double)s.dy;
    }
};

// Channel-first cells (n * C contiguous planes of `plane` values, x's first 16-byte boundary
// `head` values in): split reduction (rows = 1, channels = cells) or, with height > 0, several
// planes per block (reduce_rows; then plane is a multiple of V and head 0).
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) cell_grad_planes(
    const T* __restrict__ dy, const T* __restrict__ x, const I cells, const I plane,
    const I head, const int splits, const int height,
    SumPair<typename acc_of<T>::type>* __restrict__ partials, unsigned int* __restrict__ counters,
    const typename acc_of<T>::type* center, const typename acc_of<T>::type* lo, const I channels,
    const I group_channels, double* sums) {
    const CellGradOp<T> op = {{}, center, lo, (unsigned long long)channels,
                              (unsigned long long)group_channels, sums, (unsigned long long)cells};
    if (height)
        reduce_rows<CellGradOp<T>, V, I>(op, x, dy, cells, plane / V, height);
    else
        reduce_nchw<CellGradOp<T>, V, I>(op, x, dy, (const T*)0, (I)1, cells, plane, head, splits,
                                         partials, counters);
}

// Channels-last cells: `samples` (rows, C) views (reduce_nhwc; cells = samples * C).
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, reduce_blocks<I>::value) cell_grad_cl(
    const T* __restrict__ dy, const T* __restrict__ x, const I rows, const I cvecs,
    const int splits, const int lanes, SumPair<typename acc_of<T>::type>* __restrict__ partials,
    unsigned int* __restrict__ counters, const typename acc_of<T>::type* center,
    const typename acc_of<T>::type* lo, const I group_channels, double* sums, const I cells) {
    const CellGradOp<T> op = {{}, center, lo, (unsigned long long)cvecs * V,
                              (unsigned long long)group_channels, sums, (unsigned long long)cells};
    reduce_nhwc<CellGradOp<T>, V, I>(op, x, dy, (const T*)0, rows, cvecs, splits, lanes,
                                     partials, counters);
}

// From the cell sums: per group the dx coefficients coef = [q, r] of
//   dx = invstd[g] * w[c] * dy + q[g] * ((x - center[g]) - lo[g]) + r[g],
// and per channel grad_weight = sum over samples of invstd * sum(dy * (x - mean)) and grad_bias =
// sum of sum(dy), each in a fixed order. Grid: ceil(max(groups, C) / 256) blocks.
template <typename A>
__global__ void group_grad_coefficients(const double* __restrict__ sums,
                                        const A* __restrict__ invstd,
                                        const unsigned long long groups,
                                        const unsigned long long channels,
                                        const int group_channels, const double count,
                                        const A* __restrict__ weight, A* __restrict__ coef,
                                        A* __restrict__ grad_weight, A* __restrict__ grad_bias) {
    const unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long cells = groups * group_channels;
    const unsigned long long per_sample = channels / group_channels;
    if (t < groups) {
        double s1 = 0.0, s2 = 0.0;
        const unsigned long long c0 = t % per_sample * group_channels;
        for (int i = 0; i < group_channels; ++i) {
            const unsigned long long cell = t * group_channels + i;
            const double w = weight ? (double)weight[c0 + i] : 1.0;
            s1 += w * sums[cell];
            s2 += w * sums[cells + cell];
        }
        const double inv = invstd[t];
        const double per_value = inv_of(count);
        coef[t] = (A)(-inv * inv * inv * s2 * per_value);
        coef[groups + t] = (A)(-inv * s1 * per_value);
    }
    if (t < channels) {
        double dw = 0.0, db = 0.0;
        const unsigned long long samples = cells / channels;
        for (unsigned long long n = 0; n < samples; ++n) {
            const unsigned long long cell = n * channels + t;
            dw += (double)invstd[n * per_sample + t / group_channels] * sums[cells + cell];
            db += sums[cell];
        }
        grad_weight[t] = (A)dw;
        grad_bias[t] = (A)db;
    }
}

// The input gradient of the normalizations over groups (see GroupWalk for L):
//   dx = invstd[g] * w[c] * dy + q[g] * ((x - center[g]) - lo[g]) + r[g].
template <typename T, int L, typename I> struct GroupBackwardOp {
    typedef typename acc_of<T>::type A;
    const T* __restrict__ dy;
    const T* __restrict__ x;
    T* __restrict__ dx;
    const A* __restrict__ center;
    const A* __restrict__ lo;
    const A* __restrict__ invstd;
    const A* __restrict__ weight;
    const A* __restrict__ coef;
    I channels, inner, group_channels, groups;

    template <int W> __device__ __forceinline__ void run(const I i) const {
        typedef vec_t<T, W> vec;
        const vec xi = ld(reinterpret_cast<const vec*>(x + i));
        const vec gi = ld(reinterpret_cast<const vec*>(dy + i));
        GroupWalk<L, I> at(i, channels, inner, group_channels);
        vec out;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const I g = at.g;
            const A w = weight ? weight[at.c] : A(1);
            out.v[k] = from_acc<T>(invstd[g] * w * to_acc(gi.v[k]) +
                                   coef[g] * ((to_acc(xi.v[k]) - center[g]) -
                                              (lo ? lo[g] : A(0))) +
                                   coef[groups + g]);
            at.next();
        }
        st(reinterpret_cast<vec*>(dx + i), out);
    }
};

template <typename T, int V, typename I, int L>
__global__ void __launch_bounds__(256, 4) group_backward_apply(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const I total,
    const I head, const I channels, const I inner, const I group_channels,
    const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ lo,
    const typename acc_of<T>::type* __restrict__ invstd, const I groups,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ coef) {
    const GroupBackwardOp<T, L, I> op = {dy,     x,      dx,    center,   lo,      invstd,
                                         weight, coef,   channels, inner, group_channels,
                                         groups};
    elementwise<GroupBackwardOp<T, L, I>, V, I>(op, total, head);
}

}  // namespace bncupy
