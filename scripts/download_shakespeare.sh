#!/usr/bin/env bash
# Fetch Tiny Shakespeare (one raw text file, input.txt, from Karpathy's char-rnn repository)
# into a directory, checking its SHA-256 and writing SHA256SUMS beside it (ptb-lm then checks
# the file on every read). Idempotent: a file already there with the right checksum is kept.
#
# usage: scripts/download_shakespeare.sh [--dest DIR] [--from DIR_OR_URL]
#   --dest DIR    where input.txt goes (default: data/tinyshakespeare)
#   --from SRC    a local directory holding input.txt (nothing is downloaded), or a base URL.
#                 Default: $SHAKESPEARE_SOURCE, else
#                 https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare
set -euo pipefail

want=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
dest="data/tinyshakespeare"
src="${SHAKESPEARE_SOURCE:-https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare}"
name=input.txt

die() { printf 'download_shakespeare: %s\n' "$*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dest) dest="${2:?--dest needs a directory}"; shift 2 ;;
    --from) src="${2:?--from needs a directory or URL}"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/fetch.sh
. "$root/scripts/fetch.sh"
mkdir -p "$dest"
fetch_checked download_shakespeare "$src" "$name" "$dest/$name" "$want" "input.txt"
# ptb-lm checks the file against this on every read.
echo "$want  $name" > "$dest/SHA256SUMS"
