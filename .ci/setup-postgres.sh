#!/usr/bin/env bash
# PostgreSQL server binaries (initdb, pg_ctl) for the concept-store tests; the test
# fixture (tests/repic_ray/serving/conftest.py) starts a throwaway server on loopback.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends postgresql
