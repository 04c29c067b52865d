#!/usr/bin/env bash
# Tests with clients nobody here wrote: the `webuiapi` package against `loramix serve`, and the
# Ray driver on a local 3-node cluster. Makes its own venv (.ci/venv-py) from
# tests/python/requirements.txt; needs python3 with venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.ci/venv-py
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
cargo build --quiet --bin loramix
bin=target/debug/loramix
status=0
"$venv/bin/python" tests/python/test_api.py --binary "$bin" || status=1
"$venv/bin/python" tools/ray/test_cluster.py --binary "$bin" 2>&1 | grep -v -E "rpc_client|gcs_client|^\s*$" || status=1
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
