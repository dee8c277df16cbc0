# `make demo`: set up everything and run the main job (synth -> shard -> inspect -> XDC training) on the
# built-in synthetic collection; a few minutes on 2 cores.
# `make test`: set up everything and run lint + the test suite (what CI runs).
# `make gpu-check`: on a CUDA machine, its own venv (no index reachable: the wheels `make gpu-wheels` put in
# .whl/), then tests/gpu, GPU benchmarks -> gpu-check/ (docs/gpu-check.md); no CUDA device: exits 6 at once.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: setup setup-demo demo test lint format bench clean-demo gpu-check gpu-wheels

setup:
	@bash scripts/bootstrap.sh test

setup-demo:
	@bash scripts/bootstrap.sh demo

demo: setup-demo
	$(BIN)/xdctools synth $(DEMO)/videos
	$(BIN)/xdctools shard $(DEMO)/videos -o $(DEMO)/shards --short-side 128 --workers 2
	$(BIN)/xdctools inspect $(DEMO)/shards --png $(DEMO)/inspect.png
	$(BIN)/xdctools train recipes/quickstart.yaml --set data.shards=$(DEMO)/shards --out $(DEMO)/run

test: setup lint
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/shard.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/cluster.py
	$(BIN)/python benchmarks/train.py

gpu-check:
	@bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Before a device session on this workplace's lent GPU (no index there): the wheels its image lacks -> .whl/
gpu-wheels:
	@bash scripts/gpu_wheels.sh

clean-demo:
	rm -rf $(DEMO)
