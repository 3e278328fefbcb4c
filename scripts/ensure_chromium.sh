#!/usr/bin/env bash
# Makes sure a headless-capable Chromium is on PATH, for the report's browser test
# (tests/bench/test_report.py::test_the_report_renders_in_chromium). Idempotent: exits 0 at once
# when chromium, chromium-browser or google-chrome is present; otherwise installs Debian's
# chromium package with apt-get when run as root, and prints the command to run when not.
set -euo pipefail

find_browser() {
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if browser=$(find_browser); then
    echo "chromium: $browser"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing; install it with:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y chromium" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing and this system has no apt-get; install Chromium with its package manager" >&2
    exit 1
fi

echo "installing Debian's chromium (a few minutes)..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
browser=$(find_browser) || { echo "apt-get finished but no chromium is on PATH" >&2; exit 1; }
echo "chromium: $browser"
