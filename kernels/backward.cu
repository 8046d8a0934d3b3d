// bncupy backward kernels, on the same views as forward.cu (see there for T, A, V, I, CL).
#include "reduce.cuh"

namespace bncupy {

// Per-channel sum(dy) and sum(dy * (x - center)); the channel's last block writes
//   grad_weight = sum(dy * xhat), grad_bias = sum(dy), and the coefficients of
//   dx = a * dy + b * (x - center) + c  (training: through the batch statistics; eval: b = c = 0).
// The mean comes as double (mean64) or in the accumulator type (mean_acc); center is it rounded
// to the accumulator type, and the rounding residual is folded into the sums and into c.
template <typename TT> struct GradOp : SumOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 1 };

    const double* mean64;
    const A* mean_acc;
    const A* invstd;
    const A* weight;
    double count;
    int training;
    A* grad_weight;
    A* grad_bias;
    A* center;
    A* coef_a;
    A* coef_b;
    A* coef_c;

    template <typename I> __device__ A context(const A, const I c) const {
        return mean64 ? (A)mean64[c] : mean_acc[c];
    }
    template <typename I> __device__ void finalize(const SumPair<A> s, const I c, const A m) const {
        const double residual = (mean64 ? mean64[c] : (double)mean_acc[c]) - (double)m;
        const double sum_dy = s.dy;
        const double sum_dy_xmu = (double)s.dy_xmu - residual * sum_dy;
        const double inv = invstd[c];
        const double a = (weight ? (double)weight[c] : 1.0) * inv;
        double b = 0.0, k = 0.0;
        if (training && count > 0.0) {
            b = -a * inv * inv * sum_dy_xmu / count;
            k = -a * sum_dy / count - b * residual;
        }
        grad_bias[c] = (A)sum_dy;
        grad_weight[c] = (A)(sum_dy_xmu * inv);
        center[c] = m;
        coef_a[c] = (A)a;
        coef_b[c] = (A)b;
        coef_c[c] = (A)k;
    }
};

template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256) backward_reduce(
    const T* __restrict__ dy, const T* __restrict__ x, const I rows, const I channels,
    const I inner_vecs, const int splits, const int lanes,
    SumPair<typename acc_of<T>::type>* __restrict__ partials, unsigned int* __restrict__ counters,
    const double* mean64, const typename acc_of<T>::type* mean_acc,
    const typename acc_of<T>::type* invstd, const typename acc_of<T>::type* weight,
    const double count, const int training, typename acc_of<T>::type* grad_weight,
    typename acc_of<T>::type* grad_bias, typename acc_of<T>::type* center,
    typename acc_of<T>::type* coef_a, typename acc_of<T>::type* coef_b,
    typename acc_of<T>::type* coef_c) {
    const GradOp<T> op = {{},          mean64,    mean_acc, invstd, weight, count,
                          training,    grad_weight, grad_bias, center, coef_a, coef_b, coef_c};
    if (CL)
        reduce_nhwc<GradOp<T>, V, I>(op, x, dy, rows, inner_vecs, splits, lanes, partials,
                                     counters);
    else
        reduce_nchw<GradOp<T>, V, I>(op, x, dy, rows, channels, inner_vecs, splits, partials,
                                     counters);
}

// dx = a[c] * dy + b[c] * (x - center[c]) + c[c], flat grid-stride over vectors.
template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256) backward_apply(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const I total_vecs,
    const I channels, const I inner_vecs, const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ coef_a,
    const typename acc_of<T>::type* __restrict__ coef_b,
    const typename acc_of<T>::type* __restrict__ coef_c) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* gv = reinterpret_cast<const vec*>(dy);
    vec* dxv = reinterpret_cast<vec*>(dx);
    const I stride = (I)gridDim.x * blockDim.x;
    for (I j = (I)blockIdx.x * blockDim.x + threadIdx.x; j < total_vecs; j += stride) {
        const vec xi = xv[j], gi = gv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const I c = channel_of<CL>(j, k, channels, inner_vecs, V);
            out.v[k] = from_acc<T>(coef_a[c] * to_acc(gi.v[k]) +
                                   coef_b[c] * (to_acc(xi.v[k]) - center[c]) + coef_c[c]);
        }
        dxv[j] = out;
    }
}

