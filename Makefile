# `make demo` and `make test` each set everything up first; a second run reuses the environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup java data browser demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on CPU-only machines this is the local CPU build, elsewhere the default build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) java

# Java from Debian's packages for the caption metrics (pycocoevalcap's PTB tokenizer and METEOR run on it); without it
# (no apt-get, not root) `vitlab caption eval` reports those metrics as unavailable and their tests skip, saying why.
java:
	@if ! command -v java >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing default-jre-headless for the caption metrics"; \
		(apt-get install -y -qq default-jre-headless >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq default-jre-headless >/dev/null 2>&1)) || \
		echo "note: could not install default-jre-headless; the caption metrics that need Java will be unavailable"; \
	fi

# Fashion-MNIST from Debian's package where apt-get is available; the demo falls back to digits otherwise.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; the demo will use digits"; \
	fi

# Headless Chromium and its driver from Debian's packages for the browser test (tests/test_browser.py); without
# them (no apt-get, not root) that test skips and says why.
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver for the browser test"; \
		(apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) || \
		echo "note: could not install chromium; the browser test will be skipped"; \
	fi

demo: setup data
	$(BIN)/vitlab train --config configs/demo.yaml

test: setup browser
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
