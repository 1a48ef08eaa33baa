# `make demo` and `make test` are the only two commands a newcomer needs.
# Both create .venv (if missing) and install the package with the pinned constraints.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	@echo "make demo: the trainer lands with issue 4 (training loop on DeepSpeed ZeRO-3)."
	@echo "For now it builds the tiny ParGo model and prints its summary:"
	$(BIN)/pargo-dist model --preset tiny --run

bench: $(STAMP)
	$(BIN)/python benchmarks/projector.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
