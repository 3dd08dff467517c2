#!/usr/bin/env bash
# Run the test suite (as root on Debian 12): prepare the machine, ruff and mypy, then pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh tests/test_harness.py -x
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh"
cd "$REPO"
# Static checks first: a type or lint error fails the run before the slower tests.
"$REPO/.venv/bin/ruff" check --quiet secretbus tests bench
"$REPO/.venv/bin/mypy"
rc=0
"$REPO/.venv/bin/python" -m pytest -q "$@" </dev/null || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
