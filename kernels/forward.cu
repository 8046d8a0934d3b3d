// bncupy forward kernels. Channel-first data is a contiguous (rows, C, inner) view (NCHW is
// (N, C, H*W), (N, C) is (N, C, 1)); channels-last data (CL) is a contiguous (rows, C) view.
//
// T: element type (half_t, float, double); A: accumulator (float, or double for double);
// V: elements per vector load (16 bytes when the innermost extent is a multiple of V and the
// pointers are aligned, else 1); I: index type (unsigned int below 2^31 elements, else 64-bit).
#include "reduce.cuh"

namespace bncupy {

// Training statistics. Values are shifted by a per-channel pilot (the channel's first value)
// before entering Welford, so a large mean costs no precision. The channel's last block writes
//   save_mean, save_invstd, mean64 (the mean in double, for the backward pass), the apply
//   coefficients center/scale/shift (y = (x - center) * scale + shift: center + residual is the
//   exact mean and shift absorbs the residual, so a constant channel maps to exactly beta), the
//   running-statistics update, and (when m2_out is given) the sum of squared deviations.
template <typename TT> struct StatsOp : WelfordOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 0 };

    const A* weight;
    const A* bias;
    A* running_mean;
    A* running_var;
    A eps;
    double momentum;
    double count;
    A* save_mean;
    A* save_invstd;
    double* mean64;
    A* center;
    A* scale;
    A* shift;
    A* m2_out;

    template <typename I>
    __device__ void finalize(const Welford<A> w, const I c, const A pilot) const {
        const A var = w.m2 / A(count);
        const A invstd = A(1) / sqrt(var + eps);
        const A mid = pilot + w.mean;
        const A residual = w.mean - (mid - pilot);  // exact when |pilot| >= |w.mean| (Fast2Sum)
        const A g = weight ? weight[c] : A(1);
        const A b = bias ? bias[c] : A(0);
        const double m = (double)pilot + (double)w.mean;
        save_mean[c] = mid;
        save_invstd[c] = invstd;
        mean64[c] = m;
        center[c] = mid;
        scale[c] = g * invstd;
        shift[c] = b - residual * (g * invstd);
        if (m2_out) m2_out[c] = w.m2;
        if (running_mean) {
            const double unbiased = (double)var * (count / (count - 1.0));
            running_mean[c] = (A)((1.0 - momentum) * (double)running_mean[c] + momentum * m);
            running_var[c] = (A)((1.0 - momentum) * (double)running_var[c] + momentum * unbiased);
        }
    }
};

// Grid: channel-first, C * splits blocks; channels-last, ceil(C / V / lanes) * splits blocks.
// inner_vecs is inner / V (channel-first) or C / V (channels-last).
template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256) forward_stats(
    const T* __restrict__ x, const I rows, const I channels, const I inner_vecs, const int splits,
    const int lanes, Welford<typename acc_of<T>::type>* __restrict__ partials,
    unsigned int* __restrict__ counters, const typename acc_of<T>::type* weight,
    const typename acc_of<T>::type* bias, typename acc_of<T>::type* running_mean,
    typename acc_of<T>::type* running_var, const typename acc_of<T>::type eps,
    const double momentum, const double count, typename acc_of<T>::type* save_mean,
    typename acc_of<T>::type* save_invstd, double* mean64, typename acc_of<T>::type* center,
    typename acc_of<T>::type* scale, typename acc_of<T>::type* shift,
    typename acc_of<T>::type* m2_out) {
    const StatsOp<T> op = {{},          weight,      bias,   running_mean, running_var,
                           eps,         momentum,    count,  save_mean,    save_invstd,
                           mean64,      center,      scale,  shift,        m2_out};
    if (CL)
        reduce_nhwc<StatsOp<T>, V, I>(op, x, (const T*)0, rows, inner_vecs, splits, lanes,
                                      partials, counters);
    else
        reduce_nchw<StatsOp<T>, V, I>(op, x, (const T*)0, rows, channels, inner_vecs, splits,
                                      partials, counters);
}

