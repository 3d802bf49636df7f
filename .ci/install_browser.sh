#!/usr/bin/env bash
# Headless Chromium for the Space's browser test (tests/test_space.py::test_browser_upload_predict_screenshot):
# Debian's chromium package and the Playwright Python API, which drives that system browser
# (executable_path=/usr/bin/chromium). Never run `playwright install`: it downloads a browser build of its own.
# Run as root after `make venv` (PYTHON defaults to .venv/bin/python); idempotent, and quick when both are there.
# Without them the browser test is skipped with the reason.
set -euo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"

if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi
if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet playwright
fi
echo "browser test: $(chromium --version 2>/dev/null | head -n1), playwright $("$PYTHON" -m pip show playwright | sed -n 's/^Version: //p')"
