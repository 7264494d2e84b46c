# runbook.sqlite_app: the two commands in README.md, and their parts.
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help demo test venv lint sanity units integration reliability ecosystem molecule compat lab bench build clean

help:
	@echo "make demo   - run the collection's playbooks on a sample app in ./demo (localhost, no root)"
	@echo "make test   - lint, sanity, units, integration, reliability, ecosystem, compat, molecule: everything CI runs"
	@echo "make bench  - benchmarks; writes docs/BENCHMARKS.md"
	@echo "make compat - all units and the version-sensitive sanity tests on ansible-core 2.17 and 2.18 (make test runs the engines' units there)"
	@echo "make build  - ansible-galaxy collection build"

demo:
	@bash tools/demo.sh

test:
	@bash tools/test.sh

venv:
	@bash tools/venv.sh

lint sanity units integration reliability ecosystem molecule:
	@bash tools/test.sh $@

compat: venv
	@bash tests/ecosystem/compat.sh

lab:
	@bash tools/dockerd.sh && bash tools/lab-image.sh

bench:
	@bash bench/run.sh

build: venv
	@.venv/bin/ansible-galaxy collection build --force --output-path build .

clean:
	rm -rf build build-* demo tests/output
