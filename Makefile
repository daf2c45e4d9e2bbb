# Ays: developer entry points. `make` builds every env's tarball (build/bin/<env>_ays.tar.gz)
# with make.sh, which also runs on its own (plain host, or a stock python:3.11 image).
#
#   make                 every env in envs/
#   make ENV=uat         one env
#   make check-repro     two full builds, tarballs compared member by member
#   make clean           build outputs, ./run and caches (distclean: the build venv too)
.PHONY: all tarballs check-repro help test dev lint clean distclean

ENV ?=
BUILD_ARGS = $(if $(ENV),--env $(ENV))

all: tarballs

tarballs:
	./make.sh $(BUILD_ARGS)

check-repro:
	./make.sh --check-repro $(BUILD_ARGS)

help:
	@echo "make              build every env's tarball into build/bin (make.sh)"
	@echo "make ENV=uat      build one env's tarball"
	@echo "make check-repro  build twice from scratch and compare the tarballs"
	@echo "make test         run the whole test suite (scripts/test)"
	@echo "make dev          run a manager and a node on the embedded default (scripts/dev)"
	@echo "make lint         ruff check and format check"
	@echo "make clean        remove build outputs (build/bin, build/work), ./run and caches"
	@echo "make distclean    clean, and remove make.sh's build venv (build/venv)"

test:
	scripts/test

dev:
	scripts/dev

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check ays_runtime ays_installer build tests/test_tarball.py bench/frozen_startup.py

clean:
	rm -rf run .pytest_cache .ruff_cache build/bin build/work

distclean: clean
	rm -rf build/venv
