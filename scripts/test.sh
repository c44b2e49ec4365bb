#!/usr/bin/env bash
# The test suite: unit tests plus a few real end-to-end tests (local Ray, S3 server, MLflow server, Serve).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "test.sh: pytest collected no tests — failing on purpose" >&2
  exit 1
fi
exit $rc
