// One decoding step's small kernels on the GPU, fused: what candle runs as ~22 launches per
// layer (three projections, two RoPEs, two cache writes, five attention ops, a residual add, a
// norm, two projections, SiLU and a product) becomes 9 with the projections' weights stacked
// (Q·K·V and gate·up, one cuBLAS product each) and these four kernels (the last residual add
// shares add_rms_norm with the next block's norm). Each launch costs the host some microseconds,
// several hundred times per token (src/model/fused.rs).
//
// Arithmetic is f32 throughout, rounded to the model's dtype once per output (candle rounds
// after each op): results agree with the unfused path to the dtype's rounding.
// src/model/fused.rs holds the same arithmetic in candle ops (the CPU path, and the reference
// the emulated kernels are tested against: backend/tests/decode_kernels_on_cpu.rs).
#include <stdint.h>
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define FULL 0xffffffffu
// A loop nvcc unrolls (host compilers, for the emulated kernels, do as they like).
#ifdef __CUDACC__
#define UNROLLED _Pragma("unroll")
#else
#define UNROLLED
#endif
// Warps per block of the attention kernel, each over every ATT_WARPS-th key (fused.rs launches
// 32 × this many threads: ATTENTION_THREADS).
#define ATT_WARPS 16
// Keys a warp of the attention kernel reads at once.
#define ATT_KEYS 4
// Largest head dim the attention kernel takes (a multiple of 32): 8 values per lane.
#define MAX_HEAD_DIM 256

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ void store(float *p, float x) { *p = x; }
#ifdef __CUDACC__
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void store(__half *p, float x) { *p = __float2half(x); }
#endif

// Every lane gets the warp's sum.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// RoPE of a step's queries and keys, and the keys and values written into the cache.
// qkv: [rows, (h + 2 kvh) d], each row its Q heads, K heads, V heads (the stacked projection's
// output). Block (row, slot): slot < h is query head slot, rotated into q_out [rows, h, d]; then
// kvh key heads, rotated into k_cache [rows, kvh, cap, d] at position `at` = *pos; then kvh
// value heads, copied into v_cache there. cos_table, sin_table: the RoPE tables, d / 2 per
// position, read at row `at`. The position is read from device memory, not passed by value, so
// that a captured CUDA graph replays the step at whatever position the host last wrote there.
// Rotation as candle's rope (halves: x[i], x[i + d/2]) or rope_i (pairs: x[2i], x[2i + 1]).
template <class T>
__device__ void rope_append(const T *qkv, const T *cos_table, const T *sin_table, const uint32_t *pos, T *q_out, T *k_cache, T *v_cache,
                            uint32_t h, uint32_t kvh, uint32_t d, uint64_t cap, uint32_t interleaved) {
    const uint32_t row = blockIdx.x, slot = blockIdx.y, half = d / 2;
    const uint64_t at = *pos;
    if (at >= cap) __trap();  // the host checks this before a launch; a replay must not write past
    const T *cos = cos_table + at * half, *sin = sin_table + at * half;
    const T *src = qkv + ((uint64_t)row * (h + 2 * kvh) + slot) * d;
    if (slot >= h + kvh) {
        T *dst = v_cache + (((uint64_t)row * kvh + (slot - h - kvh)) * cap + at) * d;
        for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
        return;
    }
    T *dst = slot < h ? q_out + ((uint64_t)row * h + slot) * d : k_cache + (((uint64_t)row * kvh + (slot - h)) * cap + at) * d;
    for (uint32_t i = threadIdx.x; i < half; i += blockDim.x) {
        const uint32_t i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
        const float c = to_f(cos[i]), s = to_f(sin[i]), x1 = to_f(src[i1]), x2 = to_f(src[i2]);
        store(dst + i1, x1 * c - x2 * s);
        store(dst + i2, x1 * s + x2 * c);
    }
}

