// The neuron map's row reduction on the GPU: one thread block per neuron reduces that neuron's
// logits over the whole vocabulary (one row of the chunk cuBLAS just wrote) to the logsumexp of
// both polarities, the moments of the logits, and the top k of both polarities.
//
// backend/src/map/select.rs is the same algorithm in plain Rust (its CPU twin, tested on every
// machine); keep the two in step. THREADS and MAX_K must match select.rs.
#include <stdint.h>

#define THREADS 256
#define WARPS (THREADS / 32)
#define MAX_K 128
#define FULL 0xffffffffu
// Step 1's histogram: the top HBITS bits of each key (sign, exponent and 3 bits of mantissa).
#define HBITS 12
#define HBINS (1 << HBITS)
// The most candidates (keys in or above the k-th key's bin) step 3 sorts in shared memory; a row
// with more (a wide tie, logits far from zero) takes the radix select instead.
#define CAP 1024
// Loads in flight per thread in the passes over a row.
#define UNROLL 4

struct Mom {
    double n, mean, m2, m3, m4;
};

// Moments of n values from their sums of powers 1..4 of x - c (Moments::from_sums).
__device__ Mom mom_from_sums(double n, double c, double s1, double s2, double s3, double s4) {
    Mom r;
    double d = s1 / n;
    r.n = n;
    r.mean = c + d;
    r.m2 = fmax(s2 - n * d * d, 0.0);
    r.m3 = s3 - 3.0 * d * s2 + 2.0 * n * d * d * d;
    r.m4 = fmax(s4 - 4.0 * d * s3 + 6.0 * d * d * s2 - 3.0 * n * d * d * d * d, 0.0);
    return r;
}

// Both streams together (Moments::merge, Pébay 2008).
__device__ Mom mom_merge(Mom a, Mom b) {
    if (a.n == 0.0) return b;
    if (b.n == 0.0) return a;
    Mom r;
    double n = a.n + b.n, d = b.mean - a.mean;
    double d2 = d * d, d3 = d2 * d, d4 = d2 * d2;
    r.n = n;
    r.mean = a.mean + d * b.n / n;
    r.m2 = a.m2 + b.m2 + d2 * a.n * b.n / n;
    r.m3 = a.m3 + b.m3 + d3 * a.n * b.n * (a.n - b.n) / (n * n) + 3.0 * d * (a.n * b.m2 - b.n * a.m2) / n;
    r.m4 = a.m4 + b.m4 + d4 * a.n * b.n * (a.n * a.n - a.n * b.n + b.n * b.n) / (n * n * n) +
           6.0 * d2 * (a.n * a.n * b.m2 + b.n * b.n * a.m2) / (n * n) + 4.0 * d * (a.n * b.m3 - b.n * a.m3) / n;
    return r;
}

// Online logsumexp: running max m and s = sum of exp(v - m); s == 0: nothing seen.
__device__ __forceinline__ void lse_push(float &m, float &s, float v) {
    if (v == -INFINITY) return;  // adds nothing (and exp(-inf - -inf) would be NaN)
    if (v > m) {
        s = s * expf(m - v) + 1.0f;
        m = v;
    } else {
        s += expf(v - m);
    }
}

__device__ __forceinline__ void lse_merge(float &m, float &s, float om, float os) {
    if (os == 0.0f) return;
    if (s == 0.0f) {
        m = om;
        s = os;
        return;
    }
    float nm = fmaxf(m, om);
    s = s * expf(m - nm) + os * expf(om - nm);
    m = nm;
}

// A u32 with the order of the float; the key of -x is ~key(x) (select.rs: key).
__device__ __forceinline__ uint32_t okey(float x) {
    uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float okey_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// hist[bin] += 1 for every active lane, one atomic per distinct bin in the warp (the first
// passes put nearly every key in the same few bins). Called by all 32 lanes.
__device__ __forceinline__ void hist_add(uint32_t *hist, uint32_t bin, bool active) {
    unsigned act = __ballot_sync(FULL, active);
    if (active) {
        unsigned peers = __match_any_sync(act, bin);
        if ((int)(__ffs(peers) - 1) == (int)(threadIdx.x & 31)) atomicAdd(&hist[bin], (uint32_t)__popc(peers));
    }
}

// a goes before b: larger key, ties by smaller id.
__device__ __forceinline__ bool before(uint32_t ka, uint32_t ia, uint32_t kb, uint32_t ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// Bitonic sort, largest first (`before`), of the first n (a power of two, at least 2) slots of
// both polarities' arrays, polarity p's at key[p * span], id[p * span]. Called by the whole block.
__device__ void sort_both(uint32_t *key, uint32_t *id, int span, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int j = threadIdx.x; j < n; j += THREADS) {
                int p = j / (n / 2), t = j % (n / 2);
                int a = 2 * t - (t & (stride - 1)), b = a + stride;
                bool forward = (a & size) == 0;
                uint32_t *k = key + p * span, *d = id + p * span;
                uint32_t ka = k[a], ia = d[a], kb = k[b], ib = d[b];
                if (forward ? before(kb, ib, ka, ia) : before(ka, ia, kb, ib)) {
                    k[a] = kb;
                    d[a] = ib;
                    k[b] = ka;
                    d[b] = ia;
                }
            }
            __syncthreads();
        }
    }
}

