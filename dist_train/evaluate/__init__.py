"""Evaluation of exported models beyond the training loop: standard benchmarks (lm-evaluation-harness)."""
