# Source this (". scripts/env.sh") to build ptb-lm by hand: it puts libtorch where
# torch-sys looks for it. With LIBTORCH set (your own libtorch 2.11.0) it changes nothing.
# Runs scripts/setup-libtorch.sh, which installs torch only when it is missing.
_ptb_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${LIBTORCH:-}" ]; then
  "$_ptb_root/scripts/setup-libtorch.sh" >/dev/null || return 1 2>/dev/null || exit 1
  export VIRTUAL_ENV="$(readlink -f "$_ptb_root/.venv")"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
  export LIBTORCH_USE_PYTORCH=1
  export PYTHONWARNINGS=ignore
fi
unset _ptb_root
