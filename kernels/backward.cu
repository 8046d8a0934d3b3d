// bncupy backward kernels for a contiguous (A, C, B) view (see forward.cu for T, A, V, I).
#include "welford.cuh"

namespace bncupy {

// Per-channel sum(dy) and sum(dy * (x - center)) over the same (C * splits) grid as
// forward_stats, merged in split order by the channel's last block, which then writes
//   grad_weight = sum(dy * xhat), grad_bias = sum(dy), and the coefficients of
//   dx = a * dy + b * (x - center) + c  (training: the gradient through the batch statistics;
//   eval: b = c = 0).
// The mean comes as float64 (mean64) or in the accumulator type (mean_acc); center is it rounded
// to the accumulator type, and the rounding residual is folded into the sums and into c.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256) backward_reduce(
    const T* __restrict__ dy, const T* __restrict__ x, const I rows, const I channels,
    const I inner_vecs, const int splits, SumPair<typename acc_of<T>::type>* __restrict__ partials,
    unsigned int* __restrict__ counters, const double* __restrict__ mean64,
    const typename acc_of<T>::type* __restrict__ mean_acc,
    const typename acc_of<T>::type* __restrict__ invstd,
    const typename acc_of<T>::type* __restrict__ weight, const double count, const int training,
    typename acc_of<T>::type* __restrict__ grad_weight,
    typename acc_of<T>::type* __restrict__ grad_bias,
    typename acc_of<T>::type* __restrict__ center, typename acc_of<T>::type* __restrict__ coef_a,
    typename acc_of<T>::type* __restrict__ coef_b, typename acc_of<T>::type* __restrict__ coef_c) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const int U = V >= 8 ? 2 : 4;
    __shared__ SumPair<A> scratch[32];

    const I c = blockIdx.x / splits;
    const I split = blockIdx.x % splits;
    const unsigned long long per_channel = (unsigned long long)rows * inner_vecs;
    const I begin = (I)(per_channel * split / splits);
    const I end = (I)(per_channel * (split + 1) / splits);
    const vec* xv = reinterpret_cast<const vec*>(x);
    const vec* gv = reinterpret_cast<const vec*>(dy);
    const A m = mean64 ? (A)mean64[c] : mean_acc[c];

    SumPair<A> acc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) acc[u].dy = acc[u].dy_xmu = A(0);
    for (I j0 = begin + threadIdx.x; j0 < end; j0 += U * blockDim.x) {
        vec xb[U], gb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const I j = j0 + u * blockDim.x;
            if (j < end) {
                const I a = j / inner_vecs;
                const I offset = (a * channels + c) * inner_vecs + (j - a * inner_vecs);
                xb[u] = xv[offset];
                gb[u] = gv[offset];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j0 + u * blockDim.x < end) {
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A g = to_acc(gb[u].v[k]);
                    acc[u].dy += g;
                    acc[u].dy_xmu += g * (to_acc(xb[u].v[k]) - m);
                }
            }
        }
    }
    SumPair<A> s = acc[0];
#pragma unroll
    for (int u = 1; u < U; ++u) s = merge(s, acc[u]);
    SumPair<A> zero;
    zero.dy = zero.dy_xmu = A(0);
    s = block_reduce(s, scratch, zero);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
    if (!last_block_done(&counters[c], (unsigned int)splits)) return;

    s = zero;
    for (int p = threadIdx.x; p < splits; p += blockDim.x)
        s = merge(s, load_cg(&partials[(size_t)c * splits + p]));
    s = block_reduce(s, scratch, zero);
    if (threadIdx.x != 0) return;

    const double residual = (mean64 ? mean64[c] : (double)mean_acc[c]) - (double)m;
    const double sum_dy = s.dy;
    const double sum_dy_xmu = (double)s.dy_xmu - residual * sum_dy;
    const double inv = invstd[c];
    const double a = (weight ? (double)weight[c] : 1.0) * inv;
    double b = 0.0, cc = 0.0;
    if (training && count > 0.0) {
        b = -a * inv * inv * sum_dy_xmu / count;
        cc = -a * sum_dy / count - b * residual;
    }
    grad_bias[c] = (A)sum_dy;
    grad_weight[c] = (A)(sum_dy_xmu * inv);
    center[c] = m;
    coef_a[c] = (A)a;
    coef_b[c] = (A)b;
    coef_c[c] = (A)cc;
}

// dx = a[c] * dy + b[c] * (x - center[c]) + c[c], flat grid-stride over vectors.
template <typename T, int V, typename I>
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
        const I c = (j / inner_vecs) % channels;
        const A m = center[c], a = coef_a[c], b = coef_b[c], k0 = coef_c[c];
        const vec xi = xv[j], gi = gv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k)
            out.v[k] = from_acc<T>(a * to_acc(gi.v[k]) + b * (to_acc(xi.v[k]) - m) + k0);
        dxv[j] = out;
    }
}

}  // namespace bncupy
