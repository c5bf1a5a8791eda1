# The two commands of the README: `make demo` (whole pipeline on the synthetic demo cohort,
# offline, CPU) and `make test` (the test suite). Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench mutate clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	bash demo/run_demo.sh $(PY)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --quick

# Mutation testing (not in CI; tens of minutes on 2 cores): plant one small bug at a time in
# metrics.py and the training core, run the selection of setup.cfg [mutmut], list the survivors.
MUTANTS ?= metrics.* clip_train.x_lr_at_step* clip_train.x_class_balanced_weights* \
	clip_train.x_is_improvement* clip_train.x*DistributedBalancedSampler* clip_train.x_train_sampler* \
	clip_train.x_resume_from* clip_train.x*LabelAwareClipLoss* clip_train.x*MaskedContrastiveLoss*
mutate: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

clean-demo:
	rm -rf demo_run
