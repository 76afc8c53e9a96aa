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

run: $(VENV)/.installed
	$(VENV)/bin/snakemake --cores $(CORES)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ncpipe tests benchmarks
	$(VENV)/bin/snakemake --lint

report: $(VENV)/.installed
	$(VENV)/bin/snakemake --report report.html

clean:
	rm -rf results logs .snakemake report.html
