// Kernel entries of the emulated driver, registered by name from the host builds of
// kernels/*.cu (one translation unit per file, written by tests/cuda_emulated.rs).
#pragma once
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "cuda_emu.h"

namespace emu {
// Runs a kernel: its parameters (the driver's `void**`), the grid and the block.
typedef std::function<void(void**, emu_uint3, emu_uint3)> Launcher;
std::map<std::string, Launcher>& registry();
void launch(emu_uint3 grid, emu_uint3 block, const std::function<void()>& f);

template <typename... A, size_t... I>
std::tuple<A...> unpack(void** p, std::index_sequence<I...>) {
    return std::tuple<A...>{*static_cast<A*>(p[I])...};
}

template <typename... A>
Launcher wrap(void (*f)(A...)) {
    return [f](void** p, emu_uint3 grid, emu_uint3 block) {
        std::tuple<A...> args = unpack<A...>(p, std::index_sequence_for<A...>{});
        launch(grid, block, [&] { std::apply(f, args); });
    };
}

struct Reg {
    Reg(const char* name, Launcher l) { registry()[name] = std::move(l); }
};
}  // namespace emu
