"""Training: state, the pure train step, sharding, checkpoints and the loop."""
