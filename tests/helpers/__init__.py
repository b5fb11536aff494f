"""Test helpers: real servers, stores, job configs, the torchvision oracle, the browser."""
