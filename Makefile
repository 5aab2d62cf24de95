# The course in two commands:  make course  (set up + run the tiny course)  and  make test.
# While editing: make check (the fast tier: Rust tests + pytest without the course, the browser and the slow integration tests).
# Every target bootstraps what it needs; a second run only redoes what changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
NAME ?= $(PROFILE)
RUST_SRC := $(wildcard rustbpe/src/*.rs) rustbpe/Cargo.toml rustbpe/Cargo.lock rustbpe/pyproject.toml rustbpe/nanochat_rustbpe.pyi

.PHONY: setup browser course test check lab export bench help site
help:
	@echo "make course   set up .venv and run the whole course headless (PROFILE=$(PROFILE))"
	@echo "make test     set up .venv and run the whole test suite (the tiny course and the browser tests included)"
	@echo "make check    the fast tier while editing: Rust tests + pytest without the course, browser and slow tests (< 5 min)"
	@echo "make lab      open JupyterLab on notebooks/"
	@echo "make export   regenerate nanochat_lib/ from the notebooks (nbdev-export) and clean them"
	@echo "make bench    tokenizer benchmark: ours vs rustbpe vs HF tokenizers"
	@echo "make site     the course site in _site/: the reference run's notebooks, the course map, the API"

setup: $(VENV)/.deps $(VENV)/.rust $(VENV)/.kernel
APT_GET := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

$(VENV)/.deps: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"' || exit 1
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

$(VENV)/.rust: $(VENV)/.deps $(RUST_SRC)
	@command -v cargo >/dev/null || { echo "error: cargo not found; install a Rust toolchain (rustup) first"; exit 1; }
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q -m rustbpe/Cargo.toml
	@touch $@

$(VENV)/.kernel: $(VENV)/.deps
	$(PY) -m ipykernel install --sys-prefix --name nanochat --display-name "Python (nanochat)" >/dev/null
	@touch $@

# The browser tests drive Debian's Chromium with Playwright (Playwright's own browser download needs the internet).
browser:
	@command -v chromium >/dev/null || { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends chromium >/dev/null; }
	@command -v chromium >/dev/null || { echo "error: chromium is missing; install Debian's chromium package"; exit 1; }

course: setup
	$(PY) run_all.py --profile $(PROFILE) --name $(NAME)

test: setup browser
	cargo test -q --manifest-path rustbpe/Cargo.toml
	$(PY) -m pytest -q

# Markers (pyproject.toml): `course` runs the tiny course end to end, `browser` drives Chromium, `site` builds the course site.
check: setup
	cargo test -q --manifest-path rustbpe/Cargo.toml
	$(PY) -m pytest -q -m "not course and not browser and not site and not slow"

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

export: $(VENV)/.deps
	$(VENV)/bin/nbdev-export
	$(VENV)/bin/nbdev-clean

bench: setup
	$(PY) -m nanochat_lib.bench tokenizer

# The course site: MkDocs renders SITE_RUN's executed notebooks, the README's course map and the API into _site/.
SITE_RUN ?= runs/reference-tiny
$(VENV)/.site: $(VENV)/.deps pyproject.toml
	$(PY) -m pip install -q -e ".[site]"
	@touch $@

site: $(VENV)/.site
	$(PY) docs/build_site.py --run $(SITE_RUN) --out _site
