"""Training: set-up, DeepSpeed engine, loop, evaluation, checkpoints (see docs/training.md)."""
