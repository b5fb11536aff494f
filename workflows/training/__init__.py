"""Training on Ray Train: the driver's trainer set-up, the per-worker loop, the shared steps."""
