# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds this machine kind keeps on disk (no multi-GB download);
# torchvision is needed by the Qwen2-VL processor of the Kandinsky 5 text encoder.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kandinsky-batch run configs/tiny.yaml
	$(BIN)/kandinsky-batch verify ./outputs/demo

test: install
	$(BIN)/pytest

clean:
	rm -rf outputs .pytest_cache
