"""Jobs around the model: Ray Data ingestion, Ray Train, evaluation, MLflow, Hydra CLIs."""
