# Sourced by the download scripts: fetch one file, checked against its SHA-256.
#
# fetch_checked TOOL SRC NAME TARGET WANT HINT
#   TOOL    the calling script's name, for messages
#   SRC     a local directory holding NAME, or a base URL (http:// or https://)
#   NAME    the file's name under SRC
#   TARGET  where it goes; kept as it is when it already has the checksum WANT
#   HINT    what --from must hold, for the error when SRC lacks NAME
# The file is written to TARGET.partial and renamed only once its checksum is right, so an
# interrupted or refused download never looks installed. Prints "TARGET ok" when it installed one.

sha() { sha256sum "$1" | cut -d' ' -f1; }

fetch_checked() {
  local tool=$1 src=$2 name=$3 target=$4 want=$5 hint=$6
  local die_prefix="$tool: "
  if [[ -f "$target" && "$(sha "$target")" == "$want" ]]; then
    return 0
  fi
  local tmp="$target.partial"
  rm -f "$tmp"
  if [[ "$src" == http://* || "$src" == https://* ]]; then
    echo "$tool: fetching $src/$name" >&2
    local offline="could not download $src/$name (offline? use --from DIR with a local copy)"
    if command -v curl >/dev/null; then
      curl -fsSL --retry 3 -o "$tmp" "$src/$name" || { rm -f "$tmp"; echo "$die_prefix$offline" >&2; exit 1; }
    elif command -v wget >/dev/null; then
      wget -q -O "$tmp" "$src/$name" || { rm -f "$tmp"; echo "$die_prefix$offline" >&2; exit 1; }
    else
      echo "${die_prefix}neither curl nor wget is installed; use --from DIR with a local copy" >&2
      exit 1
    fi
  else
    if [[ ! -f "$src/$name" ]]; then
      echo "$die_prefix$src/$name: no such file (--from must be a directory holding $hint)" >&2
      exit 1
    fi
    cp "$src/$name" "$tmp"
  fi
  local got
  got=$(sha "$tmp")
  if [[ "$got" != "$want" ]]; then
    rm -f "$tmp"
    echo "$die_prefix$name from $src has SHA-256 $got, expected $want: refusing it (corrupt, truncated or a different file)" >&2
    exit 1
  fi
  mv "$tmp" "$target"
  echo "$tool: $target ok" >&2
}
