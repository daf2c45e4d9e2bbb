# Ays: developer entry points. The per-environment tarballs (PyInstaller) are built by
# build/ (see build/README.md once present).
.PHONY: help test dev lint clean

help:
	@echo "make test   run the whole test suite (scripts/test)"
	@echo "make dev    run a manager and a node on the embedded default (scripts/dev)"
	@echo "make lint   ruff check and format check"
	@echo "make clean  remove ./run and caches"

test:
	scripts/test

dev:
	scripts/dev

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check ays_runtime ays_installer

clean:
	rm -rf run .pytest_cache .ruff_cache
