# Shortcuts; each target runs the same command the README documents.
.PHONY: run test chaos bench mutate

run:
	./scripts/run

test:
	./scripts/test

chaos:
	./.venv/bin/videorelay chaos

bench:
	./.venv/bin/videorelay bench

# Mutation testing (slow, not in CI): scores per module in artifacts/mutation-report.md.
mutate:
	./scripts/mutate
