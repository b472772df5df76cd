#!/usr/bin/env bash
# Make gloo's headers available to the build, for multi-process training (`--nproc`, launcher
# ranks): c10d's ProcessGroupGloo is in libtorch, but its header includes <gloo/...>, which the
# torch wheel does not ship. Debian's libgloo-dev has them (headers only are used).
#
# Installs it only where it is missing and this user can (root with apt-get); elsewhere it
# says what to install and exits 0: ptb-lm then builds without multi-process training.
set -euo pipefail
log() { printf 'setup-gloo: %s\n' "$*" >&2; }

if [[ -f "${GLOO_INCLUDE:-/usr/include}/gloo/algorithm.h" ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  log "installing libgloo-dev (gloo's headers, for multi-process training)"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev >/dev/null 2>&1 ||
     { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev >/dev/null 2>&1; }; then
    exit 0
  fi
  log "could not install libgloo-dev; building without multi-process training"
  exit 0
fi
log "gloo's headers are missing: install libgloo-dev (or set GLOO_INCLUDE) for multi-process training"
