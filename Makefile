# make demo: create .venv, install, fold the bundled example model on the digits test split.
# make test: create .venv if needed, run the tests.
# make docs: regenerate docs/ZOO.md, CALIBRATION.md, SERVING.md, BENCHMARKS.md (minutes).
# make zoo: create .venv-zoo (torch CUDA build, torchvision, timm, ultralytics, lightning, smp; ~6 GB, not part
#           of make test) and write docs/REAL_ZOO.md (bnrt on 48 torchvision and timm architectures, and
#           on the files users ship: Ultralytics best.pt, TorchScript, .pt2, Lightning, safetensors).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ZOO_VENV ?= .venv-zoo
ZOO_STAMP := $(ZOO_VENV)/.installed-stamp

.PHONY: demo test venv clean train zoo docs

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.digits_data -o build/digits_test.npz
	$(VENV)/bin/bnrt fold models/digits_cnn.pt --arch models.digits:DigitsNet -o build/demo --data build/digits_test.npz

test: $(STAMP)
	$(PY) -m pytest -n 2 -q --hypothesis-profile=thorough

$(ZOO_STAMP): pyproject.toml constraints-zoo.txt
	test -x $(ZOO_VENV)/bin/python || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-zoo.txt -e . torchvision timm \
		ultralytics lightning safetensors segmentation-models-pytorch
	touch $(ZOO_STAMP)

zoo: $(ZOO_STAMP)
	$(ZOO_VENV)/bin/python -m tools.real_zoo -o docs/REAL_ZOO.md
	$(ZOO_VENV)/bin/python -m tools.shipped_zoo -o docs/REAL_ZOO.md
	$(ZOO_VENV)/bin/python -m tools.dense_zoo -o docs/REAL_ZOO.md
	$(ZOO_VENV)/bin/python -m tools.foreign_zoo -o docs/REAL_ZOO.md

# every generated doc but REAL_ZOO.md (make zoo); each records commit, date, machine, versions
docs: $(STAMP)
	$(PY) -m tools.zoo_report -o docs/ZOO.md
	$(PY) -m tools.calibration_report
	$(PY) -m tools.bench_serve
	$(PY) -m tools.bench

train: $(STAMP)
	$(PY) -m tools.train_digits -o models/digits_cnn.pt

clean:
	rm -rf build .pytest_cache .hypothesis
