"""`mrcnn-infer`: segment an image store with a registered or checkpointed model, one Parquet row
per image.

    list the store -> drop inputs already in the output -> the pipeline (workflows.inference) ->
    summary, COCO results and overlays -> an MLflow run

A rerun writes only what is missing (`inference.inputs.prepare_output`); a bad file becomes an
error row, never a failed job.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

import pyarrow.compute as pc

from workflows.config import JobConfig, as_dict
from workflows.inference.inputs import input_kind, list_inputs, output_files, prepare_output
from workflows.inference.outputs import Summary, summarize, write_coco_results, write_overlays
from workflows.inference.pipeline import path_blocks, write_rows
from workflows.jobs.frame import Job
from workflows.registry import resolve_model
from workflows.storage import filesystem, is_s3
from workflows.tracking import log_metrics


def run(cfg: JobConfig) -> dict[str, Any]:
    with Job(cfg, "infer") as job:
        infer, s3 = cfg.infer, cfg.data.s3
        source, output = job.paths.infer_input, job.paths.infer_output
        model = resolve_model(infer.model, job.tracking_uri, "infer.model")
        input_kind(source, s3)
        job.start_ray()
        run_id = job.open_run("infer", {"infer": as_dict(infer)},
                              tags={"output": output, **({"model_version": model.version} if model.version else {})},
                              derived={"infer.model": model.uri})
        done = prepare_output(output, s3, infer.retry_errors)
        before = set(output_files(output, s3))  # after the clean-up: what this run did not write
        t0 = time.time()
        paths = list_inputs(source, infer.extensions, s3)
        todo = paths.filter(pc.invert(pc.is_in(paths, value_set=done))) if len(done) else paths
        print(f"{len(paths)} inputs, {len(paths) - len(todo)} already in {output}, {len(todo)} to segment")
        fs, out_path = filesystem(output, s3)
        if len(todo):
            write_rows(path_blocks(todo, infer.rows_per_file), infer, model, job.tracking_uri, s3, fs, out_path)
        seconds = time.time() - t0
        files = output_files(output, s3)
        summary = summarize([f for f in files if f not in before], fs, seconds)
        outputs: dict[str, Any] = {"output": output, "files": files}
        if infer.coco_annotations:
            # Side outputs start with "_": readers of the folder as a Parquet dataset (pandas,
            # pyarrow, Spark) skip them.
            target = posixpath.join(output, "_coco_results.json")
            outputs["coco_results"] = target
            outputs["coco_detections"] = write_coco_results(infer.coco_annotations, source, files, fs, s3, target)
        if infer.overlays:
            outputs["overlays"] = write_overlays(infer.overlays, source, files, fs, s3,
                                                 posixpath.join(output, "_overlays"))
        client = job.client
        log_metrics(client, run_id, {"infer/images": summary.images, "infer/detections": summary.detections,
                                     "infer/errors": summary.errors, "system/images_per_s": summary.images_per_s}, 0)
        for png in outputs.get("overlays", []):
            if not is_s3(png):
                client.log_artifact(run_id, png, "overlays")
        print_summary(summary, outputs)
        return {"summary": summary, "run_id": run_id, "tracking_uri": job.tracking_uri, "model_uri": model.uri,
                **outputs}


def print_summary(s: Summary, outputs: dict[str, Any]) -> None:
    print(f"\nsegmented {s.images} images in {s.seconds:.1f} s ({s.images_per_s:.2f} images/s): "
          f"{s.detections} detections, {s.errors} errors")
    for example in s.error_examples or []:
        print(f"  error: {example}")
    print(f"rows: {outputs['output']} ({len(outputs['files'])} Parquet files)")
    if "coco_results" in outputs:
        print(f"COCO results: {outputs['coco_results']} ({outputs['coco_detections']} detections)")
    if outputs.get("overlays"):
        print(f"overlays: {posixpath.dirname(outputs['overlays'][0])}")
