#!/bin/sh
# The Debian packages the test suite needs, installed only when missing: the suite runs against a
# real redis-server, checks the alert rules with promtool (in `prometheus`), builds its venv with
# python3-venv, and runs the seed page's curl. README's test command calls this first, so it works
# as written on a fresh Debian/Ubuntu machine; .ci/run calls that same command.
set -eu
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$missing python3-venv"
[ -n "$missing" ] || exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
echo "installing Debian packages the tests need:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086 # one word per package
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
