#!/usr/bin/env bash
# ruff (check and format) and mypy (strict), as configured in pyproject.toml.
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
.venv/bin/ruff check manager tests bench scripts
.venv/bin/ruff format --check manager tests bench scripts
.venv/bin/mypy
