"""Side-by-side benchmarks. `python -m bench <name> [--json OUT]`; results go to docs/benchmarks.md."""
