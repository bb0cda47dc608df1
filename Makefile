# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
G4 := $(VENV)/bin/good4cir
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_PAIRS ?= 2000
DEMO_MINUTES ?= 9.5
DEMO_ERROR_RATE ?= 0.05
DB := $(DEMO_DIR)/good4cir.db
PORT ?= 7860

.PHONY: demo demo-data test setup chromium bench clean-demo

setup: $(STAMP)

# torch/torchvision are pinned to the builds this machine kind has on disk; any
# torch>=2.2 works for the project itself.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job on the demo world: build it, import it, annotate it with the offline
# simulator, score the annotations against ground truth, train and evaluate the
# fusion model, index the gallery, then open the review app. Each step is skipped
# when its output exists, so a second `make demo` goes straight to the app.
demo: $(DEMO_DIR)/.indexed
	@echo "Review app: http://127.0.0.1:$(PORT)  (Ctrl-C to stop)"
	$(G4) app --db $(DB) --index $(DEMO_DIR)/index --port $(PORT)

demo-data: $(DEMO_DIR)/.annotated

$(DEMO_DIR)/.world: $(STAMP)
	$(G4) demo-world --out $(DEMO_DIR)/world --pairs $(DEMO_PAIRS) --seed 0
	touch $@

$(DEMO_DIR)/.imported: $(DEMO_DIR)/.world
	$(G4) import --db $(DB) --format pairs $(DEMO_DIR)/world
	touch $@

$(DEMO_DIR)/.annotated: $(DEMO_DIR)/.imported
	$(G4) annotate --db $(DB) --backend simulator --error-rate $(DEMO_ERROR_RATE)
	$(G4) score --db $(DB) --plot $(DEMO_DIR)/hallucinations.png
	touch $@

$(DEMO_DIR)/.trained: $(DEMO_DIR)/.annotated
	$(G4) train --db $(DB) --out $(DEMO_DIR)/model --minutes $(DEMO_MINUTES) --overwrite
	$(G4) eval --db $(DB) --checkpoint $(DEMO_DIR)/model --split test --plot $(DEMO_DIR)/recall.png
	touch $@

$(DEMO_DIR)/.indexed: $(DEMO_DIR)/.trained
	$(G4) index --db $(DB) --checkpoint $(DEMO_DIR)/model --out $(DEMO_DIR)/index --split test
	touch $@

clean-demo:
	rm -rf $(DEMO_DIR)

# Browser tests drive Debian's Chromium; install it once if it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/store_bench.py
	$(PY) bench/demo_world_bench.py
	$(PY) bench/pipeline_bench.py
	$(PY) bench/retrieval_bench.py
	$(PY) bench/faiss_bench.py
	$(PY) bench/ui_bench.py
