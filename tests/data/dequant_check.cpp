// Host build of kernels/dequant.cuh for tests/kernels_host.rs: reads raw blocks of one ggml type,
// writes the f32 value of every index of every block through the kernels' dq_<type> functions.
//
//   dequant_check TYPE IN OUT
#include "../../kernels/prelude.cuh"
#include "../../kernels/dequant.cuh"

#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    std::FILE* in = std::fopen(argv[2], "rb");
    if (!in) return 3;
    std::vector<unsigned char> bytes;
    unsigned char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, in)) > 0) bytes.insert(bytes.end(), buf, buf + n);
    std::fclose(in);
    std::vector<float> out;
    bool known = false;
#define X(name, B, QKV)                                                       \
    if (!std::strcmp(argv[1], #name)) {                                       \
        known = true;                                                         \
        std::vector<B> blocks(bytes.size() / sizeof(B));                      \
        std::memcpy(blocks.data(), bytes.data(), blocks.size() * sizeof(B));  \
        for (size_t b = 0; b < blocks.size(); ++b)                            \
            for (int i = 0; i < QKV; ++i) out.push_back(dq_##name(&blocks[b], i)); \
    }
    MR_FOR_EACH_TYPE(X)
#undef X
    if (!known) return 4;
    std::FILE* o = std::fopen(argv[3], "wb");
    if (!o || std::fwrite(out.data(), sizeof(float), out.size(), o) != out.size()) return 5;
    std::fclose(o);
    return 0;
}
