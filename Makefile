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

EX := examples/fashion

# The main job on the bundled example (a Fashion-MNIST MobileNetV2-style CNN): import it, see
# its memory on a board, quantise and evaluate it, then search a mixed-precision patch-based
# plan under a tight SRAM budget and evaluate the plan bit-exactly.
demo: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/mpq boards
	$(BIN)/mpq import $(EX)/fashion_cnn.onnx -o $(OUT)/fashion_cnn.mpq.onnx
	$(BIN)/mpq inspect $(OUT)/fashion_cnn.mpq.onnx --board nano33ble
	$(BIN)/mpq calibrate $(OUT)/fashion_cnn.mpq.onnx --data $(EX)/calib.npz -o $(OUT)/stats.npz
	$(BIN)/mpq eval $(OUT)/fashion_cnn.mpq.onnx --data $(EX)/test.npz --stats $(OUT)/stats.npz \
		--act-bits 8,4 --method entropy
	$(BIN)/mpq search $(OUT)/fashion_cnn.mpq.onnx --board nano33ble --sram 14000 \
		--data $(EX)/calib.npz -o $(OUT)/fashion.plan.json
	$(BIN)/mpq eval $(OUT)/fashion.plan.json --data $(EX)/test.npz
	$(BIN)/mpq export $(OUT)/fashion.plan.json -o $(OUT)/firmware
	$(BIN)/mpq verify $(OUT)/fashion.plan.json --data $(EX)/test.npz --target host

test: $(STAMP)
	$(BIN)/ruff check mpq tests benchmarks tools
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(OUT) build dist .pytest_cache .ruff_cache
