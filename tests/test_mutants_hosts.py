"""Tests that kill mutants `make mutate` found surviving (docs/mutants.md)."""
