# Loopline: the two commands a new user needs are `make demo` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test fuzz bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/loopline demo

test: setup  # two processes: the integration tests wait on brokers and workers as much as they compute
	$(PY) -m pytest -q -n 2 --dist loadfile

fuzz: setup  # the property-based suite with many more examples than CI's default profile
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m fuzz

bench: setup
	$(VENV)/bin/loopline bench ingest --repeats 3 --profile --out bench-ingest.json

clean:
	rm -rf $(VENV) .loopline-data .pytest_cache
