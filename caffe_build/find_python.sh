# Sourced by setup_env.sh and ci/make-gpu-bundle: the interpreter for a Python version.
#
#   python=$(find_python 3.8) || die "..."
#
# A version X.Y is looked for as pythonX.Y on PATH, then in pyenv's versions (newest patch
# release first). pyenv's shims on PATH may not run a version that is not selected, so
# each candidate is tried for real. Prints the path; fails when none runs.
find_python() {
  local want=$1 candidate
  local -a candidates=("$(command -v "python$want" 2>/dev/null || true)")
  candidates+=($(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/"python$want" 2>/dev/null | sort -rV))
  for candidate in "${candidates[@]}"; do
    if [[ -n $candidate && -x $candidate ]] && "$candidate" -c 'import sys' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
