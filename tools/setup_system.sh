#!/usr/bin/env bash
# Debian packages the project needs outside the virtualenv (idempotent):
#   fonts-wqy-microhei  CJK font for the dashboard charts
#   chromium            headless browser for the workbench's browser tests (tests/test_web_*.py, Playwright
#                       drives /usr/bin/chromium; Playwright's own browser download is never used)
# (libpython3.11 for Triton's Python backend stub is checked by tools/setup_triton.py)
set -euo pipefail
packages=(fonts-wqy-microhei chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
