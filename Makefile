# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    := out

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The main job on the bundled example (a Fashion-MNIST MobileNetV2-style CNN).
demo: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/mpq boards
	$(BIN)/mpq import examples/fashion/fashion_cnn.onnx -o $(OUT)/fashion_cnn.mpq.onnx
	$(BIN)/mpq inspect $(OUT)/fashion_cnn.mpq.onnx --board nano33ble

test: $(STAMP)
	$(BIN)/ruff check mpq tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(OUT) build dist .pytest_cache .ruff_cache
