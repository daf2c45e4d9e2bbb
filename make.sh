#!/usr/bin/env bash
# Build the per-environment tarballs (build/bin/<env>_ays.tar.gz), on a plain host or in a
# stock Python image alike; arguments go to build/build.py:
#
#   ./make.sh                      every env in envs/
#   ./make.sh --env uat            one env
#   ./make.sh --check-repro        build twice from scratch and compare the tarballs
#   docker run --rm -v "$PWD":/src python:3.11 bash /src/make.sh
#
# The Python environment that freezes (PyInstaller and the project's dependencies) is
# $AYS_BUILD_PYTHON when set, else a venv of its own, build/venv/<python>, created when
# missing or broken, with the project installed with only the consul, rocketmq and build
# extras (reinstalled when pyproject.toml changes). Not the development .venv: whatever is
# installed there (test and bench extras) can end up in the bundle through optional imports.
# It needs git and Python >= 3.11 built with a shared libpython (python.org, Debian, the
# python images, and pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared all are).
set -euo pipefail
cd "$(dirname "$0")"

say() { printf 'make.sh: %s\n' "$*" >&2; }

usable() {  # the interpreter runs and can freeze this project
    [[ -x "$1" ]] && "$1" - <<'PY' >/dev/null 2>&1
import sys
assert sys.version_info >= (3, 11)
import PyInstaller, ays_runtime, ays_installer, consul, rocketmq, pymysql  # noqa
PY
}

check_host_python() {  # what a new venv would be made from
    local python="$1"
    if ! command -v "$python" >/dev/null; then
        say "no $python on PATH: install Python 3.11 or newer (with a shared libpython)"
        exit 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        say "$python is $("$python" -V 2>&1): Ays needs Python 3.11 or newer"
        exit 1
    fi
    if [[ "$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')" != 1 ]]; then
        say "$python has no shared libpython, which PyInstaller needs: use a build configured with --enable-shared (e.g. PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11)"
        exit 1
    fi
}

if [[ -n "${AYS_BUILD_PYTHON:-}" ]]; then
    python="$AYS_BUILD_PYTHON"
    usable "$python" || { say "AYS_BUILD_PYTHON=$python cannot import PyInstaller and the project"; exit 1; }
else
    host_python="${PYTHON:-python3}"
    check_host_python "$host_python"
    # One venv per interpreter: a checkout shared with a container keeps both.
    tag="$("$host_python" -c 'import hashlib, os, sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}-" + hashlib.sha256(os.path.realpath(sys.executable).encode()).hexdigest()[:8])')"
    venv="build/venv/$tag"
    python="$venv/bin/python"
    stamp="$venv/.ays-build-installed"
    wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if ! [[ -x "$python" ]] || ! "$python" -c '' 2>/dev/null; then
        say "creating the build environment $venv"
        rm -rf "$venv"
        "$host_python" -m venv "$venv"
    fi
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]] || ! usable "$python"; then
        say "installing PyInstaller and the project's dependencies into $venv (quiet, a minute or two)"
        "$python" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$python" -m pip install --quiet --disable-pip-version-check -e '.[consul,rocketmq,build]'
        usable "$python" || { say "$venv cannot import PyInstaller and the project after installing them"; exit 1; }
        printf '%s\n' "$wanted" >"$stamp"
    fi
fi
if ! command -v strip >/dev/null; then  # build/ays.spec strips the bundle's libraries
    say "no strip on PATH: install binutils (apt-get install binutils)"
    exit 1
fi
say "building with $python ($("$python" -V 2>&1))"
exec "$python" build/build.py "$@"
