# The two commands README.md starts with: `make run` and `make test`. Each creates the virtual
# environment it needs on first use.
VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.embedkit-installed
# The CPU build of torch: on this machine kind `pip install torch==2.13.0` takes it from local disk.
# Elsewhere, e.g.: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
# CI and the mini scale never want CUDA wheels (several GB); set ALLOW_CUDA=1 on a GPU machine.
ALLOW_CUDA ?= 0

.PHONY: install run smoke sweep test bench device-check reproduce plots report clean base

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@if [ "$(ALLOW_CUDA)" != "1" ]; then $(PY) -c "import torch, sys; sys.exit('a CUDA build of torch was installed; use a CPU build or ALLOW_CUDA=1' if torch.version.cuda else 0)"; fi
	@touch $@

install: $(STAMP)

run: install
	$(PY) run.py +experiment=bge_ablation_batchsize

smoke: install
	$(PY) run.py +experiment=bge_ablation_batchsize debug=smoke

sweep: install
	$(PY) run.py -m +experiment=bge_ablation_batchsize data.batch_size=32,64 data.train_group_size=1,2

# The mini base every mini row starts from (conf/model/tiny_zh.yaml init_from): masked-LM
# pre-training of the tiny encoder (conf/experiment/mini_base.yaml), then its model folder replaces
# the committed embedkit/models/zh_mini_base. Only needed to change the base; ~20 min on 2 cores.
base: install
	rm -rf logs/mini_base
	$(PY) run.py +experiment=mini_base hydra.run.dir=logs/mini_base logger=csv
	rm -rf embedkit/models/zh_mini_base
	cp -r logs/mini_base/model embedkit/models/zh_mini_base

test: install
	$(PY) -m pytest

# Every mini ablation (not the paper-scale GradCache one), then experiments/*/RESULTS.md. Every row
# runs with 3 seeds (seeds=3: tables show mean ± std, findings say "within noise" under 2·SE): about
# 2 h on 2 cores (README "Reproducing the papers" has each experiment's time). Resumable: each experiment runs
# in a fixed folder, logs/reproduce/<experiment>/, so a re-run skips experiments whose table.json
# holds every row with that many seeds and, inside an interrupted one, keeps finished (row, seed)
# pairs and stages and continues the interrupted stage from its checkpoint (README "When things go
# wrong"). CSV logs: the notebooks read the loss curves from them. A folder left by a one-seed
# `make reproduce` is refused (the layouts differ): delete it, or pass REPRODUCE_ARGS=logger=csv.
# The list comes from the experiment configs: each conf/experiment/*.yaml with `report.reproduce:
# true`, in `report.order` (`python -m embedkit.reporting.experiments show`); `make reproduce
# REPRODUCE="mrl_dims"` runs only that one. Experiment configs kept outside conf/:
# EXTRA_CONF="dir ..." (each holding experiment/*.yaml; put on Hydra's search path).
EXTRA_CONF     ?=
CONF_ARGS      := $(foreach d,$(EXTRA_CONF),--extra-config-dir $(abspath $(d)))
REPRODUCE      ?= $(shell $(PY) -m embedkit.reporting.experiments $(CONF_ARGS) list --reproduce)
REPRODUCE_ARGS ?= logger=csv seeds=3
reproduce: install
	$(PY) -m embedkit.reporting.experiments $(CONF_ARGS) reproduce --logs logs $(REPRODUCE) -- $(REPRODUCE_ARGS)
	$(MAKE) plots report

# The PNGs of the notebooks each experiment config lists (report.plots), from logs/reproduce/.
plots: install
	$(PY) -m embedkit.reporting.plots --runs logs/reproduce --out experiments $(CONF_ARGS)

# experiments/*/RESULTS.md from the newest finished runs under logs/.
report: install
	$(PY) -m embedkit.reporting.report --runs logs --out experiments $(CONF_ARGS)

# Speed targets (never timed tests): writes benchmarks/RESULTS.md (~27 min on 2 cores; interleaved
# rounds, see the script's docstring). BENCH_ARGS="--sections all" adds GradCache and memory.
BENCH_ARGS ?=
bench: install
	$(PY) benchmarks/bench_contrastive.py $(BENCH_ARGS)

# One prepared check on a CUDA machine (<= 8 min on an H200): benchmarks/RESULTS_device.md + .json.
# A fresh GPU machine needs a CUDA build of torch first: make install ALLOW_CUDA=1 TORCH_SPEC="...".
# `python benchmarks/device_check.py --dry` runs every section on CPU in seconds (tests/test_device_check.py).
device-check: install
	$(PY) benchmarks/device_check.py

clean:
	rm -rf logs .cache
