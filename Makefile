# `make demo` and `make test` are the only two commands a newcomer needs.
# Both create .venv (if missing) and install the package with the pinned constraints.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test demo bench study clean

# Byte-code: pip would compile every module of the 2 GB stack at install (~90 s on 2 cores, most
# never imported); with --no-compile Python compiles a module the first time it is imported and
# keeps the result. PYTHONDONTWRITEBYTECODE (set in some environments, this one's included) would make
# every process compile again, so it is cleared for the commands below.
export PYTHONDONTWRITEBYTECODE :=

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[test]"
	# W&B and MLflow for tests/test_trackers.py only, in a directory of their own: installed
	# beside the stack, megatron-core imports wandb and DeepSpeed's autotuner imports mlflow in
	# every process (seconds each: the suite took 18:07 with them there, 14:46 without). The test
	# puts this directory on its path.
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt --target $(VENV)/trackers \
		"wandb>=0.31" "mlflow-skinny>=3.17"
	touch $(STAMP)

# The suite's processes are forked from a pre-imported server (tests/conftest.py); it runs as two
# pytest sessions at once, each with its own /dev/shm where root allows (tests/support/run_groups.py;
# PARGO_TEST_GROUPS=1: one session); the last line says how long the whole run took, install excluded.
test: $(STAMP)
	@start=$$(date +%s); OMP_NUM_THREADS=1 $(BIN)/python tests/support/run_groups.py $(PYTEST_ARGS); rc=$$?; \
	secs=$$(( $$(date +%s) - start )); \
	echo "make test: pytest exited $$rc after $$((secs / 60)) min $$((secs % 60)) s ($$secs s) on $$(nproc) cores"; \
	exit $$rc

# The main job on the embedded default: synthetic data, 2 ranks, ZeRO-3, checkpoints,
# TensorBoard logs in runs/tiny-cpu/tb, then export, a caption for two held-out images, the
# held-out evaluation (loss, detail recall; tiny-cpu trains on captions only, so no yes/no set)
# and PNG plots in runs/tiny-cpu/report.
# launchers/launch.py is the same launcher `pargo-dist train --nproc N` and sbatch jobs use.
# Run it again and it resumes (here: finds the finished run and only exports).
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python launchers/launch.py --nproc 2 -- recipes/tiny-cpu.yaml
	$(BIN)/pargo-dist export runs/tiny-cpu --out runs/tiny-cpu/export
	$(BIN)/pargo-dist generate runs/tiny-cpu/export --held-out 0
	$(BIN)/pargo-dist generate runs/tiny-cpu/export --held-out 1
	OMP_NUM_THREADS=1 $(BIN)/pargo-dist eval runs/tiny-cpu --nproc 2 --mme none
	$(BIN)/pargo-dist report runs/tiny-cpu

bench: $(STAMP)
	$(BIN)/python benchmarks/projector.py

# ParGo vs Q-Former vs MLP on detail perception (about 15 min on 2 cores); table + plots in runs/study
study: $(STAMP)
	$(BIN)/python benchmarks/projector_study.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
