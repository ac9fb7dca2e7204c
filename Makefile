# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds this machine kind keeps on disk (no multi-GB download);
# torchvision is needed by the Qwen2-VL processor of the Kandinsky 5 text encoder.
TORCH := torch==2.14.1 torchvision==0.29.1
# The report's browser test (tests/test_report_browser.py) drives Debian's Chromium through Playwright.
CHROMIUM := /usr/bin/chromium
APT := env DEBIAN_FRONTEND=noninteractive apt-get -y -q

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

# As root or through sudo; `apt-get update` only when the package lists do not know chromium yet.
$(CHROMIUM):
	@if ! command -v apt-get >/dev/null; then \
	  echo "$(CHROMIUM) is missing and there is no apt-get: install Chromium there (the browser test needs it)"; exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
	  echo "$(CHROMIUM) is missing: run 'apt-get install -y chromium' as root (the browser test needs it)"; exit 1; fi; \
	$$sudo $(APT) install chromium || { $$sudo $(APT) update && $$sudo $(APT) install chromium; }

demo: install
	$(BIN)/kandinsky-batch run configs/tiny.yaml
	$(BIN)/kandinsky-batch verify ./outputs/demo
	$(BIN)/kandinsky-batch run configs/tiny-sr.yaml
	$(BIN)/kandinsky-batch verify ./outputs/demo-sr
	$(BIN)/kandinsky-batch run configs/tiny-sweep.yaml
	$(BIN)/kandinsky-batch verify ./outputs/demo-sweep
	$(BIN)/kandinsky-batch score ./outputs/demo-sweep --metrics motion,shot_cuts,clip_score --no-progress
	$(BIN)/kandinsky-batch report ./outputs/demo-sweep
	$(BIN)/kandinsky-batch export ./outputs/demo-sweep --format webdataset --to ./outputs/demo-set \
	    --where "clip_score > 25 AND shot_cuts = 0" --split val=0.1

test: install $(CHROMIUM)
	$(BIN)/pytest

clean:
	rm -rf outputs .pytest_cache
