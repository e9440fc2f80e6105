// CUDA C++ on the CPU, for testing a kernel's logic on machines without a GPU: one OS thread per
// CUDA thread, blocks one after another. Enough of CUDA for kernels/map.cu and kernels/decode.cu,
// and no more (f32 only: no half types):
//   - __shared__ variables are statics (one block runs at a time);
//   - __syncthreads is a barrier over the block's threads;
//   - grids of one or two dimensions, blocks of one;
//   - __shfl_down_sync, __shfl_up_sync, __shfl_xor_sync and __ballot_sync must be called by all 32 lanes of the warp (mask FULL),
//     __match_any_sync by exactly the lanes in its mask (as CUDA requires), each through its own
//     barrier, so a warp's lanes may sit in different ones at once as they can on a GPU.
// Real threads interleave as the OS schedules them, so a missing __syncthreads shows up as a
// wrong answer some of the time, as on a GPU. Float arithmetic is the CPU's (no fused
// multiply-add unless the compiler contracts), so results agree with a GPU's to rounding only.
#pragma once
#include <atomic>
#include <barrier>
#include <bit>
#include <cassert>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

namespace emu {
// A barrier for a count given at each wait (the lanes of a partial warp mask).
struct CountBarrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned arrived = 0;
    uint64_t generation = 0;
    void wait(unsigned count) {
        std::unique_lock<std::mutex> l(m);
        uint64_t g = generation;
        if (++arrived == count) {
            arrived = 0;
            ++generation;
            cv.notify_all();
        } else {
            cv.wait(l, [&] { return generation != g; });
        }
    }
};
struct Warp {
    CountBarrier full, partial;  // mask-FULL operations; partial-mask operations
    uint64_t slot[32], pslot[32];
};
struct Block {
    std::barrier<> sync;
    std::vector<Warp> warps;
    Block(unsigned threads) : sync(threads), warps(threads / 32) {}
};
inline Block *block = nullptr;

inline Warp &warp() { return block->warps[threadIdx.x / 32]; }
inline unsigned lane() { return threadIdx.x & 31; }

// Launch `kernel(args...)` on `grid` × `grid_y` blocks of `threads` threads (a multiple of 32).
template <class F> void launch(unsigned grid, unsigned threads, F kernel, unsigned grid_y = 1) {
    assert(threads % 32 == 0);
    gridDim = {grid, grid_y, 1};
    blockDim = {threads, 1, 1};
    for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned b = 0; b < grid; ++b) {
            Block blk(threads);
            block = &blk;
            std::vector<std::thread> ts;
            ts.reserve(threads);
            for (unsigned t = 0; t < threads; ++t)
                ts.emplace_back([=] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {b, by, 0};
                    kernel();
                });
            for (auto &t : ts) t.join();
            block = nullptr;
        }
}
}  // namespace emu

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }

namespace emu {
// Lane `from(lane)`'s v, or this lane's own where that is outside the warp (-1 or 32 and up).
template <class T, class F> T shfl(unsigned mask, T v, F from) {
    static_assert(sizeof(T) <= 8);
    assert(mask == 0xffffffffu);
    Warp &w = warp();
    unsigned l = lane();
    std::memcpy(&w.slot[l], &v, sizeof(T));
    w.full.wait(32);
    T r = v;
    int src = from((int)l);
    if (src >= 0 && src < 32) std::memcpy(&r, &w.slot[src], sizeof(T));
    w.full.wait(32);
    return r;
}
}  // namespace emu

template <class T> T __shfl_down_sync(unsigned mask, T v, unsigned off) {
    return emu::shfl(mask, v, [=](int l) { return l + (int)off; });
}

template <class T> T __shfl_up_sync(unsigned mask, T v, unsigned off) {
    return emu::shfl(mask, v, [=](int l) { return l - (int)off; });
}

template <class T> T __shfl_xor_sync(unsigned mask, T v, unsigned bits) {
    return emu::shfl(mask, v, [=](int l) { return l ^ (int)bits; });
}

inline unsigned __ballot_sync(unsigned mask, bool pred) {
    assert(mask == 0xffffffffu);
    emu::Warp &w = emu::warp();
    w.slot[emu::lane()] = pred;
    w.full.wait(32);
    unsigned r = 0;
    for (unsigned i = 0; i < 32; ++i) r |= (w.slot[i] ? 1u : 0u) << i;
    w.full.wait(32);
    return r;
}

inline unsigned __match_any_sync(unsigned mask, uint32_t v) {
    emu::Warp &w = emu::warp();
    unsigned l = emu::lane(), n = std::popcount(mask);
    assert(mask >> l & 1u);
    w.pslot[l] = v;
    w.partial.wait(n);
    unsigned r = 0;
    for (unsigned i = 0; i < 32; ++i)
        if ((mask >> i & 1u) && w.pslot[i] == v) r |= 1u << i;
    w.partial.wait(n);
    return r;
}

inline uint32_t atomicAdd(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
[[noreturn]] inline void __trap() { abort(); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline uint32_t __float_as_uint(float x) { return std::bit_cast<uint32_t>(x); }
inline float __uint_as_float(uint32_t x) { return std::bit_cast<float>(x); }
