# loraq: LoRA training for Stable Diffusion as a queued service.
#
#   make setup   create .venv and install the project (torch's CPU wheel first), and the
#                dashboard's npm packages into node_modules/ (npm ci)
#   make run     the whole service: migrations, Redis, demo model, API on :8000 and one worker
#   make worker  one more worker against the same settings (another GPU, another host)
#   make demo    a short training from the command line on a tiny generated model and dataset
#   make test    start PostgreSQL and Redis if needed (and install Chromium for the dashboard's
#                browser tests), then run the test suite
#   make bench   run the trainer, flow-matching and service benchmarks and update BENCHMARKS.md
#   make clean   remove var/ and caches (keeps .venv)

PYTHON_SYSTEM ?= python3
VENV          := .venv
PY            := $(VENV)/bin/python
STAMP         := $(VENV)/.installed
NODE_STAMP    := node_modules/.installed
CHROMIUM      := /usr/bin/chromium
TORCH         := torch==2.13.0
PYTEST_ARGS   ?=

# Everything runs offline: the demo and the tests build their own tiny model.
export HF_HUB_OFFLINE := 1

DEMO_MODEL    := var/models/tiny-sd
DEMO_DATA     := var/datasets/sample
DEMO_OUT      := var/runs/demo

.PHONY: setup run worker demo test bench clean services chromium wrk

setup: $(STAMP) $(NODE_STAMP)

# torch goes in first so pip takes the CPU wheel found on this machine; resolved later as a
# plain dependency it would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The dashboard's front-end packages (uPlot; playwright-core for its browser tests), exactly as
# package-lock.json pins them. The API serves uPlot from node_modules; nothing is copied.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(DEMO_MODEL)/model_index.json: | $(STAMP)
	$(PY) -m trainer tiny-model $(DEMO_MODEL)

$(DEMO_DATA)/.done: | $(STAMP)
	$(PY) -m trainer sample-data $(DEMO_DATA) --count 8 --size 48
	touch $@

# The service on the embedded defaults (SQLite under var/, the local Redis, the demo model
# tiny-sd); LORAQ_* variables change them. Ctrl-C stops everything it started.
run: setup
	$(PY) -m loraq.launcher

worker: setup
	$(PY) -m worker

# The trainer alone. Events go to $(DEMO_OUT)/events.jsonl as JSON lines; the log and progress
# bar go to the terminal.
demo: setup $(DEMO_MODEL)/model_index.json $(DEMO_DATA)/.done
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(PY) -m trainer train \
	    --pretrained_model_name_or_path $(DEMO_MODEL) --train_data_dir $(DEMO_DATA) \
	    --resolution 32 --max_train_steps 30 --train_batch_size 2 --seed 0 \
	    --checkpointing_steps 10 --output_dir $(DEMO_OUT) \
	    --validation_prompt "a red circle" --num_validation_images 1 \
	    --validation_steps 10 --validation_inference_steps 5 > $(DEMO_OUT)/events.jsonl
	@echo
	@echo "LoRA:        $$(ls $(DEMO_OUT)/*.safetensors | tr '\n' ' ')"
	@echo "checkpoints: $$(cd $(DEMO_OUT) && ls -d checkpoint-* | tr '\n' ' ')"
	@echo "images:      $$(ls $(DEMO_OUT)/validation/* | tr '\n' ' ')"
	@echo "events:      $(DEMO_OUT)/events.jsonl"

# Start PostgreSQL and Redis unless they already answer; a start that fails because the
# service came up meanwhile is fine, so the check is repeated rather than the start trusted.
services:
	@pg_isready -q -h 127.0.0.1 || { \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true; \
	    for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done; \
	    pg_isready -h 127.0.0.1; }
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || { \
	    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
	        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true; \
	    for i in $$(seq 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 1; done; \
	    redis-cli -h 127.0.0.1 ping; }

# Debian's Chromium for the dashboard's browser tests (playwright-core drives it; no browser
# download). Needs root, as CI has.
chromium:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }

test: setup services chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# wrk drives the API load benchmark (without it bench.service falls back to an httpx client that
# spends more CPU than the server it measures, and says so).
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends wrk; }

bench: setup services wrk
	$(PY) -m bench.trainer
	$(PY) -m bench.flow
	$(PY) -m bench.service

clean:
	rm -rf var .pytest_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
