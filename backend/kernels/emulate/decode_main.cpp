// Runs one of kernels/decode.cu's kernels (f32) on the CPU (cuda_on_cpu.h), with the grid and
// block src/model/fused.rs launches it with. Reads from stdin a u32 kernel number, its sizes,
// then its inputs (f32 arrays); writes its outputs (f32 arrays) to stdout:
//   0 rope_append:      u32 rows h kvh d, u64 cap at, u32 interleaved positions; qkv, cos, sin (the
//                       tables, positions × d / 2), k_cache, v_cache -> q_out, k_cache, v_cache
//   1 decode_attention: u32 rows h kvh d threads, u64 cap len, f32 scale; q, k_cache, v_cache -> out
// (the kernels read the position, at or len - 1, from memory, as from the device on a GPU)
//   2 add_rms_norm:     u32 rows n threads, f32 eps; x, y, w -> sum, normed
//   3 silu_mul:         u32 rows n; gu -> out
#include "cuda_on_cpu.h"
#include "../decode.cu"

#include <cstdio>

template <class T> T get() {
    T v;
    if (fread(&v, sizeof(T), 1, stdin) != 1) exit(2);
    return v;
}

std::vector<float> floats(uint64_t n) {
    std::vector<float> v(n);
    if (fread(v.data(), 4, n, stdin) != n) exit(2);
    return v;
}

void put(const std::vector<float> &v) { fwrite(v.data(), 4, v.size(), stdout); }

int main() {
    switch (get<uint32_t>()) {
    case 0: {
        uint32_t rows = get<uint32_t>(), h = get<uint32_t>(), kvh = get<uint32_t>(), d = get<uint32_t>();
        uint64_t cap = get<uint64_t>(), at = get<uint64_t>();
        uint32_t il = get<uint32_t>(), positions = get<uint32_t>();
        auto qkv = floats((uint64_t)rows * (h + 2 * kvh) * d), cos = floats((uint64_t)positions * (d / 2)), sin = floats((uint64_t)positions * (d / 2));
        auto kc = floats((uint64_t)rows * kvh * cap * d), vc = floats((uint64_t)rows * kvh * cap * d);
        std::vector<float> q((uint64_t)rows * h * d);
        const uint32_t pos = (uint32_t)at;
        emu::launch(rows, 64, [&] { rope_append_f32(qkv.data(), cos.data(), sin.data(), &pos, q.data(), kc.data(), vc.data(), h, kvh, d, cap, il); },
                    h + 2 * kvh);
        put(q);
        put(kc);
        put(vc);
        return 0;
    }
    case 1: {
        uint32_t rows = get<uint32_t>(), h = get<uint32_t>(), kvh = get<uint32_t>(), d = get<uint32_t>(), threads = get<uint32_t>();
        uint64_t cap = get<uint64_t>(), len = get<uint64_t>();
        float scale = get<float>();
        auto q = floats((uint64_t)rows * h * d), kc = floats((uint64_t)rows * kvh * cap * d), vc = floats((uint64_t)rows * kvh * cap * d);
        std::vector<float> out((uint64_t)rows * h * d);
        const uint32_t pos = (uint32_t)(len - 1);
        emu::launch(rows, threads, [&] { decode_attention_f32(q.data(), kc.data(), vc.data(), out.data(), h, kvh, d, cap, &pos, scale); }, h);
        put(out);
        return 0;
    }
    case 2: {
        uint32_t rows = get<uint32_t>(), n = get<uint32_t>(), threads = get<uint32_t>();
        float eps = get<float>();
        auto x = floats((uint64_t)rows * n), y = floats((uint64_t)rows * n), w = floats(n);
        std::vector<float> sum((uint64_t)rows * n), normed((uint64_t)rows * n);
        emu::launch(rows, threads, [&] { add_rms_norm_f32(x.data(), y.data(), w.data(), sum.data(), normed.data(), n, eps); });
        put(sum);
        put(normed);
        return 0;
    }
    case 3: {
        uint32_t rows = get<uint32_t>(), n = get<uint32_t>();
        auto gu = floats((uint64_t)rows * 2 * n);
        uint64_t total = (uint64_t)rows * n;
        std::vector<float> out(total);
        emu::launch((unsigned)((total + 255) / 256), 256, [&] { silu_mul_f32(gu.data(), out.data(), n, total); });
        put(out);
        return 0;
    }
    }
    return 2;
}
