# Shortcuts; each target runs the same command the README documents.
.PHONY: run test chaos bench

run:
	./scripts/run

test:
	./scripts/test

chaos:
	./.venv/bin/videorelay chaos

bench:
	./.venv/bin/videorelay bench
