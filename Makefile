# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS := ptqcli/assets

.PHONY: demo test test-fast test-sanitize install bench clean

NATIVE_SOURCES := setup.py native/CMakeLists.txt native/ort_headers.py $(wildcard native/src/*) \
	$(wildcard native/third_party/onnxruntime/include/*)

$(STAMP): pyproject.toml $(NATIVE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(BIN)/pip install --quiet -e '.[test]'
	@# whether the native operators built, and why not (tests/unit/test_native_build.py fails then)
	-$(BIN)/ptq doctor
	touch $(STAMP)

install: $(STAMP)

# Quantize the embedded Fashion-MNIST CNN to W8A8 and measure it on its labelled test slice.
demo: $(STAMP)
	$(BIN)/ptq inspect $(ASSETS)/fashion_cnn.onnx
	$(BIN)/ptq calibrate $(ASSETS)/fashion_cnn.onnx --data $(ASSETS)/fashion_calib.npz -o demo-run
	$(BIN)/ptq export demo-run -o demo-run/fashion_cnn.w8a8.onnx --eval-data $(ASSETS)/fashion_test.npz --eval-samples 2000
	$(BIN)/ptq gate demo-run/fashion_cnn.w8a8.card.json --max-drop 0.5 --min-compression 3.5

# The whole suite, then the native operator tests again against a sanitizer build.
test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) test-sanitize

# The quick tier: the whole suite but the tests marked slow (whole-model runs); the CLI runs in-process.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Benchmarks need torch and the evaluation models (see bench/README.md).
bench: $(STAMP)
	$(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/pip install --quiet --no-deps foolbox==3.3.4
	$(BIN)/python bench/models.py
	$(BIN)/python bench/calibration.py

clean:
	rm -rf $(VENV) demo-run .pytest_cache

# The native operator tests again against an AddressSanitizer + UndefinedBehaviorSanitizer build.
test-sanitize: $(STAMP)
	$(BIN)/pip install --quiet cmake ninja
	$(BIN)/python setup.py native-sanitize
	PTQ_NATIVE_LIB=build/native/cmake-sanitize/libptqcli_ops.so \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_native_kernels.py