// logits: [rows, vocab] row-major. Per row r (block r):
//   lse[r*2 + p]          logsumexp of polarity p (0: +x, 1: -x)
//   mom[r*4 + 0..4]       mean and central sums m2, m3, m4 of x (f64)
//   top_val[(r*2+p)*k+j]  the j-th largest logit of polarity p, top_id its token
//   *fallbacks            += 1 for a row that took the radix select (step 3b)
// Two reads of the row where step 3a applies (nearly every row of a real model), six otherwise.
extern "C" __global__ void __launch_bounds__(THREADS) map_reduce_rows(const float *__restrict__ logits, uint64_t vocab, int k,
                                                                      float *lse, double *mom, float *top_val, uint32_t *top_id,
                                                                      uint32_t *fallbacks) {
    const float *x = logits + (uint64_t)blockIdx.x * vocab;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // 1. Statistics and the histogram of the keys' top bits in one pass. Thread t reads
    //    x[t], x[t + THREADS], ... in that order, UNROLL loads at a time.
    __shared__ uint32_t bins[HBINS];
    for (int j = tid; j < HBINS; j += THREADS) bins[j] = 0;
    __syncthreads();
    float pm = -INFINITY, ps = 0.0f, nm = -INFINITY, ns = 0.0f;
    float c = (uint64_t)tid < vocab ? x[tid] : 0.0f;
    float s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f;
    double cnt = 0.0;
    for (uint64_t base = tid; base < vocab; base += UNROLL * THREADS) {
        float v[UNROLL];
        for (int u = 0; u < UNROLL; ++u) {
            uint64_t i = base + (uint64_t)u * THREADS;
            v[u] = i < vocab ? x[i] : 0.0f;
        }
        for (int u = 0; u < UNROLL; ++u) {
            if (base + (uint64_t)u * THREADS >= vocab) break;
            lse_push(pm, ps, v[u]);
            lse_push(nm, ns, -v[u]);
            float d = v[u] - c, d2 = d * d;
            s1 += d;
            s2 += d2;
            s3 += d2 * d;
            s4 += d2 * d2;
            cnt += 1.0;
            atomicAdd(&bins[okey(v[u]) >> (32 - HBITS)], 1u);
        }
    }
    Mom m = {0.0, 0.0, 0.0, 0.0, 0.0};
    if (cnt > 0.0) m = mom_from_sums(cnt, (double)c, (double)s1, (double)s2, (double)s3, (double)s4);
    for (int off = 16; off > 0; off >>= 1) {
        float opm = __shfl_down_sync(FULL, pm, off), ops = __shfl_down_sync(FULL, ps, off);
        float onm = __shfl_down_sync(FULL, nm, off), ons = __shfl_down_sync(FULL, ns, off);
        Mom o;
        o.n = __shfl_down_sync(FULL, m.n, off);
        o.mean = __shfl_down_sync(FULL, m.mean, off);
        o.m2 = __shfl_down_sync(FULL, m.m2, off);
        o.m3 = __shfl_down_sync(FULL, m.m3, off);
        o.m4 = __shfl_down_sync(FULL, m.m4, off);
        if (lane + off < 32) {
            lse_merge(pm, ps, opm, ops);
            lse_merge(nm, ns, onm, ons);
            m = mom_merge(m, o);
        }
    }
    __shared__ float w_lse[4][WARPS];
    __shared__ Mom w_mom[WARPS];
    if (lane == 0) {
        w_lse[0][warp] = pm;
        w_lse[1][warp] = ps;
        w_lse[2][warp] = nm;
        w_lse[3][warp] = ns;
        w_mom[warp] = m;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < WARPS; ++w) {
            lse_merge(pm, ps, w_lse[0][w], w_lse[1][w]);
            lse_merge(nm, ns, w_lse[2][w], w_lse[3][w]);
            m = mom_merge(m, w_mom[w]);
        }
        lse[blockIdx.x * 2 + 0] = pm + logf(ps);
        lse[blockIdx.x * 2 + 1] = nm + logf(ns);
        mom[blockIdx.x * 4 + 0] = m.mean;
        mom[blockIdx.x * 4 + 1] = m.m2;
        mom[blockIdx.x * 4 + 2] = m.m3;
        mom[blockIdx.x * 4 + 3] = m.m4;
    }

    // 2. The bin of each polarity's k-th largest key: +x counts bins from the top, -x (whose
    //    keys are the complements, so its bins mirror) from the bottom. Thread t holds bins
    //    [t * PER, (t + 1) * PER); a scan of the threads' sums finds the thread each lies in.
    const int PER = HBINS / THREADS;
    __shared__ uint32_t wsum[WARPS];
    __shared__ uint32_t sel_bin[2], sel_cnt[2];
    uint32_t sum = 0;
    for (int j = 0; j < PER; ++j) sum += bins[tid * PER + j];
    uint32_t incl = sum;
    for (int off = 1; off < 32; off <<= 1) {
        uint32_t y = __shfl_up_sync(FULL, incl, off);
        if (lane >= off) incl += y;
    }
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    uint32_t earlier = 0, total = 0;
    for (int w = 0; w < WARPS; ++w) {
        if (w < warp) earlier += wsum[w];
        total += wsum[w];
    }
    const uint32_t uk = (uint32_t)k;
    const uint32_t below = earlier + incl - sum, above = total - earlier - incl;
    if (above < uk && uk <= above + sum) {
        uint32_t n = above;
        for (int j = PER - 1; j >= 0; --j) {
            n += bins[tid * PER + j];
            if (n >= uk) {
                sel_bin[0] = tid * PER + j;
                sel_cnt[0] = n;
                break;
            }
        }
    }
    if (below < uk && uk <= below + sum) {
        uint32_t n = below;
        for (int j = 0; j < PER; ++j) {
            n += bins[tid * PER + j];
            if (n >= uk) {
                sel_bin[1] = tid * PER + j;
                sel_cnt[1] = n;
                break;
            }
        }
    }
    __syncthreads();
    const uint32_t bpos = sel_bin[0], bneg = sel_bin[1];

    if (sel_cnt[0] <= CAP && sel_cnt[1] <= CAP) {
        // 3a. Gather every key in or above the k-th's bin (at most CAP per polarity) and sort
        //     them in shared memory: the first k are the top k, ties by token id.
        __shared__ uint32_t fkey[2 * CAP], fid[2 * CAP];
        __shared__ uint32_t fcount[2];
        const uint32_t most = sel_cnt[0] > sel_cnt[1] ? sel_cnt[0] : sel_cnt[1];
        int n = 2;
        while ((uint32_t)n < most) n <<= 1;
        for (int j = tid; j < 2 * n; j += THREADS) {
            fkey[(j / n) * CAP + j % n] = 0u;
            fid[(j / n) * CAP + j % n] = 0xffffffffu;
        }
        if (tid < 2) fcount[tid] = 0;
        __syncthreads();
        for (uint64_t base = tid; base < vocab; base += UNROLL * THREADS) {
            float v[UNROLL];
            for (int u = 0; u < UNROLL; ++u) {
                uint64_t i = base + (uint64_t)u * THREADS;
                v[u] = i < vocab ? x[i] : 0.0f;
            }
            for (int u = 0; u < UNROLL; ++u) {
                uint64_t i = base + (uint64_t)u * THREADS;
                if (i >= vocab) break;
                uint32_t key = okey(v[u]), bin = key >> (32 - HBITS);
                // (slot < CAP always: this read counts what step 1 counted; the guard keeps a
                // change that broke that from writing past the buffers.)
                if (bin >= bpos) {
                    uint32_t slot = atomicAdd(&fcount[0], 1u);
                    if (slot < CAP) {
                        fkey[slot] = key;
                        fid[slot] = (uint32_t)i;
                    }
                }
                if (bin <= bneg) {
                    uint32_t slot = atomicAdd(&fcount[1], 1u);
                    if (slot < CAP) {
                        fkey[CAP + slot] = ~key;
                        fid[CAP + slot] = (uint32_t)i;
                    }
                }
            }
        }
        __syncthreads();
        sort_both(fkey, fid, CAP, n);
        for (int j = tid; j < 2 * k; j += THREADS) {
            int p = j / k, s = j % k;
            uint64_t o = ((uint64_t)blockIdx.x * 2 + p) * (uint64_t)k + s;
            top_val[o] = okey_value(fkey[p * CAP + s]);
            top_id[o] = fid[p * CAP + s];
        }
        return;
    }

    // 3b. Radix select of the k-th largest key, both polarities in each pass (four more reads).
    if (tid == 0) atomicAdd(fallbacks, 1u);
    __shared__ uint32_t hist[2][256];
    __shared__ uint32_t prefix[2], remaining[2];
    if (tid < 2) {
        prefix[tid] = 0;
        remaining[tid] = (uint32_t)k;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = tid; j < 512; j += THREADS) hist[j >> 8][j & 255] = 0;
        __syncthreads();
        const uint32_t p0 = prefix[0], p1 = prefix[1];
        for (uint64_t base = 0; base < vocab; base += THREADS) {
            uint64_t i = base + tid;
            bool in = i < vocab;
            uint32_t kp = in ? okey(x[i]) : 0u, kn = ~kp;
            hist_add(hist[0], (kp >> shift) & 255u, in && (kp & mask) == p0);
            hist_add(hist[1], (kn >> shift) & 255u, in && (kn & mask) == p1);
        }
        __syncthreads();
        if (tid < 2) {
            uint32_t rem = remaining[tid];
            int digit = 255;
            while (digit > 0 && hist[tid][digit] < rem) {
                rem -= hist[tid][digit];
                --digit;
            }
            remaining[tid] = rem;
            prefix[tid] |= (uint32_t)digit << shift;
        }
        mask |= 255u << shift;
        __syncthreads();
    }

    // Gather: keys above the k-th anywhere, ties in vocabulary order (one more read).
    __shared__ uint32_t ckey[2 * MAX_K], cid[2 * MAX_K];
    __shared__ uint32_t above_n[2], tiebase[2], wties[2][WARPS];
    const uint32_t kth[2] = {prefix[0], prefix[1]};
    const uint32_t need[2] = {remaining[0], remaining[1]};
    if (tid < 2) {
        above_n[tid] = 0;
        tiebase[tid] = 0;
    }
    for (int j = tid; j < 2 * MAX_K; j += THREADS) {
        ckey[j] = 0u;
        cid[j] = 0xffffffffu;
    }
    __syncthreads();
    for (uint64_t base = 0; base < vocab; base += THREADS) {
        uint64_t i = base + tid;
        bool in = i < vocab;
        uint32_t keys[2];
        keys[0] = in ? okey(x[i]) : 0u;
        keys[1] = ~keys[0];
        bool tie[2];
        unsigned ballot[2];
        for (int p = 0; p < 2; ++p) {
            if (in && keys[p] > kth[p]) {
                uint32_t slot = atomicAdd(&above_n[p], 1u);
                if (slot < MAX_K) {  // always, as the select counted k - need keys above
                    ckey[p * MAX_K + slot] = keys[p];
                    cid[p * MAX_K + slot] = (uint32_t)i;
                }
            }
            tie[p] = in && keys[p] == kth[p];
            ballot[p] = __ballot_sync(FULL, tie[p]);
            if (lane == 0) wties[p][warp] = __popc(ballot[p]);
        }
        __syncthreads();
        for (int p = 0; p < 2; ++p) {
            if (tie[p]) {
                uint32_t pos = tiebase[p] + __popc(ballot[p] & ((1u << lane) - 1u));
                for (int w = 0; w < warp; ++w) pos += wties[p][w];
                if (pos < need[p]) {
                    uint32_t slot = (uint32_t)k - need[p] + pos;
                    ckey[p * MAX_K + slot] = keys[p];
                    cid[p * MAX_K + slot] = (uint32_t)i;
                }
            }
        }
        __syncthreads();
        if (tid < 2) {
            uint32_t t = 0;
            for (int w = 0; w < WARPS; ++w) t += wties[tid][w];
            tiebase[tid] += t;
        }
        __syncthreads();
    }

    // Sort each polarity's MAX_K slots (unused slots have key 0, the smallest).
    sort_both(ckey, cid, MAX_K, MAX_K);
    for (int j = tid; j < 2 * k; j += THREADS) {
        int p = j / k, s = j % k;
        uint64_t o = ((uint64_t)blockIdx.x * 2 + p) * (uint64_t)k + s;
        top_val[o] = okey_value(ckey[p * MAX_K + s]);
        top_id[o] = cid[p * MAX_K + s];
    }
}
