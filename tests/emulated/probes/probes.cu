// Probe kernels for the CPU execution target's self-tests (tests/test_emulated.py): each shows one
// piece of CUDA semantics the emulator must model, or one bug it must make loud.

// out[t] = value lane t receives from __shfl_*_sync(full mask, 100 * lane, arg, width).
template <int KIND>
__global__ void shuffle_probe(int* out, const int arg, const int width) {
    const int lane = threadIdx.x & 31;
    int v = 100 * lane;
    if (KIND == 0) v = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width);
    if (KIND == 1) v = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width);
    if (KIND == 2) v = __shfl_xor_sync(0xffffffffu, v, arg, width);
    if (KIND == 3) v = __shfl_sync(0xffffffffu, v, arg, width);
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Lanes >= 16 exit; the rest shuffle with the full mask (names exited lanes: an error).
__global__ void shuffle_after_exit(int* out) {
    if ((threadIdx.x & 31) >= 16) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, (int)threadIdx.x, 1u);
}

// Half a warp waits at __syncthreads, the other half in a full-warp shuffle: a deadlock.
__global__ void barrier_shuffle_deadlock(int* out) {
    if ((threadIdx.x & 31) < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
    }
}

// Threads >= 32 exit early; the rest pass a barrier (exited threads leave barriers, sm_70+).
__global__ void barrier_after_exit(int* out) {
    __shared__ int s[64];
    if (threadIdx.x >= 32) return;
    s[threadIdx.x] = (int)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[31 - threadIdx.x];
}

// out[block] = the order in which blocks ran.
__global__ void block_order(unsigned int* ticket, unsigned int* out) {
    if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(ticket, 1u);
}

// Block 0 waits for block 1: hangs when block 0 runs first (blocks are not co-resident).
__global__ void spin_on_other_block(unsigned int* flag) {
    if (blockIdx.x == 1 && threadIdx.x == 0) atomicExch(flag, 1u);
    if (blockIdx.x == 0 && threadIdx.x == 0)
        while (atomicAdd(flag, 0u) == 0u) {
        }
}

// Reads shared memory no thread wrote.
__global__ void read_unwritten_shared(float* out) {
    __shared__ float s[256];
    if (threadIdx.x == 0) s[0] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// Dynamic shared memory: thread t writes float t of it, except the last, and reads float t + 1
// (the last thread float 0) after a barrier: float 63, unwritten, reads as NaN.
__global__ void dynamic_shared_neighbours(float* out) {
    BNCUPY_DYNAMIC_SHARED(bytes);
    float* s = reinterpret_cast<float*>(bytes);
    if (threadIdx.x + 1 < blockDim.x) s[threadIdx.x] = (float)(blockIdx.x * 1000 + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Writes one element past n.
__global__ void write_past_end(float* out, const unsigned int n) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

// out[i] = a * in[i] + b (argument-kind checks).
__global__ void axpb(const float* in, float* out, const unsigned int n, const float a,
                     const double b) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)(a * in[i] + b);
}
