# Quick start: `make demo` and `make test` do all the set-up themselves on a fresh machine.
PYTHON ?= python3
# The torch installed when none is present: the floor that pyproject.toml and requirements.txt
# state (torch>=2.13, MIN_TORCH in megatron_m6/__init__.py), pinned to one release.
TORCH_VERSION ?= 2.13.0
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: torch install deps test-deps lint demo test test-seeds test-slurm bench bench-data bench-checkpoint bench-demo gpu-check

# torch first, pinned, and only when none is present: an unpinned torch would pull a CUDA build,
# and a user's own (CUDA) torch must never be replaced. One that is too old stops here with
# megatron_m6's own one-line error, before pip would try to replace it.
torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import megatron_m6"

# The repo itself is installed editable (no dependencies) so `python -m megatron_m6...` finds
# m6_kernels, which lives in kernels/, from anywhere.
deps: torch
	@$(PIP) -r requirements.txt
	@$(PIP) --no-deps -e .

# pycocoevalcap (coco-caption's scorers, the reference of tests/test_metrics.py) without its
# dependencies: it declares pycocotools, which pulls matplotlib; the Bleu, Rouge and Cider scorers
# the tests use are pure Python.
test-deps: torch
	@$(PIP) -r requirements-test.txt
	@$(PIP) --no-deps pycocoevalcap==1.2
	@$(PIP) --no-deps -e .

install: torch
	$(PIP) -e .

demo: deps
	bash examples/pretrain_m6_tiny.sh

# ruff, configured in pyproject.toml (a pinned version, from requirements-test.txt).
lint: test-deps
	$(PYTHON) -m ruff check .

# The linter, then the machine (CPU, versions, threads): a failure report then says where it ran.
test: test-deps lint
	@$(PYTHON) tools/machine_info.py
	$(PYTHON) -m pytest -q tests

# The SLURM launch scripts under a real one-node SLURM on this machine: installs slurm-wlm and
# munge with apt-get when missing (needs root), starts the daemons from build/slurm/, runs
# tests_slurm/ and stops them. Kept out of `make test`, which needs no SLURM.
test-slurm: test-deps
	bash tools/slurm/local_cluster.sh run $(PYTHON) -m pytest -q tests_slurm

# The kernel, MoE, attention and model tests under SEEDS fresh seeds (torch's global generator
# from M6_TEST_SEED; the kernel tests draw their own from os.urandom): every failing seed is printed.
SEEDS ?= 50
SEEDED_TESTS := tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_norm_ce.py \
	tests/test_moe.py tests/test_attention.py tests/test_model.py
test-seeds: test-deps
	@failed=0; log=$$(mktemp); for i in $$(seq $(SEEDS)); do \
	  seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	  M6_TEST_SEED=$$seed $(PYTHON) -m pytest -q -p no:cacheprovider $(SEEDED_TESTS) > $$log 2>&1 \
	    || { failed=$$((failed + 1)); echo "seed $$seed failed:"; grep -E "^(FAILED|E )" $$log | head -5; }; \
	done; rm -f $$log; echo "$$failed of $(SEEDS) seeded runs failed"; [ $$failed -eq 0 ]

bench: deps
	$(PYTHON) tools/bench/train_step.py

# Corpus building (text MB/s, images/s) and data loader samples/s; numbers in docs/PERFORMANCE.md.
bench-data: deps
	$(PYTHON) tools/bench/data_pipeline.py

# Checkpoint save/load GB/s for an m6-base-shaped model; numbers in docs/PERFORMANCE.md.
bench-checkpoint: deps
	$(PYTHON) tools/bench/checkpoint.py

# The pretraining demo's held-out caption accuracy for seeds 1-3 with 1 and 2 intra-op threads
# (six demo runs, about 36 minutes on 2 cores): exits 1 when a run is below 95/100.
bench-demo: deps
	$(PYTHON) tools/bench/demo_captions.py

# The one GPU check (sections a-h, at most 8 minutes on one H100/H200; gpu_check.md and .json in
# $OUT or gpu_check/). Installs nothing from a registry: see tools/bench/gpu_check.py.
gpu-check:
	PYTHON=$(PYTHON) bash tools/bench/gpu_check.sh
