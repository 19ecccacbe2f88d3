# Private speech recognition: Whisper/GLM-ASR on Triton behind a gRPC gateway.
# Every target installs what it needs and is idempotent (a second run takes seconds).

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(abspath $(VENV))/bin/python
BUILD      ?= build
MODEL      ?= whisper-base
PRECISION  ?= fp32
EXECUTION_PROVIDER ?= CPUExecutionProvider
MODEL_DIR  := $(BUILD)/models/$(MODEL)
REPOSITORY := $(BUILD)/model_repository
TRITON_DIR := $(BUILD)/triton
PYTEST_ARGS ?=
CHECKPOINT ?=
CALIBRATION ?=
GLM_TEST_DIR := $(BUILD)/models/glm-asr-tiny

export PYTHONPATH := $(CURDIR)

.PHONY: system setup venv triton vad proto export repository serve demo test bench trt clean help

help:
	@echo "make setup | export [MODEL=whisper-base|glm-asr-tiny|glm-asr-nano CHECKPOINT=DIR PRECISION=fp32|fp16|int8] | serve | demo | test | bench | trt | clean"

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

triton: venv
	$(PY) tools/setup_triton.py --dest $(TRITON_DIR)

proto: venv
	$(PY) -m gateway.protocol

system:
	bash tools/setup_system.sh

vad: venv
	$(PY) tools/setup_vad.py --dest $(BUILD)/vad

setup: system venv triton vad proto

export: setup
	$(PY) -m export --model $(MODEL) --out $(MODEL_DIR) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
	$(PY) -m model_repository.render --model-dir $(MODEL_DIR) --precision $(PRECISION) \
		--execution-provider $(EXECUTION_PROVIDER) --out $(REPOSITORY)

repository: export

serve: export
	$(PY) -m gateway.launch.local serve --model-dir $(MODEL_DIR) --repository $(REPOSITORY)

demo: export
	$(PY) -m gateway.launch.local demo --model-dir $(MODEL_DIR) --repository $(REPOSITORY)

test: export
	$(PY) -m export --model glm-asr-tiny --out $(GLM_TEST_DIR)
	ASR_MODEL_DIR=$(abspath $(MODEL_DIR)) ASR_GLM_MODEL_DIR=$(abspath $(GLM_TEST_DIR)) \
		$(PY) -m pytest tests $(PYTEST_ARGS)

# TensorRT engines from the ONNX files (stops with a clear message where TensorRT is absent).
trt: export
	$(PY) -m export.trt --model-dir $(MODEL_DIR) --precision $(if $(filter int8,$(PRECISION)),int8,fp16) \
		$(if $(CALIBRATION),--calibration $(CALIBRATION))

bench: export
	$(VENV)/bin/pip install --quiet -r bench/requirements.txt
	ASR_MODEL_DIR=$(abspath $(MODEL_DIR)) $(PY) -m bench.accuracy --model-dir $(MODEL_DIR)

clean:
	rm -rf $(BUILD) gateway/_generated out
