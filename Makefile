# The two commands of the README. Each creates .venv and installs the toolkit on first use.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
# Progress bars are for people; CI logs get plain lines.
export MT_NO_PROGRESS ?= $(if $(CI),1,0)

.PHONY: demo demo-cifar test toy bench gpu-check lint clean d2 test-d2

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev,fast,cluster,tensorboard]'
	touch $(STAMP)

## demo: the main job, the whole pipeline on the toy world (runs/toy/report.md)
demo: $(STAMP)
	$(VENV)/bin/python tools/run_pipeline.py --config configs/pipeline/toy.yaml

## demo-cifar: the small-image track on the toy world (CIFAR-100 layout, 9 methods x 3 seeds, robustness;
## runs/toy_cifar/report.md), sized for a laptop CPU
demo-cifar: $(STAMP)
	$(VENV)/bin/python tools/run_pipeline.py --config configs/pipeline/toy_cifar.yaml

## test: the test suite, the cuda_semantics group included (CUDA behaviour rebuilt on the CPU; that group alone:
## pytest -m cuda_semantics)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

## d2: build detectron2 from its public source into .venv, as a detectron2 user does (no wheel on PyPI;
## it compiles C++ extensions: minutes), then run the detectron2 test group. `make test` skips that group without it.
D2_SOURCE ?= git+https://github.com/facebookresearch/detectron2.git
d2: $(STAMP)
	$(VENV)/bin/pip install '$(D2_SOURCE)' --no-build-isolation
	$(MAKE) test-d2

## test-d2: only the detectron2 tests (pytest marker d2; they skip where detectron2 is not importable)
test-d2: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m d2

## toy: only generate the demo toy world in data/toy
toy: $(STAMP)
	$(VENV)/bin/python tools/make_toy_data.py --out data/toy --preset demo

## bench: performance figures (runs/bench/bench.json and bench.md)
bench: $(STAMP)
	$(VENV)/bin/python tools/bench.py all --out runs/bench

## gpu-check: what to run first on a new GPU node: every CUDA path for a few steps on the toy world, a pass/fail
## table in runs/gpu_check/gpu_check.md (exits non-zero when a check fails, or when no CUDA device is visible)
gpu-check: $(STAMP)
	$(VENV)/bin/python tools/gpu_check.py --out runs/gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs data/toy
