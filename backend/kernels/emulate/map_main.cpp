// Runs kernels/map.cu's map_reduce_rows on the CPU (cuda_on_cpu.h), as src/map/gpu.rs launches
// it: one block of THREADS threads per row. Reads from stdin u64 rows, u64 vocab, i32 k, then
// rows × vocab f32 logits; writes to stdout the kernel's outputs in order: lse (rows × 2 f32),
// mom (rows × 4 f64), top_val (rows × 2 × k f32), top_id (rows × 2 × k u32), then the count of rows that took
// the radix select (u32).
#include "cuda_on_cpu.h"
#include "../map.cu"

#include <cstdio>

template <class T> void put(const std::vector<T> &v) { fwrite(v.data(), sizeof(T), v.size(), stdout); }

int main() {
    uint64_t rows, vocab;
    int32_t k;
    if (fread(&rows, 8, 1, stdin) != 1 || fread(&vocab, 8, 1, stdin) != 1 || fread(&k, 4, 1, stdin) != 1) return 2;
    std::vector<float> x(rows * vocab), lse(rows * 2), top_val(rows * 2 * k);
    std::vector<double> mom(rows * 4);
    std::vector<uint32_t> top_id(rows * 2 * k);
    if (fread(x.data(), 4, x.size(), stdin) != x.size()) return 2;
    uint32_t fallbacks = 0;
    emu::launch((unsigned)rows, THREADS, [&] { map_reduce_rows(x.data(), vocab, k, lse.data(), mom.data(), top_val.data(), top_id.data(), &fallbacks); });
    put(lse);
    put(mom);
    put(top_val);
    put(top_id);
    fwrite(&fallbacks, 4, 1, stdout);
    return 0;
}
