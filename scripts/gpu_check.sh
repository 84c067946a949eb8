#!/usr/bin/env bash
# The GPU check: every user-facing path of loreun on an SD-1.4-shaped model, one table for
# docs/benchmarks.md (scripts/gpu_check.py says what each phase measures). Nothing is downloaded.
#
#   bash scripts/gpu_check.sh WORK_DIR [--esd-repo ../erasing]   # on a GPU machine, <= 8 minutes
#   bash scripts/gpu_check.sh WORK_DIR --dry-run                 # the digits model, any machine
#
# Wheels in .whl/ (a machine without a package index) are installed into a private target
# first; loreun itself is used from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?usage: bash scripts/gpu_check.sh WORK_DIR [--dry-run] [--esd-repo DIR]}
shift
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/loreun-site .whl/*.whl
  export PYTHONPATH="/tmp/loreun-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import loreun.cli" 2>/dev/null; then
  # an unmapped checkout: the folders become the loreun package through a link
  mkdir -p /tmp/loreun-src/loreun
  for d in cli erase eval pipelines prompts; do ln -sfn "$PWD/$d" "/tmp/loreun-src/loreun/$d"; done
  export PYTHONPATH="/tmp/loreun-src${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 scripts/gpu_check.py --work "$work" "$@"