// Gradient through a fused ReLU: g = dy where the forward output (recomputed from x, the
// forward's coefficients and the residual, rounded to T as the forward stored it) is > 0, else 0.
template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256) relu_grad(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    T* __restrict__ g, const I total_vecs, const I channels, const I inner_vecs,
    const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ scale,
    const typename acc_of<T>::type* __restrict__ shift) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* zv = reinterpret_cast<const vec*>(residual);
    const vec* gv = reinterpret_cast<const vec*>(dy);
    vec* outv = reinterpret_cast<vec*>(g);
    const T zero = from_acc<T>(A(0));
    const I stride = (I)gridDim.x * blockDim.x;
    for (I j = (I)blockIdx.x * blockDim.x + threadIdx.x; j < total_vecs; j += stride) {
        const vec xi = xv[j], gi = gv[j];
        vec z;
        if (residual) z = zv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const I c = channel_of<CL>(j, k, channels, inner_vecs, V);
            const A v = pre_activation(to_acc(xi.v[k]), center[c], scale[c], shift[c],
                                       residual != 0, residual ? to_acc(z.v[k]) : A(0));
            out.v[k] = to_acc(from_acc<T>(v)) > A(0) ? gi.v[k] : zero;
        }
        outv[j] = out;
    }
}

// LayerNorm's per-row sums: sum(w[col] * dy) and sum(w[col] * dy * (x - center[row])).
template <typename TT> struct RowGradOp : SumOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 1 };

    const A* center;
    const A* weight;
    A* sum_wdy;
    A* sum_wdy_xmu;

    template <typename I> __device__ A context(const A, const I row) const { return center[row]; }
    __device__ A dy_scale(const unsigned long long col) const { return weight ? weight[col] : A(1); }
    template <typename I> __device__ void finalize(const SumPair<A> s, const I row, const A) const {
        sum_wdy[row] = s.dy;
        sum_wdy_xmu[row] = s.dy_xmu;
    }
};

// Grid: ceil(rows / (256 / height)) blocks of 256 threads.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256) row_grad_sums(
    const T* __restrict__ dy, const T* __restrict__ x, const I rows, const I row_vecs,
    const int height, const typename acc_of<T>::type* center,
    const typename acc_of<T>::type* weight, typename acc_of<T>::type* sum_wdy,
    typename acc_of<T>::type* sum_wdy_xmu) {
    const RowGradOp<T> op = {{}, center, weight, sum_wdy, sum_wdy_xmu};
    reduce_rows<RowGradOp<T>, V, I>(op, x, dy, rows, row_vecs, height);
}

// The input gradient of the normalizations over groups (see group_of for L):
//   dx = p[g] * w[c] * dy + q[g] * ((x - center[g]) - residual[g]) + r[g].
template <typename T, int V, typename I, int L>
__global__ void __launch_bounds__(256) group_backward_apply(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const I total_vecs,
    const I channels, const I inner_vecs, const I sample_vecs, const I group_channels,
    const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ residual,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ p, const typename acc_of<T>::type* __restrict__ q,
    const typename acc_of<T>::type* __restrict__ r) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* gv = reinterpret_cast<const vec*>(dy);
    vec* dxv = reinterpret_cast<vec*>(dx);
    const I stride = (I)gridDim.x * blockDim.x;
    for (I j = (I)blockIdx.x * blockDim.x + threadIdx.x; j < total_vecs; j += stride) {
        const vec xi = xv[j], gi = gv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            I g, c;
            group_of<L>(j, k, channels, inner_vecs, sample_vecs, group_channels, V, g, c);
            const A w = weight ? weight[c] : A(1);
            out.v[k] = from_acc<T>(p[g] * w * to_acc(gi.v[k]) +
                                   q[g] * ((to_acc(xi.v[k]) - center[g]) - residual[g]) + r[g]);
        }
        dxv[j] = out;
    }
}

}  // namespace bncupy
