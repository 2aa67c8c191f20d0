# eventray: `make demo` runs the main job on an embedded local Ray, `make test` runs the suite.
# Both create .venv and install the pinned dependencies when needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The demo: stream the simulator's transactions (features and label events, no model yet),
# train a fraud model on a week of the stored features, then stream again, now scored.
demo: $(STAMP)
	$(BIN)/eventray run configs/fraud.yaml --store demo-store
	$(BIN)/eventray train --store demo-store --model hist_gradient_boosting \
	    --start 2018-05-01 --end 2018-05-08 --registry data/registry --name fraud
	$(BIN)/eventray run configs/fraud.yaml --store demo-store

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check cluster pipelines models tests

clean:
	rm -rf $(VENV) demo-store data/simulated data/registry .pytest_cache
