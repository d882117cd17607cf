#!/usr/bin/env bash
# Set up (or bring up to date) a development machine for lmscope; safe to run again and again.
#
#   bash scripts/setup.sh        (run from anywhere; works in the repository root)
#
# 1. .venv (python3 -m venv) if missing, and an up-to-date pip in it.
# 2. llama-cpp-python, from a wheel cached in $LMSCOPE_WHEEL_CACHE (default ~/.cache/lmscope/wheels);
#    PyPI has only its sdist, so the wheel is built once (5-10 min on 2 cores) and reused by every later
#    venv, clone and CI run on the machine. See docs/building.md.
# 3. pip install -e ".[server,plot,dev]"
# 4. The default model (SmolLM2-135M-Instruct Q4_1, ~98 MB) into ~/.cache/lmscope/models ($LMSCOPE_HOME).
#
# Environment:
#   LMSCOPE_WHEEL_CACHE   folder of prebuilt llama-cpp-python wheels (a subfolder per build: flags + patches)
#   LMSCOPE_CMAKE_ARGS    replaces the portable CMake flags below (e.g. "-DGGML_CUDA=on")
#   LMSCOPE_HOME          where models are cached (default ~/.cache/lmscope)
#   PYTHON                interpreter used to create .venv (default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LLAMA_CPP_VERSION=0.3.36
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"  # CI may run with a bare environment
# The one place the llama.cpp build flags are written (docs/building.md says why each). GGML_NATIVE=OFF: the
# wheel is cached and shared, so it must not be built for the building machine's CPU alone. LLAVA_BUILD=OFF
# skips the multimodal library lmscope does not use. GGML_RPC=ON adds llama.cpp's RPC backend (a few hundred
# KB, nothing at run time unless `lmscope serve --rpc` is used), so the model-split test runs in CI like every
# other test.
PORTABLE_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_RPC=ON"
# On x86-64, ggml's CPU back end is built once per instruction-set level, as modules installed beside the other
# libraries (CMAKE_INSTALL_BINDIR), and service/native.py loads the best one this CPU runs: haswell (AVX2, FMA,
# F16C: what the single portable build had) and icelake (AVX-512 with VBMI and VNNI: Ice Lake and later Xeons,
# AMD Zen 4 and later). GGML_CPU_VARIANT_LIST comes from patches/ (upstream compiles the back end for 14 levels).
# Each variant is one more compile of the back end; on an AMX Xeon add sapphirerapids (docs/building.md).
CPU_VARIANTS="haswell,icelake"
if [ "$(uname -m)" = x86_64 ]; then
    PORTABLE_CMAKE_ARGS="$PORTABLE_CMAKE_ARGS -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
-DGGML_CPU_VARIANT_LIST=$CPU_VARIANTS -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
fi
CMAKE_FLAGS="${LMSCOPE_CMAKE_ARGS:-$PORTABLE_CMAKE_ARGS}"
# Changes to llama.cpp applied to the sdist before it is built (the variant list, matrix kernels for Q4_1 and, with
# VNNI, Q5_0 and Q8_0, AMX fixes, one flash-attention kernel for every multi-row ubatch, a context without the LM
# head): docs/building.md says what each does.
PATCH_DIR="patches/llama-cpp-python-$LLAMA_CPP_VERSION"
# What identifies a build: its flags and its patches. Each build's wheel is cached in a folder of its own, so a
# wheel built from other flags or other patches is never reused.
BUILD_ID="$CMAKE_FLAGS; patches $(cat "$PATCH_DIR"/*.patch 2>/dev/null | sha256sum | cut -c1-12)"
WHEEL_CACHE="${LMSCOPE_WHEEL_CACHE:-$HOME/.cache/lmscope/wheels}/build-$(printf '%s' "$BUILD_ID" | sha256sum | cut -c1-12)"
VENV=.venv
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# pip, minus the "Location ... is ignored" lines that extra index settings of some machines print per package.
pip_() {
    "${PIP[@]}" "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
}

