#!/bin/sh
# Cargo runs this in front of every rustc (build.rustc-wrapper in .cargo/config.toml), so the
# README's commands work on a fresh machine: llama-cpp-sys-2 builds ggml with cmake and a C++
# compiler and generates its bindings with libclang, and without them it fails deep in a bindgen
# panic. Where they are missing on a Debian-like system, this installs them (as root, the way
# .ci/run does) or stops with one line saying what to run. Elsewhere, or with MOERUN_NO_DEPS_CHECK
# set, it only runs rustc.
check() {
    missing=""
    command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
    command -v c++ >/dev/null 2>&1 || missing="$missing g++"
    if [ -z "${LIBCLANG_PATH:-}" ] && ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
        missing="$missing clang libclang-dev"
    fi
}

if [ -z "${MOERUN_NO_DEPS_CHECK:-}" ] && command -v dpkg >/dev/null 2>&1; then
    check
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && command -v flock >/dev/null 2>&1; then
            # Cargo runs many rustc at once: one of them installs, the others wait for it.
            (
                flock 9
                check
                if [ -n "$missing" ]; then
                    echo "moerun: installing the build's system packages:$missing" >&2
                    export DEBIAN_FRONTEND=noninteractive
                    # shellcheck disable=SC2086
                    { apt-get update -qq && apt-get install -y -qq $missing; } >/dev/null 2>&1
                fi
            ) 9>"${TMPDIR:-/tmp}/moerun-build-deps.lock"
            check
        fi
        if [ -n "$missing" ]; then
            echo "moerun: the build needs$missing; run: sudo apt-get install$missing" >&2
            exit 1
        fi
    fi
fi
exec "$@"
