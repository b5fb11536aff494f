"""The jobs, one module per command: train (mrcnn-train), tune, evaluate, infer, models."""
