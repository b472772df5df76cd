# ptb-lm. A new machine needs exactly two commands (see README.md):
#   make train   set up libtorch and PTB if missing, build, train configs/better.toml
#   make test    set up libtorch and PTB if missing, then format, lint and test everything
#
# Variables: CONFIG (default configs/better.toml), ARGS (extra `ptb-lm train` arguments,
# e.g. ARGS=--overwrite), PTB_DIR (default data/ptb), PTB_SOURCE (a local directory holding
# the PTB files instead of the network; see scripts/download_ptb.sh), SHAKESPEARE_DIR and
# SHAKESPEARE_SOURCE (the same for Tiny Shakespeare, which the tests and
# configs/shakespeare.toml read).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CONFIG ?= configs/better.toml
ARGS ?=
PTB_DIR ?= data/ptb
SHAKESPEARE_DIR ?= data/tinyshakespeare
ENV := source scripts/env.sh &&

.PHONY: train test setup data shakespeare build bench
.DEFAULT_GOAL := train

setup:
	@scripts/setup-libtorch.sh >/dev/null
	@scripts/setup-gloo.sh

data:
	@scripts/download_ptb.sh --dest $(PTB_DIR)
	@if grep -q tinyshakespeare $(CONFIG); then scripts/download_shakespeare.sh --dest $(SHAKESPEARE_DIR); fi

shakespeare:
	@scripts/download_shakespeare.sh --dest $(SHAKESPEARE_DIR)

build: setup
	@$(ENV) cargo build --release

train: data build
	@$(ENV) cargo run --release --quiet -- train --config $(CONFIG) $(ARGS)

test: data shakespeare setup
	@$(ENV) cargo fmt --check
	@$(ENV) cargo clippy --release --all-targets --quiet -- -D warnings
	@$(ENV) PTB_DIR=$(PTB_DIR) SHAKESPEARE_DIR=$(SHAKESPEARE_DIR) cargo test --release
	@$(ENV) cargo run --release --quiet --example sine -- --out target/sine.png

# Side-by-side speed against plain PyTorch (bench/bench.py; needs the GPU for the GPU table).
bench: data build
	@$(ENV) python bench/bench.py --bin $${CARGO_TARGET_DIR:-target}/release/ptb-lm $(ARGS)
