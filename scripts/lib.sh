# Shared helpers of the scripts in this folder (sourced, not run).
# shellcheck shell=bash
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="2.13.0"  # on Python 3.11 pip takes the CPU build from local disk; elsewhere PyPI's build

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# find_python VERSION: the path of a working python VERSION (PATH, pyenv, system), or die
find_python() {
  local version=$1 candidate
  for candidate in "python$version" python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$version' else 1)" 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" \
                   /usr/bin/python"$version" /usr/local/bin/python"$version"; do
    if [[ -x $candidate ]] && "$candidate" -c "" 2>/dev/null; then echo "$candidate"; return; fi
  done
  die "no working Python $version found (tried python$version and python3 on PATH, pyenv, /usr/bin, /usr/local/bin)"
}

# setup_env VERSION: create or update .venv-pyXY with torch, this project (editable) and its test tools;
# prints the environment's folder. Skips the installs when setup.py and this file are unchanged since the last run.
setup_env() {
  local version=$1
  local venv="$REPO_ROOT/.venv-py${version/./}"
  local stamp="$venv/.rela-setup" want python
  want="$(cat "$REPO_ROOT/setup.py" "$REPO_ROOT/scripts/lib.sh" | sha256sum | cut -c1-16)"
  if [[ -x $venv/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    echo "$venv"; return
  fi
  # every step checks its own status: callers run this inside $(...) or `if`, where `set -e` does not apply
  python="$(find_python "$version")" || exit 1
  log "setting up $venv with $python (a few minutes the first time)"
  if [[ ! -x $venv/bin/python ]]; then "$python" -m venv "$venv" >&2 || die "cannot create $venv"; fi
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  if [[ $version == 3.10 ]]; then
    # fairseq 0.12.2 pins omegaconf<2.1, whose metadata pip >= 24.1 rejects
    "${pip[@]}" "pip<24.1" >&2 || die "cannot install pip<24.1 in $venv"
  fi
  # torch first and pinned: an unpinned torch pulled in by fairseq would be a multi-GB CUDA build on 3.11
  "${pip[@]}" "torch==$TORCH_VERSION" >&2 || die "cannot install torch==$TORCH_VERSION in $venv"
  # this project, editable, alone: every environment's editable install rewrites the checkout's
  # rela_fairseq.egg-info, so scripts/test.sh's side-by-side setups take turns for these few seconds; then its
  # dependencies and extras, read from the metadata just installed (the egg-info is not written again)
  with_lock "$REPO_ROOT/.setup.lock" "${pip[@]}" --no-deps -e "$REPO_ROOT" >&2 ||
    die "cannot install rela-fairseq in $venv"
  local installed
  installed="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("rela-fairseq"))')" ||
    die "rela-fairseq is not installed in $venv"
  "${pip[@]}" "rela-fairseq[test,kernels]==$installed" >&2 ||
    die "cannot install rela-fairseq's dependencies in $venv"
  echo "$want" > "$stamp"
  log "ready: $venv ($("$venv/bin/python" -c 'import fairseq, torch; print("fairseq", fairseq.__version__, "torch", torch.__version__)' 2>/dev/null))"
  echo "$venv"
}

# with_lock FILE COMMAND...: COMMAND under an exclusive lock on FILE where flock exists (Linux), else as it is
with_lock() {
  if command -v flock >/dev/null 2>&1; then flock "$1" "${@:2}"; else "${@:2}"; fi
}

# pipeline_python: the Python that runs the pipeline: $RELA_PYTHON, else this project's .venv-py311, else python3
# if it can import rela_fairseq.
pipeline_python() {
  if [[ -n ${RELA_PYTHON:-} ]]; then echo "$RELA_PYTHON"; return; fi
  if [[ -x $REPO_ROOT/.venv-py311/bin/python ]]; then echo "$REPO_ROOT/.venv-py311/bin/python"; return; fi
  if command -v python3 >/dev/null 2>&1 && python3 -c "import rela_fairseq" >/dev/null 2>&1; then
    command -v python3; return
  fi
  die "no Python with rela_fairseq installed: run scripts/setup_env.sh, or pip install -e . and set RELA_PYTHON"
}

# run_pipeline COMMAND ARGS...: python -m rela_tools.pipeline COMMAND ARGS... with that Python; --help needs no
# environment (any python3 prints it)
run_pipeline() {
  local python
  if [[ " $* " == *" -h "* || " $* " == *" --help "* ]] && ! python="$(pipeline_python 2>/dev/null)"; then
    python="$(command -v python3)" || die "no python3 on PATH"
  else
    python="$(pipeline_python)"
  fi
  cd "$REPO_ROOT"
  exec "$python" -m rela_tools.pipeline "$@"
}
