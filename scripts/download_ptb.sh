#!/usr/bin/env bash
# Fetch the Penn Treebank (Mikolov's split: ptb.{train,valid,test}.txt) into a directory,
# checking each file's SHA-256 against scripts/ptb.sha256. Idempotent: files already there
# with the right checksum are kept.
#
# usage: scripts/download_ptb.sh [--dest DIR] [--from DIR_OR_URL]
#   --dest DIR    where the files go (default: data/ptb)
#   --from SRC    a local directory holding the three files (nothing is downloaded), or a
#                 base URL. Default: $PTB_SOURCE, else the source the book uses,
#                 https://raw.githubusercontent.com/tomsercu/lstm/master/data
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
sums="$root/scripts/ptb.sha256"
dest="data/ptb"
src="${PTB_SOURCE:-https://raw.githubusercontent.com/tomsercu/lstm/master/data}"

die() { printf 'download_ptb: %s\n' "$*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dest) dest="${2:?--dest needs a directory}"; shift 2 ;;
    --from) src="${2:?--from needs a directory or URL}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# shellcheck source=scripts/fetch.sh
. "$root/scripts/fetch.sh"
expected() { awk -v f="$1" '$2 == f { print $1 }' "$sums"; }

mkdir -p "$dest"
for name in ptb.train.txt ptb.valid.txt ptb.test.txt; do
  fetch_checked download_ptb "$src" "$name" "$dest/$name" "$(expected "$name")" "the three PTB files"
done
# ptb-lm re-checks the files against this on every load.
cp "$sums" "$dest/SHA256SUMS"
