#!/usr/bin/env bash
# The one GPU check (issue #11 item 6), at most 8 minutes on one H100/H200 from a fresh checkout:
#
#   bash tools/bench/gpu_check.sh                 # all sections a-h, report in $OUT or gpu_check/
#   bash tools/bench/gpu_check.sh --only a,b      # any flag of tools/bench/gpu_check.py
#
# First installs every wheel carried in .whl/ (or $M6_WHEELS) into /tmp/m6_site, from that
# folder alone (the GPU machine reaches no registry), and puts it first on PYTHONPATH; then runs
# gpu_check.py, whose docstring says what runs, which torch it needs and the exit codes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=${M6_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/m6_site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/m6_site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PYTHON" tools/bench/gpu_check.py "$@"
