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

sha() { sha256sum "$1" | cut -d' ' -f1; }
mkdir -p "$dest"
target="$dest/$name"
if [[ -f "$target" && "$(sha "$target")" == "$want" ]]; then
  [[ -f "$dest/SHA256SUMS" ]] || echo "$want  $name" > "$dest/SHA256SUMS"
  exit 0
fi
tmp="$target.partial"
rm -f "$tmp"
if [[ "$src" == http://* || "$src" == https://* ]]; then
  echo "download_shakespeare: fetching $src/$name" >&2
  if command -v curl >/dev/null; then
    curl -fsSL --retry 3 -o "$tmp" "$src/$name" || { rm -f "$tmp"; die "could not download $src/$name (offline? use --from DIR with a local copy)"; }
  elif command -v wget >/dev/null; then
    wget -q -O "$tmp" "$src/$name" || { rm -f "$tmp"; die "could not download $src/$name (offline? use --from DIR with a local copy)"; }
  else
    die "neither curl nor wget is installed; use --from DIR with a local copy"
  fi
else
  [[ -f "$src/$name" ]] || die "$src/$name: no such file (--from must be a directory holding input.txt)"
  cp "$src/$name" "$tmp"
fi
got=$(sha "$tmp")
if [[ "$got" != "$want" ]]; then
  rm -f "$tmp"
  die "$name from $src has SHA-256 $got, expected $want: refusing it (corrupt, truncated or a different file)"
fi
mv "$tmp" "$target"
echo "$want  $name" > "$dest/SHA256SUMS"
echo "download_shakespeare: $target ok" >&2
