# segvoc developer commands. Every target that needs the virtual environment creates it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= experiment=4a_baseline

.PHONY: install demo train test test-fast lint report bench gpu-check tensorboard clean

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

test: install  ## the whole test suite (CPU; see README for the measured time)
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

gpu-check: install  ## one-shot GPU check (<= 8 min on one GPU): outputs/gpu_check.json + a README-ready table
	$(PY) -m segvoc.bench --gpu-check

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf outputs .pytest_cache .ruff_cache
