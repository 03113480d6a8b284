# Two commands on a fresh machine with only Python: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned so pip never swaps in another (multi-GB) build.
TORCH  := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: run test lint install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=77,<81"
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[$*]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-rembg

run: $(VENV)/.installed-rembg
	$(BIN)/dvc repro
	@echo ""
	@echo "Report:  $(CURDIR)/reports/index.html"
	@echo "Metrics: $(CURDIR)/reports/metrics.json"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
