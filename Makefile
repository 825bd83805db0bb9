# picchat: `make run` starts the server from the checkout (standard library
# only, nothing to install); `make test` builds .venv and runs every check.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test unit integration lint format bench clean install uninstall system deploy e2e

run:
	$(PYTHON) -m picchat $(ARGS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/ruff check picchat tests bench
	$(VENV)/bin/ruff format --check picchat tests bench
	$(VPY) -m pytest $(PYTEST_ARGS)

unit: $(VENV)/.installed
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

integration: $(VENV)/.installed
	$(VPY) -m pytest tests/integration $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check picchat tests bench

format: $(VENV)/.installed
	$(VENV)/bin/ruff format picchat tests bench
	$(VENV)/bin/ruff check --fix picchat tests bench

# Benchmarks (not part of `make test`): what durability costs, per sync policy; then
# picchat against ncat, miniircd and mosquitto (installs them; rewrites docs/benchmarks.md);
# then idle connections, an idle server and start-up (bench/idle.py); then 5,000 idle members
# (bench/scale.py, quoted in docs/robustness.md).
bench:
	$(PYTHON) bench/durability.py
	$(PYTHON) bench/run.py --runs 5 --scenarios latency --json /var/tmp/picchat-bench-lat.json
	$(PYTHON) bench/run.py --runs 3 --scenarios fanout,fanout-wide,talkers,stall \
		--json /var/tmp/picchat-bench.json
	$(PYTHON) bench/run.py --runs 1 --scenarios stall-long --json /var/tmp/picchat-bench-long.json
	$(PYTHON) bench/run.py --write docs/benchmarks.md --from-json \
		/var/tmp/picchat-bench-lat.json,/var/tmp/picchat-bench.json,/var/tmp/picchat-bench-long.json
	$(PYTHON) bench/idle.py --runs 3 | tee /var/tmp/picchat-bench-idle.md
	$(PYTHON) bench/scale.py | tee /var/tmp/picchat-bench-scale.json
	$(PYTHON) bench/journald.py --runs 5 | tee /var/tmp/picchat-bench-journald.md
	$(PYTHON) bench/journald.py --runs 5 --one-cpu | tee -a /var/tmp/picchat-bench-journald.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# On the Pi itself, from a checkout (see docs/operations.md).
install:
	sudo sh deploy/install.sh

uninstall:
	sudo sh deploy/install.sh --uninstall

# Tests on a booted systemd (Debian in systemd-nspawn; root, debootstrap,
# systemd-container): install.sh, the units, journald.
system: $(VENV)/.installed
	PICCHAT_SYSTEM_TESTS=1 $(VPY) -m pytest tests/system $(PYTEST_ARGS)

# From a laptop: put picchat on a Pi over ssh and start it (HOST=pi@raspberrypi.local).
deploy:
	sh deploy/deploy.sh $(DEPLOY_ARGS) $(HOST)

# The end-to-end tests (the same as `make system`).
e2e: system
