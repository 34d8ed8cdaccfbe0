# The two front-door commands: `make demo` and `make test`. Both set up .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo run bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest tests

demo: venv
	$(BIN)/python tests/demo.py demo

run: venv
	$(BIN)/python tests/demo.py run

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var test-artifacts .pytest_cache
