#!/usr/bin/env bash
# Install what the tests need and run them (the README's test command; .ci/run calls it).
# GUI tests need an X server: Xvfb and Qt's xcb libraries come from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v xvfb-run >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends xvfb xauth libxcb-icccm4 libxcb-keysyms1 \
    libxcb-xinerama0 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-cursor0 \
    libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3 >/dev/null
fi
python -m pip install -q -c constraints.txt -e ".[test]"
python -m ruff check .  # lint and import order (configured in pyproject.toml): CI fails on an error
xvfb-run -a -s "-screen 0 1920x1200x24" python -m pytest -q -p no:cacheprovider "$@"
