#!/usr/bin/env bash
# Installs histosearch with its test tools and the optional backends the tests cover (Postgres, Ray), Debian's
# Chromium for the browser tests and Debian's Postgres server for the Postgres tests.
# CPU-only machines get everything they need; for GPU FAISS see README ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[cpu,test,postgres,ray]"
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}
if ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium || echo "note: install Chromium (Debian: sudo apt-get install chromium) to run the browser tests" >&2
fi
# The Postgres tests start a throwaway server from these binaries (tests/postgres.py) and skip without them.
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  apt_install postgresql || echo "note: install Postgres (Debian: sudo apt-get install postgresql) to run the Postgres tests" >&2
fi
