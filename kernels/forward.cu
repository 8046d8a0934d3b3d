// bncupy forward kernels for a contiguous (A, C, B) view: channel c's values are the A rows
// x[a, c, 0:B]. NCHW is (N, C, H*W); (N, C) is (N, C, 1).
//
// T: element type (half_t, float, double); A: accumulator (float, or double for double);
// V: elements per vector load (16 bytes when B % V == 0 and pointers are aligned, else 1);
// I: index type (unsigned int below 2^31 elements, unsigned long long above).
#include "welford.cuh"

namespace bncupy {

// Vectors in flight per thread and loop trip: independent Welford chains hide latency.
template <int V> struct unroll_of { enum { value = V >= 8 ? 2 : 4 }; };

// Training statistics. Grid: C * splits blocks, block b handles channel b / splits and the
// (b % splits)-th slice of that channel's A * B / V vectors. Each block writes one Welford
// partial; the last block of a channel merges the partials in split order and writes:
//   save_mean, save_invstd (A), mean64 (double, for the backward pass), the apply coefficients
//   center/scale/shift (y = (x - center) * scale + shift), the running-statistics update, and
//   (if m2_out is given) the sum of squared deviations for mergeable statistics.
// Values are shifted by a pilot (the channel's first element) before accumulating, so a large
// mean costs no precision; center + residual is the exact mean, and shift absorbs the residual.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256) forward_stats(
    const T* __restrict__ x, const I rows, const I channels, const I inner_vecs, const int splits,
    Welford<typename acc_of<T>::type>* __restrict__ partials, unsigned int* __restrict__ counters,
    const typename acc_of<T>::type* __restrict__ weight,
    const typename acc_of<T>::type* __restrict__ bias,
    typename acc_of<T>::type* __restrict__ running_mean,
    typename acc_of<T>::type* __restrict__ running_var,
    const typename acc_of<T>::type eps, const double momentum, const double count,
    typename acc_of<T>::type* __restrict__ save_mean,
    typename acc_of<T>::type* __restrict__ save_invstd, double* __restrict__ mean64,
    typename acc_of<T>::type* __restrict__ center, typename acc_of<T>::type* __restrict__ scale,
    typename acc_of<T>::type* __restrict__ shift, typename acc_of<T>::type* __restrict__ m2_out) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const int U = unroll_of<V>::value;
    __shared__ Welford<A> scratch[32];

    const I c = blockIdx.x / splits;
    const I split = blockIdx.x % splits;
    const unsigned long long per_channel = (unsigned long long)rows * inner_vecs;
    const I begin = (I)(per_channel * split / splits);
    const I end = (I)(per_channel * (split + 1) / splits);
    const vec* xv = reinterpret_cast<const vec*>(x);
    const A pilot = to_acc(x[(size_t)c * inner_vecs * V]);

    A mean[U][V], m2[U][V], n[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        n[u] = A(0);
#pragma unroll
        for (int k = 0; k < V; ++k) mean[u][k] = m2[u][k] = A(0);
    }
    for (I j0 = begin + threadIdx.x; j0 < end; j0 += U * blockDim.x) {
        vec buf[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const I j = j0 + u * blockDim.x;
            if (j < end) {
                const I a = j / inner_vecs;
                buf[u] = xv[(a * channels + c) * inner_vecs + (j - a * inner_vecs)];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j0 + u * blockDim.x < end) {
                n[u] += A(1);
                const A r = A(1) / n[u];
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A y = to_acc(buf[u].v[k]) - pilot;
                    const A d = y - mean[u][k];
                    mean[u][k] += d * r;
                    m2[u][k] += d * (y - mean[u][k]);
                }
            }
        }
    }
    Welford<A> w = welford_empty<A>();
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            Welford<A> s;
            s.mean = mean[u][k];
            s.m2 = m2[u][k];
            s.n = n[u];
            w = merge(w, s);
        }
    }
    w = block_reduce(w, scratch, welford_empty<A>());
    if (threadIdx.x == 0) partials[blockIdx.x] = w;
    if (!last_block_done(&counters[c], (unsigned int)splits)) return;

    w = welford_empty<A>();
    for (int s = threadIdx.x; s < splits; s += blockDim.x)
        w = merge(w, load_cg(&partials[(size_t)c * splits + s]));
    w = block_reduce(w, scratch, welford_empty<A>());
    if (threadIdx.x != 0) return;

    const A var = w.m2 / A(count);
    const A invstd = A(1) / sqrt(var + eps);
    const A mid = pilot + w.mean;
    const A residual = w.mean - (mid - pilot);  // exact when |pilot| >= |w.mean| (Fast2Sum)
    const A g = weight ? weight[c] : A(1);
    const A b = bias ? bias[c] : A(0);
    save_mean[c] = mid;
    save_invstd[c] = invstd;
    mean64[c] = (double)pilot + (double)w.mean;
    center[c] = mid;
    scale[c] = g * invstd;
    shift[c] = b - residual * (g * invstd);
    if (m2_out) m2_out[c] = w.m2;
    if (running_mean) {
        const double unbiased = (double)var * (count / (count - 1.0));
        running_mean[c] = (A)((1.0 - momentum) * (double)running_mean[c] + momentum * mean64[c]);
        running_var[c] = (A)((1.0 - momentum) * (double)running_var[c] + momentum * unbiased);
    }
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

// y = (x - center[c]) * scale[c] + shift[c], one vector per thread per trip, flat grid-stride.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(256) apply(
    const T* __restrict__ x, T* __restrict__ y, const I total_vecs, const I channels,
    const I inner_vecs, const typename acc_of<T>::type* __restrict__ center,
    const typename acc_of<T>::type* __restrict__ scale,
    const typename acc_of<T>::type* __restrict__ shift) {
    typedef typename acc_of<T>::type A;
    typedef vec_t<T, V> vec;
    const vec* xv = reinterpret_cast<const vec*>(x);
    vec* yv = reinterpret_cast<vec*>(y);
    const I stride = (I)gridDim.x * blockDim.x;
    for (I j = (I)blockIdx.x * blockDim.x + threadIdx.x; j < total_vecs; j += stride) {
        const I c = (j / inner_vecs) % channels;
        const A m = center[c], s = scale[c], t = shift[c];
        const vec in = xv[j];
        vec out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = from_acc<T>((to_acc(in.v[k]) - m) * s + t);
        yv[j] = out;
    }
}

}  // namespace bncupy
