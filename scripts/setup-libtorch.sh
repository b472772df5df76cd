#!/usr/bin/env bash
# Make libtorch 2.11.0 available to the build, installing it only when missing (and, for the
# tests, Python's tokenizers, pinned to the crate's version).
#
# Default: a Python virtualenv holding PyPI's torch==2.11.0, kept OUTSIDE the clone
# (so fresh clones and CI reuse it) at
#     ${PTB_LM_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ptb-lm/torch-2.11.0}
# and linked into the project as .venv.
#
# Users with their own libtorch 2.11.0 set LIBTORCH=/path/to/libtorch instead; this script
# then only checks that it looks like a libtorch.
#
# Prints nothing on stdout but the path of the torch lib directory (for scripts).
set -euo pipefail

TORCH_VERSION=2.11.0
# Headers only (~170 kB): the CUDA wheel torch pulls in lacks crt/*.h, which the CUDA-graph
# shim (src/cuda.cpp) needs to compile against libtorch's CUDA headers.
CUDA_CRT="nvidia-cuda-crt==13.0.*"
root=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'setup-libtorch: %s\n' "$*" >&2; }

if [[ -n "${LIBTORCH:-}" ]]; then
  if [[ ! -f "$LIBTORCH/lib/libtorch.so" && ! -f "$LIBTORCH/lib/libtorch_cpu.so" ]]; then
    log "LIBTORCH=$LIBTORCH has no lib/libtorch.so; point it at an unpacked libtorch $TORCH_VERSION"
    exit 1
  fi
  log "using LIBTORCH=$LIBTORCH"
  echo "$LIBTORCH/lib"
  exit 0
fi

venv=${PTB_LM_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ptb-lm/torch-$TORCH_VERSION}
have_torch() {
  [[ -x "$venv/bin/python" ]] &&
    [[ "$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" == "$TORCH_VERSION" ]]
}

if have_torch; then
  log "torch $TORCH_VERSION already in $venv"
else
  log "installing torch==$TORCH_VERSION from PyPI into $venv (about 4.6 GB, a minute or two)"
  mkdir -p "$(dirname "$venv")"
  # Install into a temporary venv and rename, so an interrupted install never looks complete.
  tmp="$venv.partial"
  rm -rf "$tmp"
  python3 -m venv "$tmp"
  "$tmp/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" "$CUDA_CRT" >&2
  rm -rf "$venv"
  mv "$tmp" "$venv"
  # venv scripts hard-code their own path: recreate them for the final location.
  python3 -m venv --upgrade "$venv" >/dev/null
  have_torch || { log "torch $TORCH_VERSION did not import from $venv"; exit 1; }
fi

crt=$("$venv/bin/python" -W ignore -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')/nvidia/cu13/include/crt
if [[ ! -d "$crt" ]]; then
  log "adding $CUDA_CRT (CUDA headers for the CUDA-graph shim)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$CUDA_CRT" >&2
fi

# The tests check that a BPE checkpoint's tokenizer.json loads in Python's tokenizers and
# encodes as ptb-lm does: pinned to the release whose Rust core is the tokenizers crate
# ptb-lm builds with (Cargo.toml).
TOKENIZERS_VERSION=0.22.2
if [[ "$("$venv/bin/python" -c 'import tokenizers; print(tokenizers.__version__)' 2>/dev/null)" != "$TOKENIZERS_VERSION" ]]; then
  log "adding tokenizers==$TOKENIZERS_VERSION (the tests load BPE checkpoints' tokenizer.json with it)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "tokenizers==$TOKENIZERS_VERSION" >&2
fi

ln -sfn "$venv" "$root/.venv"
"$venv/bin/python" -W ignore -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))'
