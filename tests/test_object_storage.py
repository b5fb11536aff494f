"""A job's persistent state in object storage (`output_dir=s3://...`) on a local S3 server, with
nothing but the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mrcnn import ModelConfig, build_model
from mrcnn.checkpoint import save_checkpoint
from tests.helpers.jobs import compose_job
from tests.helpers.s3server import CREDENTIALS, create_bucket, s3_server
from workflows.ingest import ensure_shapes, load_split
from workflows.jobs.frame import Job
from workflows.logged_model import load_model
from workflows.storage import exists, filesystem, list_files, read_bytes, whole_file, write_bytes
from workflows.training.trainer import newest_complete_checkpoint


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        create_bucket(url, "runs")
        yield url


@pytest.fixture
def aws_env(endpoint, monkeypatch):
    """The AWS environment a user exports: no `data.s3` key is set in these tests."""
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    return endpoint


def test_a_job_writes_its_log_to_the_bucket_and_nothing_locally(aws_env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = compose_job(["output_dir=s3://runs/job", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with Job(cfg, "evaluate") as job:
        run_id = job.open_run("evaluate", {"split": "val"})
    logs = list_files("s3://runs/job/logs")
    assert len(logs) == 1 and logs[0] == job.log_uri and logs[0].startswith("s3://runs/job/logs/evaluate-")
    assert MlflowClient(job.tracking_uri).get_run(run_id).data.tags["log_file"] == job.log_uri
    assert f"log: {job.log_uri}" in capsys.readouterr().out
    assert not job.log_file.exists()  # the local copy is removed once uploaded
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("s3")]  # no local `s3:` folder


def test_object_storage_without_a_tracking_server_or_bucket_is_refused_before_work(aws_env, tmp_path):
    with pytest.raises(ValueError, match=r"output_dir=s3://runs/x is in object storage.*tracking.tracking_uri"):
        Job(compose_job(["output_dir=s3://runs/x"]), "train").__enter__()
    cfg = compose_job(["output_dir=s3://no-such-bucket/x", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    with pytest.raises(OSError, match=r"output_dir=s3://no-such-bucket/x is not writable"):
        Job(cfg, "train").__enter__()
    with pytest.raises(ValueError, match="output_dir=gs://b/x: give a local folder or an s3:// URI"):
        Job(compose_job(["output_dir=gs://b/x", "tracking.tracking_uri=http://x:5000"]), "train").__enter__()


def test_resume_finds_the_newest_complete_checkpoint_in_the_bucket(aws_env, tmp_path):
    """A run folder in the bucket with an older complete checkpoint and a newer one cut short (a
    copy stopped half-way): resume takes the complete one, and it loads from its URI."""
    cfg = ModelConfig(num_classes=3)
    cfg.backbone.name = "resnet18"
    cfg.backbone.fpn_channels = cfg.roi_heads.representation_size = 32  # a small file to upload
    cfg.roi_heads.mask_layers = [32]
    save_checkpoint(tmp_path / "c.pt", build_model(cfg), step=12, epoch=2,
                    label_map={"category_ids": [1, 2], "names": ["a", "b"]})
    data = (tmp_path / "c.pt").read_bytes()
    run = "s3://runs/out/ray_results/r1"
    write_bytes(f"{run}/checkpoint_2026-01-01_00-00-01.000000/checkpoint.pt", data)
    write_bytes(f"{run}/checkpoint_2026-01-01_00-00-02.000000/checkpoint.pt", data[: len(data) // 3])
    write_bytes("s3://runs/out/ray_results/r10/checkpoint_2026-01-01_00-00-03.000000/checkpoint.pt", data)
    found, step = newest_complete_checkpoint(run)
    assert (found, step) == (f"{run}/checkpoint_2026-01-01_00-00-01.000000/checkpoint.pt", 12)
    assert newest_complete_checkpoint("s3://runs/out/ray_results/none") is None
    loaded = load_model(found)  # mrcnn-infer / mrcnn-evaluate take a checkpoint URI
    assert loaded.labels.category_ids == [1, 2]
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(loaded.model.state_dict()[key], torch.load(tmp_path / "c.pt", weights_only=True)["model"][key])


def test_the_embedded_dataset_is_generated_into_the_bucket(aws_env):
    """`data.root` follows `output_dir` into the bucket: generated once (marked complete last),
    then read from there like any dataset in object storage."""
    cfg = compose_job(["output_dir=s3://runs/demo", "data.generate.train=4", "data.generate.val=2",
                       "data.generate.size=64"])
    data = cfg.data
    assert data.root == "s3://runs/demo/data/shapes"
    ensure_shapes(data, data.root)
    assert exists("s3://runs/demo/data/shapes/.complete") == "file"
    split = load_split(data, data.root, "val")
    assert len(split.records) == 2 and split.records[0]["path"].startswith("s3://runs/demo/data/shapes/val/")
    assert read_bytes(split.records[0]["path"])[:2] == b"\xff\xd8"  # a JPEG
    stamp = read_bytes("s3://runs/demo/data/shapes/.complete")
    ensure_shapes(data, data.root)  # complete: not written again
    assert read_bytes("s3://runs/demo/data/shapes/.complete") == stamp
    assert os.environ["AWS_ENDPOINT_URL"] == aws_env


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_a_checkpoint_is_written_whole_or_not_at_all(aws_env, tmp_path, where):
    """How a worker writes its checkpoint straight into the run's storage: a write that fails
    part-way, or a writer killed part-way, leaves no file at the checkpoint's path."""
    uri = str(tmp_path / "run") if where == "folder" else f"s3://runs/whole-{os.getpid()}"
    fs, root = filesystem(uri)
    with whole_file(fs, f"{root}/checkpoint_1/checkpoint.pt") as f:
        torch.save({"model": {}, "step": 3}, f)
    with pytest.raises(RuntimeError, match="half-way"), whole_file(fs, f"{root}/checkpoint_2/checkpoint.pt") as f:
        f.write(b"\0" * (8 << 20))
        raise RuntimeError("half-way")
    # Killed after 12 MiB were handed over (the bucket has had parts of them), before the end.
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from workflows.storage import filesystem, whole_file\n"
         f"fs, root = filesystem({uri!r})\n"
         "with whole_file(fs, root + '/checkpoint_3/checkpoint.pt') as f:\n"
         "    f.write(b'\\0' * (12 << 20)); f.flush(); print('written', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert writer.stdout.readline() == "written\n"
    finally:
        writer.kill()
        writer.wait()
    assert [f.rsplit("/", 2)[-2:] for f in list_files(uri, suffixes=(".pt",))] == [["checkpoint_1", "checkpoint.pt"]]
    assert newest_complete_checkpoint(uri) == (f"{uri}/checkpoint_1/checkpoint.pt", 3)