// One query position's attention over the first `len` = *pos + 1 positions of the cache (the
// step's own key included), grouped heads:
// query head j reads key/value head j / (h / kvh). Block = (row, query head), ATT_WARPS warps
// (a decoding step has few blocks: rows × heads, 32 for one row of Llama 3.1 8B):
// warp w takes keys ATT_KEYS at a time, the w-th group of every ATT_WARPS × ATT_KEYS, each lane
// d / 32 of the head's dims, with an online softmax (running max m, sum l, weighted values acc);
// the warps' partial results are merged at the end. q: [rows, h, d]; out: [rows, h, d]
// (= [rows, h d], ready for the output projection).
template <class T>
__device__ void decode_attention(const T *q, const T *k_cache, const T *v_cache, T *out, uint32_t h, uint32_t kvh, uint32_t d, uint64_t cap,
                                 const uint32_t *pos, float scale) {
    if (blockDim.x != 32 * ATT_WARPS) __trap();  // the shared arrays below hold ATT_WARPS warps
    const uint64_t len = (uint64_t)*pos + 1;
    if (len > cap) __trap();
    const uint32_t row = blockIdx.x, head = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32, per = d / 32;
    const uint32_t g = head / (h / kvh);
    const T *qr = q + ((uint64_t)row * h + head) * d;
    const T *kr = k_cache + ((uint64_t)row * kvh + g) * cap * d;
    const T *vr = v_cache + ((uint64_t)row * kvh + g) * cap * d;
    // Loops over a lane's dims run to the most there can be, so that these stay in registers.
    float qv[MAX_HEAD_DIM / 32], acc[MAX_HEAD_DIM / 32];
UNROLLED
    for (uint32_t i = 0; i < MAX_HEAD_DIM / 32; ++i) {
        qv[i] = i < per ? to_f(qr[lane + 32 * i]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    // A warp reads ATT_KEYS keys at a time (independent loads in flight), then folds them into
    // its running softmax at once.
    float m = -INFINITY, l = 0.0f;
    for (uint64_t j0 = (uint64_t)warp * ATT_KEYS; j0 < len; j0 += ATT_WARPS * ATT_KEYS) {
        float s[ATT_KEYS];
        UNROLLED
        for (uint32_t u = 0; u < ATT_KEYS; ++u) {
            float x = 0.0f;
            if (j0 + u < len) {
                const T *key = kr + (j0 + u) * d + lane;
                UNROLLED
                for (uint32_t i = 0; i < MAX_HEAD_DIM / 32; ++i)
                    if (i < per) x += qv[i] * to_f(key[32 * i]);
            }
            s[u] = x;
        }
        float mn = m;
        UNROLLED
        for (uint32_t u = 0; u < ATT_KEYS; ++u) {
            s[u] = warp_sum(s[u]);
            if (j0 + u < len) mn = fmaxf(mn, s[u]);
        }
        // mn is finite (key j0 is one of these), so corr is 0 the first time, when m is -inf.
        const float corr = expf(m - mn);
        float p[ATT_KEYS];
        l *= corr;
        UNROLLED
        for (uint32_t u = 0; u < ATT_KEYS; ++u) {
            p[u] = j0 + u < len ? expf(s[u] - mn) : 0.0f;
            l += p[u];
        }
        UNROLLED
        for (uint32_t i = 0; i < MAX_HEAD_DIM / 32; ++i) {
            if (i >= per) continue;
            float a = acc[i] * corr;
            UNROLLED
            for (uint32_t u = 0; u < ATT_KEYS; ++u)
                if (j0 + u < len) a += p[u] * to_f(vr[(j0 + u) * d + lane + 32 * i]);
            acc[i] = a;
        }
        m = mn;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS], sacc[ATT_WARPS][MAX_HEAD_DIM];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
UNROLLED
    for (uint32_t i = 0; i < MAX_HEAD_DIM / 32; ++i)
        if (i < per) sacc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    // Every key went to some warp; a warp that had none holds m = -inf, l = 0 and adds nothing.
    float mx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, sm[w]);
    float total = 0.0f, wt[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; ++w) {
        wt[w] = sl[w] == 0.0f ? 0.0f : expf(sm[w] - mx);
        total += sl[w] * wt[w];
    }
    T *o = out + ((uint64_t)row * h + head) * d;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) v += sacc[w][i] * wt[w];
        store(o + i, v / total);
    }
}

// The residual add and the norm after it, per row of n: sum = x + y (rounded to T, as the
// unfused add is), normed = sum / rms(sum) · w (as candle's rmsnorm: f32, rounded once).
// blockDim.x is a multiple of 32 up to 1024.
template <class T>
__device__ void add_rms_norm(const T *x, const T *y, const T *w, T *sum, T *normed, uint32_t n, float eps) {
    const uint64_t base = (uint64_t)blockIdx.x * n;
    float ss = 0.0f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        store(sum + base + i, to_f(x[base + i]) + to_f(y[base + i]));
        const float s = to_f(sum[base + i]);
        ss += s * s;
    }
    ss = warp_sum(ss);
    __shared__ float part[32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.0f;
    for (uint32_t i = 0; i < blockDim.x / 32; ++i) total += part[i];
    const float scale = rsqrtf(total / n + eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) store(normed + base + i, scale * to_f(sum[base + i]) * to_f(w[i]));
}

// The gated MLP's activation from the stacked gate·up product: gu [rows, 2n] (gate, then up) ->
// out [rows, n] = silu(gate) · up.
template <class T> __device__ void silu_mul(const T *gu, T *out, uint32_t n, uint64_t total) {
    const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const uint64_t row = idx / n, col = idx % n;
    const float g = to_f(gu[row * 2 * n + col]), u = to_f(gu[row * 2 * n + n + col]);
    store(out + idx, g / (1.0f + expf(-g)) * u);
}

#define DECODE_KERNELS(T, NAME)                                                                                                           \
    extern "C" __global__ void rope_append_##NAME(const T *qkv, const T *cos, const T *sin, const uint32_t *pos, T *q_out, T *k_cache,   \
                                                  T *v_cache, uint32_t h, uint32_t kvh, uint32_t d, uint64_t cap, uint32_t interleaved) { \
        rope_append(qkv, cos, sin, pos, q_out, k_cache, v_cache, h, kvh, d, cap, interleaved);                                            \
    }                                                                                                                                      \
    extern "C" __global__ void decode_attention_##NAME(const T *q, const T *k_cache, const T *v_cache, T *out, uint32_t h, uint32_t kvh,  \
                                                       uint32_t d, uint64_t cap, const uint32_t *pos, float scale) {                      \
        decode_attention(q, k_cache, v_cache, out, h, kvh, d, cap, pos, scale);                                                           \
    }                                                                                                                                      \
    extern "C" __global__ void add_rms_norm_##NAME(const T *x, const T *y, const T *w, T *sum, T *normed, uint32_t n, float eps) {        \
        add_rms_norm(x, y, w, sum, normed, n, eps);                                                                                       \
    }                                                                                                                                      \
    extern "C" __global__ void silu_mul_##NAME(const T *gu, T *out, uint32_t n, uint64_t total) { silu_mul(gu, out, n, total); }

DECODE_KERNELS(float, f32)
#ifdef __CUDACC__
DECODE_KERNELS(__nv_bfloat16, bf16)
DECODE_KERNELS(__half, f16)
#endif
