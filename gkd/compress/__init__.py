"""Distillation losses, objectives, stages and the training loop."""
