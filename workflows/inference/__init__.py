"""Batch inference: inputs (listing, what is already done), the Ray Data pipeline, outputs."""
