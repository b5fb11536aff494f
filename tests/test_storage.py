"""Local paths and s3:// URIs: joining, whole-file writes (more in test_object_storage.py)."""

from __future__ import annotations

from workflows.storage import join


def test_storage_join_keeps_uris_and_absolute_paths(tmp_path):
    assert join("s3://bucket/coco", "annotations/x.json") == "s3://bucket/coco/annotations/x.json"
    assert join("s3://bucket/coco", "") == "s3://bucket/coco"
    assert join("s3://bucket/coco", "s3://other/y.json") == "s3://other/y.json"
    assert join(str(tmp_path), "/abs/file.json") == "/abs/file.json"
    assert join(str(tmp_path), "rel/../a.json") == str(tmp_path / "a.json")
    assert join("relative/root", "a.json").startswith("/")
