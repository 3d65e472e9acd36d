# Two commands for a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The web page is tested in headless Chromium (Debian's package; Playwright drives it).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		>/dev/null 2>&1 || echo "chromium could not be installed: the web page tests will skip"

run: $(STAMP)
	$(BIN)/jobq serve

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/mypy pipeline adapters handlers
	$(BIN)/lint-imports
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/makespan.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/instructions.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
