"""Model URIs as a user writes them, and the registry commands' speed (no torch)."""

from __future__ import annotations

import pytest

from workflows.registry import ModelURI


@pytest.mark.parametrize("uri,fields", [
    ("models:/maskrcnn@champion", {"kind": "registry", "name": "maskrcnn", "alias": "champion"}),
    ("models:/maskrcnn/3", {"kind": "registry", "name": "maskrcnn", "version": "3"}),
    ("runs:/abc123/model", {"kind": "run", "run_id": "abc123", "path": "model"}),
    ("runs:/abc123", {"kind": "run", "run_id": "abc123", "path": "model"}),
    ("out/r/checkpoint_1/checkpoint.pt", {"kind": "file", "path": "out/r/checkpoint_1/checkpoint.pt"}),
    ("s3://b/r/checkpoint_1/checkpoint.pt", {"kind": "file", "path": "s3://b/r/checkpoint_1/checkpoint.pt"}),
])
def test_model_uris_parse(uri, fields):
    ref = ModelURI.parse(uri)
    for key, value in fields.items():
        assert getattr(ref, key) == value
    if ref.kind == "registry":
        assert ref.pinned("7") == "models:/maskrcnn/7"


@pytest.mark.parametrize("uri", ["models:/maskrcnn", "models:/maskrcnn/latest", "models:/@x", "runs:/",
                                 "models:maskrcnn", "http://host/model"])
def test_bad_model_uris_say_what_is_expected(uri):
    with pytest.raises(ValueError, match="expected"):
        ModelURI.parse(uri)


def test_registry_commands_import_neither_torch_nor_the_model(tmp_path):
    """`mrcnn-models list` and `alias` only talk to MLflow: the process never imports torch (most
    of what such a command would otherwise take)."""
    import subprocess
    import sys

    script = ("import sys\nfrom workflows.cli import models\n"
              "try:\n    models(['--tracking-uri', sys.argv[1], 'list', 'nothing-here'])\n"
              "except SystemExit as e:\n    print(e)\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    done = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=120)
    assert "no registered model 'nothing-here'" in done.stdout, done.stdout + done.stderr
    assert done.stdout.strip().endswith("no torch"), done.stdout
