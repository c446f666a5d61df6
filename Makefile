# Two commands on a fresh machine:  `make app`  and  `make test`.
# TORCH pins the CPU build that pip finds locally here; elsewhere any torch>=2.5 works
# (make TORCH='torch>=2.5').
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup app demo test check-wheel clean

$(BIN)/lora-diffusion: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[prepare,notebooks,test,deepspeed]"
	touch $@

setup: $(BIN)/lora-diffusion

# The main job: the workbench (Gradio) on the shipped base, offline, at http://127.0.0.1:7860
app: setup
	$(BIN)/lora-diffusion app

# The same from the command line: fine-tune the shipped base on the built-in sentiment
# suite and print held-out metrics.
demo: setup
	$(BIN)/lora-diffusion train --task suite_sentiment --method full --steps 150 --batch-size 16 \
	    --out runs/demo --sampler-steps 16

test: setup
	$(BIN)/python -m pytest -q --durations=25

# The installed package as a user gets it: wheel -> fresh venv outside the checkout -> sample,
# train and the app on the shipped base (.ci/run runs it before the tests).
check-wheel:
	bash .ci/check_wheel.sh $(PYTHON) "$(TORCH)"

clean:
	rm -rf $(VENV) runs
