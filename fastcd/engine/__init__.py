"""The training engine: checkpoints, the distillation step, the epoch loop, evaluation."""
