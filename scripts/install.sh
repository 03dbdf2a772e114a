#!/usr/bin/env bash
# Installs histosearch with its test tools, and Debian's Chromium for the browser tests.
# CPU-only machines get everything they need; for GPU FAISS see README ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[cpu,test]"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Chromium (Debian: sudo apt-get install chromium) to run the browser tests" >&2
  fi
fi
