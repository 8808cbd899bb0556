# Two commands for a fresh Debian machine (see README.md):
#   make run    install the appliance into .venv (and the OHIF viewer into .cache/ohif),
#               then serve ./data on 127.0.0.1:11112
#   make test   install what the tests need (venv, dcmtk) and run ruff and the suite
# The install logic lives in scripts/ so that each step is idempotent and quiet.

VENV    := .venv
BIN     := $(VENV)/bin
DATA    ?= ./data
PYTEST_ARGS ?=
# Test workers (pytest-xdist): the suite mostly waits on subprocesses and sockets, so the
# 2-core machine runs 4 workers well (measured: README.md, "Running the tests").
# --dist loadfile gives each module whole to one worker (module fixtures are built once;
# the Ansible fleet must be); --no-loadscope-reorder keeps the collection order, longest
# modules first (tests/conftest.py). TEST_WORKERS=0, or PYTEST_ARGS="-n 0" (the last -n
# wins), runs the suite serially in one process.
TEST_WORKERS ?= 4
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
SOAK_STEPS  ?= 600
SOAK_SEEDS  ?= 1 2 3 4
# Power cuts per soak seed on crashfs (tests/test_power_loss.py; the suite runs 3).
POWER_CUTS  ?= 20
# The seeded fuzz tests of the network edges (tests/fuzzing.py), per soak seed.
FUZZ_STEPS  ?= 2000
# The one instance that soak sends end to end (tests/test_large_instance.py), MiB: past
# 4 GiB. It needs about three times that in free disk space.
LARGE_INSTANCE_MIB ?= 4400
FUZZ_MODULES := tests/test_hl7_fuzz.py tests/test_http_fuzz.py tests/test_header_scan.py \
                tests/test_dicom_fuzz.py

.PHONY: run test test-fast soak lint bench venv venv-test viewer test-deps clean help

help:
	@echo "make run        install and start pacs-edge on $(DATA) (DICOM 127.0.0.1:11112)"
	@echo "make test       install test dependencies, run ruff and the whole suite ($(TEST_WORKERS) workers)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make soak       long randomized tiering runs ($(SOAK_STEPS) steps) and fuzz runs"
	@echo "                ($(FUZZ_STEPS) steps) and power cuts ($(POWER_CUTS)), one seed after"
	@echo "                another: $(SOAK_SEEDS); then one $(LARGE_INSTANCE_MIB) MiB instance"
	@echo "make lint       ruff only"
	@echo "make bench      the benchmark (bench/run.sh)"

venv:
	@scripts/setup-venv.sh

venv-test:
	@scripts/setup-venv.sh --test

# The OHIF viewer that serve publishes at / (npm registry, pinned; see docs/web.md).
viewer:
	@scripts/install-ohif.sh

test-deps: venv-test
	@scripts/setup-test-deps.sh

run: venv viewer
	@test -f $(DATA)/pacs-edge.toml || $(BIN)/pacs-edge init --home $(DATA)
	exec $(BIN)/pacs-edge serve --home $(DATA)

lint: venv-test
	$(BIN)/ruff check .

test: test-deps lint
	$(BIN)/pytest $(PARALLEL) $(PYTEST_ARGS)

test-fast: test-deps
	$(BIN)/pytest $(PARALLEL) -m "not slow" $(PYTEST_ARGS)

# The randomized tiering test, the edge fuzz tests and the power cuts with many more
# operations than the suite runs, one seed after another, serially; a failure names its
# seed (PACS_EDGE_RANDOM_SEED, PACS_EDGE_FUZZ_SEED or PACS_EDGE_POWER_SEED replays it).
soak: test-deps
	@for seed in $(SOAK_SEEDS); do \
		echo "soak: seed $$seed, $(SOAK_STEPS) steps"; \
		PACS_EDGE_RANDOM_SEED=$$seed PACS_EDGE_RANDOM_STEPS=$(SOAK_STEPS) \
			$(BIN)/pytest tests/test_tiering_random.py -x -q -o timeout=3600 $(PYTEST_ARGS) \
			|| { echo "soak: failed with PACS_EDGE_RANDOM_SEED=$$seed"; exit 1; }; \
		echo "soak: fuzz seed $$seed, $(FUZZ_STEPS) steps"; \
		PACS_EDGE_FUZZ_SEED=$$seed PACS_EDGE_FUZZ_STEPS=$(FUZZ_STEPS) \
			$(BIN)/pytest $(FUZZ_MODULES) -n 0 -x -q -o timeout=3600 $(PYTEST_ARGS) \
			|| { echo "soak: failed with PACS_EDGE_FUZZ_SEED=$$seed"; exit 1; }; \
		echo "soak: power seed $$seed, $(POWER_CUTS) cuts"; \
		PACS_EDGE_POWER_SEED=$$seed PACS_EDGE_POWER_CUTS=$(POWER_CUTS) \
			$(BIN)/pytest tests/test_power_loss.py -n 0 -x -q -o timeout=3600 $(PYTEST_ARGS) \
			|| { echo "soak: failed with PACS_EDGE_POWER_SEED=$$seed"; exit 1; }; \
	done
	@echo "soak: one instance of $(LARGE_INSTANCE_MIB) MiB end to end"
	PACS_EDGE_LARGE_INSTANCE_MIB=$(LARGE_INSTANCE_MIB) $(BIN)/pytest tests/test_large_instance.py \
		-n 0 -x -q -o timeout=3600 $(PYTEST_ARGS)

bench: test-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash bench/run.sh

clean:
	rm -rf .pytest_cache .ruff_cache bench/out
