# The two commands of the README: `make demo` (whole pipeline on the synthetic demo cohort,
# offline, CPU) and `make test` (the test suite). Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench mutate clean-demo

# requirements-ask.txt (the OpenAI client of ask_models.py) too, so the runner's tests run here.
$(VENV)/.installed: requirements.txt requirements-ask.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-ask.txt
	touch $@

demo: $(VENV)/.installed
	bash demo/run_demo.sh $(PY)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The fast part (no training runs, torchrun, subprocess kills or benchmarks): for the edit-test loop.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run --quick

# Mutation testing (not in CI; tens of minutes on 2 cores): plant one small bug at a time in
# metrics.py and the training core, run the selection of setup.cfg [mutmut], list the survivors.
MUTANTS ?= orbital_clip.metrics.* orbital_clip.train.schedule.x_lr_at_step* orbital_clip.train.sampling.x_class_balanced_weights* \
	orbital_clip.train.sampling.x*DistributedBalancedSampler* orbital_clip.train.sampling.x_train_sampler* \
	orbital_clip.train.state.x_resume_from* orbital_clip.train.losses.x*LabelAwareClipLoss* orbital_clip.train.losses.x*MaskedContrastiveLoss*
mutate: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

clean-demo:
	rm -rf demo_run
