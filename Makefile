# segvoc developer commands. Every target that needs the virtual environment creates it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= experiment=4a_baseline

.PHONY: install demo train test test-fast lint report bench gpu-check tensorboard docs docs-serve clean

# every extra (smp, export, mlflow, wandb, sweep, slurm) and the test tools, at the versions of constraints.txt
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[all,test]' -c constraints.txt
	@# 0.4 replaced hydra-optuna-sweeper (optuna<3) by segvoc's own sweeper: drop it from a venv made before
	$(PY) -m pip uninstall -q -y hydra-optuna-sweeper 2>/dev/null || true
	touch $@

install: $(VENV)/.installed  ## create .venv and install segvoc (editable) with every extra and the test tools

demo: install  ## offline end-to-end: synthetic data -> train 4a baseline -> evaluate -> report
	$(PY) -m segvoc.demo

train: install  ## make train EXP="experiment=5b_transfer trainer=gpu"
	$(PY) -m segvoc.train $(EXP)

# one pytest process per core (pytest-xdist); --dist loadfile keeps each file in one process, so a module's shared
# runs (tests/test_reliability.py's reference runs, tests/test_export.py's trained run) are trained once
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: install  ## the whole test suite (CPU; measured times in docs/performance.md)
	$(PYTEST)

test-fast: install  ## the inner loop: everything but the end-to-end subprocess runs marked slow
	$(PYTEST) -m "not slow"

lint: install
	$(VENV)/bin/ruff check segvoc tests hydra_plugins

REPORT_PRESETS := 4a_baseline,4b_improved,4c_weighted,5a_dilated,5b_transfer,5c_unet
report: install  ## smoke sweep of the six report presets on synthetic data, then the report (offline)
	rm -rf outputs/report
	SEGVOC_RESNET34_WEIGHTS=none $(PY) -m segvoc.train -m experiment=$(REPORT_PRESETS) data=synthetic \
		debug=smoke hydra.sweep.dir=outputs/report/sweep
	$(PY) -m segvoc.report sweep=outputs/report/sweep hydra.run.dir=outputs/report

bench: install  ## CPU speed benchmark (segvoc.bench)
	$(PY) -m segvoc.bench

gpu-check: install  ## one-shot GPU check (<= 8 min on one GPU): outputs/gpu_check.json + a table for docs/performance.md
	$(PY) -m segvoc.bench --gpu-check

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs

# the docs extra (mkdocs-material, mkdocstrings) beside what make install puts in .venv; the site's hook reads
# conf/schema.yaml through segvoc.config
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-cache-dir -e '.[docs]' -c constraints.txt
	touch $@

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, printed on every build
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

docs: $(VENV)/.docs-installed  ## the documentation site into site/, strict: a broken link or reference fails
	$(MKDOCS) build --strict

docs-serve: $(VENV)/.docs-installed  ## preview the site at http://127.0.0.1:8000, rebuilt as you edit
	$(MKDOCS) serve

clean:
	rm -rf outputs site .pytest_cache .ruff_cache