T_START=$(date +%s)
step_t0=$T_START
say() { echo "[setup] $*"; }
step() { step_t0=$(date +%s); say "$* ..."; }
done_step() { say "  done in $(( $(date +%s) - step_t0 ))s${1:+ ($1)}"; }

# --- 1. virtual environment ------------------------------------------------------------------------------
make_venv() {
    if [ ! -x "$PY" ]; then
        step "creating $VENV with ${PYTHON:-python3}"
        "${PYTHON:-python3}" -m venv "$VENV"
        done_step "$("$PY" --version)"
    fi
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else
        f"[setup] lmscope needs Python >= 3.10, .venv has {sys.version.split()[0]}: "
        "remove .venv and rerun with PYTHON=python3.11 (or newer)")'
}

# --- 2. llama-cpp-python ---------------------------------------------------------------------------------
LLAMA_MARK="$VENV/.llama-cpp-cmake-args"  # the build (flags, patches) the installed llama-cpp-python came from
llama_ok() {
    [ "$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))" 2>/dev/null)" \
        = "$LLAMA_CPP_VERSION" ] && [ -f "$LLAMA_MARK" ] && [ "$(cat "$LLAMA_MARK")" = "$BUILD_ID" ]
}
install_cached_llama() {
    # --no-index: the cached wheel or nothing; this never falls back to building the sdist.
    "${PIP[@]}" install -q --force-reinstall --no-index --no-deps --find-links "$WHEEL_CACHE" \
        "llama-cpp-python==$LLAMA_CPP_VERSION" >/dev/null 2>&1 && printf '%s\n' "$BUILD_ID" >"$LLAMA_MARK"
}
# The sdist (pip's HTTP cache applies), unpacked into $1 and patched.
patched_sdist() {
    local patch
    "${PIP[@]}" download -q --no-deps --no-binary llama-cpp-python -d "$1" "llama-cpp-python==$LLAMA_CPP_VERSION" \
        && tar -xzf "$1/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$1" || return 1
    for patch in "$PATCH_DIR"/*.patch; do
        [ -e "$patch" ] || continue
        echo "applying $patch"
        patch -d "$1/llama_cpp_python-$LLAMA_CPP_VERSION" -p1 --batch --forward <"$patch" || return 1
    done
}
build_llama_wheel() {
    if ! command -v c++ >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "  no C++ compiler: apt-get install build-essential"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential
        else
            say "no C++ compiler found: install one (Debian: apt-get install build-essential)" >&2
            exit 1
        fi
    fi
    local build_dir log
    build_dir=$(mktemp -d "$WHEEL_CACHE/.build.XXXXXX")
    log="$WHEEL_CACHE/build-$LLAMA_CPP_VERSION.log"
    step "building the llama-cpp-python $LLAMA_CPP_VERSION wheel, CMAKE_ARGS=\"$CMAKE_FLAGS\", $(nproc) jobs (5-10 min; log: $log)"
    # --no-cache-dir: pip's own wheel cache is keyed by the sdist, not by CMAKE_ARGS, so it could hand back a
    # wheel built earlier with other flags (a native or CUDA one) instead of building.
    if ! { patched_sdist "$build_dir" && CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "${PIP[@]}" wheel --no-cache-dir --no-deps -w "$build_dir" "$build_dir/llama_cpp_python-$LLAMA_CPP_VERSION"
         } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -rf "$build_dir"
        say "building llama-cpp-python failed; full log: $log" >&2
        exit 1
    fi
    mv -f "$build_dir"/*.whl "$WHEEL_CACHE"/
    rm -rf "$build_dir"
    done_step "wheel cached in $WHEEL_CACHE"
}
install_llama() {
    if llama_ok; then
        say "llama-cpp-python $LLAMA_CPP_VERSION already in $VENV"
        return
    fi
    mkdir -p "$WHEEL_CACHE"
    step "installing llama-cpp-python $LLAMA_CPP_VERSION from $WHEEL_CACHE"
    if install_cached_llama; then
        done_step "cached wheel"
        return
    fi
    say "  no usable wheel cached"
    # One build at a time per cache: a concurrent setup waits here, then finds the wheel.
    exec 9>"$WHEEL_CACHE/.build.lock"
    flock 9
    if install_cached_llama; then
        say "  installed the wheel a concurrent setup built"
    else
        build_llama_wheel
        install_cached_llama || { say "the freshly built wheel in $WHEEL_CACHE does not install" >&2; exit 1; }
        say "  installed the new wheel"
    fi
    exec 9>&-
}

# --- 3. lmscope and its extras ---------------------------------------------------------------------------
install_lmscope() {
    step "pip install -e .[server,plot,dev]"
    # llama-cpp-python==0.3.36 is already satisfied, so this never builds it; it adds its dependencies.
    # setuptools' editable install always adds an "Editable installation" notice (beware of folders named like
    # the package in the working directory: this repository has none, the code is in client/ and service/).
    PYTHONWARNINGS="ignore:Editable installation" pip_ install -q -e ".[server,plot,dev]"
    done_step
    llama_ok || { say "pip replaced llama-cpp-python; expected $LLAMA_CPP_VERSION from $WHEEL_CACHE" >&2; exit 1; }
}

# --- run -------------------------------------------------------------------------------------------------
# One setup at a time per checkout (a lock on pyproject.toml, which needs no file of its own).
exec 8<pyproject.toml
flock 8
make_venv
# Steps 2-3 are skipped when nothing they depend on changed since the last successful run.
STAMP="$VENV/.lmscope-setup"
stamp_value() { { cat pyproject.toml; echo "$LLAMA_CPP_VERSION $BUILD_ID"; } | sha256sum | cut -c1-16; }
if [ -z "${LMSCOPE_SETUP_FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] && llama_ok
then
    say "$VENV is up to date with pyproject.toml (LMSCOPE_SETUP_FORCE=1 reinstalls)"
else
    rm -f "$STAMP"
    step "upgrading pip"
    pip_ install -q --upgrade pip
    done_step "$("${PIP[@]}" --version | cut -d' ' -f1-2)"
    install_llama
    install_lmscope
    stamp_value >"$STAMP"
fi

# --- 4. a CJK font, so plots can label Chinese tokens (optional: plots fall back to escapes without it) ----
if ! fc-list :lang=zh 2>/dev/null | grep -q . && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "CJK font for plots (fonts-wqy-microhei)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei; } >/dev/null 2>&1 \
        && done_step || say "  could not install it; plots will show Chinese tokens as escapes"
fi

# --- 4b. chromium + chromedriver, for the browser tests of the HTML views (optional: they skip without it) ---
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    step "headless browser for the views' tests (chromium, chromium-driver)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
        && done_step || say "  could not install them; the browser tests of tests/integration/test_views.py will skip"
fi

# --- 5. openssl, which the TLS tests use to make certificates ------------------------------------------------
if ! command -v openssl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "openssl (the TLS tests make certificates with it)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; } >/dev/null 2>&1 \
            && done_step || say "  could not install openssl; the TLS tests will fail until it is installed"
    else
        say "no openssl command: the TLS tests need it (Debian: apt-get install openssl)"
    fi
fi

# --- 6. default model ------------------------------------------------------------------------------------
step "default model"
"$VENV/bin/lmscope" pull
"$VENV/bin/lmscope" pull gemma3-270m  # the second family's real model (tests/integration/test_gemma.py); Gemma terms apply
"$VENV/bin/lmscope" pull qwen2.5-coder-1.5b-instruct  # the model that refuses (tests/integration/test_refusal_qwen.py)
done_step

say "ready in $(( $(date +%s) - T_START ))s: $VENV ($("$PY" --version), llama-cpp-python $LLAMA_CPP_VERSION)"
