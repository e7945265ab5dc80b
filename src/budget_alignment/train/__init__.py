"""Training: model materialization, SFT, GRPO and their rewards."""
