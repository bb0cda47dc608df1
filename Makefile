# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
G4 := $(VENV)/bin/good4cir
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_PAIRS ?= 2000

.PHONY: demo test setup chromium bench

setup: $(STAMP)

# torch/torchvision are pinned to the builds this machine kind has on disk; any
# torch>=2.2 works for the project itself.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(G4) demo-world --out $(DEMO_DIR)/world --pairs $(DEMO_PAIRS) --seed 0
	$(G4) import --db $(DEMO_DIR)/good4cir.db --format pairs $(DEMO_DIR)/world

# Browser tests drive Debian's Chromium; install it once if it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/store_bench.py
