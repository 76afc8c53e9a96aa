# The README's two commands.  Both create the pinned virtual environment in .venv on first use.
#   make run    install, then run the default (embedded-data, CPU) pipeline: results/, logs/
#   make test   install with the test extra, then run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
CORES  ?= 2

.PHONY: run test lint report clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "pip==26.3"
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# An editable install leaves ncpipe uncompiled, and where PYTHONDONTWRITEBYTECODE is set (many CI and cluster
# images) each of a run's ~60 jobs, and of the tests' pipeline runs, would compile the modules it imports again
# (~50 ms a job); compiling once is what a wheel install does.  Up-to-date files are skipped.
run: $(VENV)/.installed
	$(VENV)/bin/python -m compileall -q ncpipe
	$(VENV)/bin/snakemake --cores $(CORES)

test: $(VENV)/.installed
	$(VENV)/bin/python -m compileall -q ncpipe
	$(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ncpipe tests benchmarks
	$(VENV)/bin/snakemake --lint

report: $(VENV)/.installed
	$(VENV)/bin/snakemake --report report.html

clean:
	rm -rf results logs .snakemake report.html
