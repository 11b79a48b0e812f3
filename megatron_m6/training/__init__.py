"""Training: optimiser and LR schedule, checkpoints, and the loop."""
