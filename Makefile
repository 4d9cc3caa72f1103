# The README's commands. Everything runs from the repository's own virtual environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := libs/bitsmith/demo
PROTOS := $(wildcard proto/bitsmith/v1/*.proto)

.PHONY: setup demo test test-fast test-slow lint proto proto-check bench clean

# llama-cpp-python compiles llama.cpp on install: GGML_NATIVE=OFF keeps that build portable (AVX2, not
# -march=native), so a wheel pip cached on one machine runs on another.
$(BIN)/bitsmith: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/bitsmith  ## create .venv and install bitsmith with its pinned dependencies

demo: setup  ## quantize the shipped demo model end to end through the services (local Ray + gRPC)
	rm -rf out/demo-gptq
	$(BIN)/bitsmith quantize $(DEMO)/models/ref-llama-4m --method gptq --bits 4 --group-size 128 \
		--calib $(DEMO)/data/calib-prose.txt --calib $(DEMO)/data/calib-code.txt --samples 128 --seq-len 512 \
		--format gptq --out out/demo-gptq --eval $(DEMO)/data/eval-prose.txt --eval $(DEMO)/data/eval-code.txt

test: setup  ## the whole suite: fast tests, then the slow ones
	$(BIN)/python -m pytest -m "not slow" -q
	$(BIN)/python -m pytest -m slow -q

lint: setup  ## ruff and mypy (mypy sees services/ under its installed name through a link)
	$(BIN)/ruff check libs services tests bench
	mkdir -p .cache/mypy && ln -sfn ../../services .cache/mypy/bitsmith_services
	$(BIN)/mypy

proto: setup  ## regenerate the checked-in stubs in libs/bitsmith/v1 from proto/
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=libs --pyi_out=libs --grpc_python_out=libs $(PROTOS)

bench: setup
	$(BIN)/python bench/job_overhead.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
