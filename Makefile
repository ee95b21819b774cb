# Recipes. `make test` sets everything up on a fresh Debian machine (apt + .venv) and runs the tests;
# re-running it skips every set-up step whose inputs did not change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CACHE := .cache
APT_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test test-all demo demo-full demo-text bench clean

setup: $(VENV)/.installed

# Debian packages: FFCV compiles against OpenCV and libjpeg-turbo; Fashion-MNIST is the built-in dataset.
$(CACHE)/.apt-installed:
	@mkdir -p $(CACHE)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@touch $@

# The venv is rebuilt only when a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-build.txt requirements-data.txt $(CACHE)/.apt-installed
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps -r requirements-build.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	@touch $@

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(CACHE)/.apt-installed
