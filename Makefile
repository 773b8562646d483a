# make demo: create .venv, install, fold the bundled example model on the digits test split.
# make test: create .venv if needed, run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv clean train

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.digits_data -o build/digits_test.npz
	$(VENV)/bin/bnrt fold models/digits_cnn.pt -o build/demo --data build/digits_test.npz

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

train: $(STAMP)
	$(PY) -m tools.train_digits -o models/digits_cnn.pt

clean:
	rm -rf build .pytest_cache .hypothesis
