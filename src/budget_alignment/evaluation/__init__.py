"""Evaluation: generating completions and scoring them."""