// Evaluation coefficients from the running statistics (one thread per channel).
template <typename A>
__global__ void eval_coefficients(const int channels, const A* __restrict__ running_mean,
                                  const A* __restrict__ running_var, const A* __restrict__ weight,
                                  const A* __restrict__ bias, const A eps,
                                  A* __restrict__ save_invstd, A* __restrict__ center,
                                  A* __restrict__ scale, A* __restrict__ shift) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const A invstd = A(1) / sqrt(running_var[c] + eps);
    save_invstd[c] = invstd;
    center[c] = running_mean[c];
    scale[c] = (weight ? weight[c] : A(1)) * invstd;
    shift[c] = bias ? bias[c] : A(0);
}

// ReLU that keeps NaN (max() would turn it into 0).
template <typename A> __device__ __forceinline__ A relu(const A v) { return v < A(0) ? A(0) : v; }

// y = act((x - center[c]) * scale[c] + shift[c] + residual), act = ReLU when relu != 0;
// residual may be null. Flat grid-stride loop over vectors.
template <typename T, int V, typename I, bool CL>
__global__ void __launch_bounds__(256) apply(
    const T* __restrict__ x, T* __restrict__ y, const I total_vecs, const I channels,
    const I inner_vecs, const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ scale,
    const typename acc_of<T>::type* __restrict__ shift, const T* __restrict__ residual,
    const int relu_flag) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* zv = reinterpret_cast<const vec*>(residual);
    vec* yv = reinterpret_cast<vec*>(y);
    const I stride = (I)gridDim.x * blockDim.x;
    for (I j = (I)blockIdx.x * blockDim.x + threadIdx.x; j < total_vecs; j += stride) {
        const vec in = xv[j];
        vec z;
        if (residual) z = zv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const I c = channel_of<CL>(j, k, channels, inner_vecs, V);
            const A v = pre_activation(to_acc(in.v[k]), center[c], scale[c], shift[c],
                                       residual != 0, residual ? to_acc(z.v[k]) : A(0));
            out.v[k] = from_acc<T>(relu_flag ? relu(v) : v);
        }
        yv[j] = out;
    }
}

// Statistics of contiguous rows (LayerNorm rows, channel-first GroupNorm/InstanceNorm groups):
// each row's mean (double) and sum of squared deviations.
template <typename TT> struct RowStatsOp : WelfordOps<typename acc_of<TT>::type> {
    typedef TT T;
    typedef typename acc_of<T>::type A;
    enum { needs_dy = 0 };

    double* mean64;
    A* m2;

    template <typename I>
    __device__ void finalize(const Welford<A> w, const I row, const A pilot) const {
        mean64[row] = (double)pilot + (double)w.mean;
        m2[row] = w.m2;
    }
};

// Several rows per block (see reduce_rows). At least 4 blocks per SM: without the bound, ptxas
// spills a few bytes for double rows with 64-bit indices.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256, 4) row_stats(const T* __restrict__ x, const I rows,
                                                 const I row_vecs, const int height,
                                                 double* mean64,
                                                 typename acc_of<T>::type* m2) {
    const RowStatsOp<T> op = {{}, mean64, m2};
    reduce_rows<RowStatsOp<T>, V, I>(op, x, (const T*)0, rows, row_vecs, height);
}

// The normalizations over groups (see group_of for L):
//   y = ((x - center[g]) - residual[g]) * (invstd[g] * w[c]) + b[c],
// center[g] + residual[g] being the group's mean (a constant group maps to exactly b[c]).
template <typename T, int V, typename I, int L>
__global__ void __launch_bounds__(256) group_apply(
    const T* __restrict__ x, T* __restrict__ y, const I total_vecs, const I channels,
    const I inner_vecs, const I sample_vecs, const I group_channels,
    const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ residual,
    const typename acc_of<T>::type* __restrict__ invstd,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ bias) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const vec* xv = reinterpret_cast<const vec*>(x);
    vec* yv = reinterpret_cast<vec*>(y);
    const I stride = (I)gridDim.x * blockDim.x;
    for (I j = (I)blockIdx.x * blockDim.x + threadIdx.x; j < total_vecs; j += stride) {
        const vec in = xv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            I g, c;
            group_of<L>(j, k, channels, inner_vecs, sample_vecs, group_channels, V, g, c);
            const A s = invstd[g] * (weight ? weight[c] : A(1));
            out.v[k] = from_acc<T>(((to_acc(in.v[k]) - center[g]) - residual[g]) * s +
                                   (bias ? bias[c] : A(0)));
        }
        yv[j] = out;
    }
}

}  // namespace bncupy
