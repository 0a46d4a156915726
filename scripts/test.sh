#!/usr/bin/env bash
# Run the test suite (creates .venv with the pinned requirements on first use).
#   bash scripts/test.sh            the default suite (< 15 minutes on 2 CPU cores)
#   bash scripts/test.sh -m slow    the long checks
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${ROOT}/scripts/env.sh" requirements-test.txt
cd "${ROOT}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export PYTHONHASHSEED=0
exec "${PYTHON}" -m pytest "$@"
