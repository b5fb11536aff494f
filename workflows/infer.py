"""`mrcnn-infer`: segment an image store with a registered model, one Parquet row per image.

    mrcnn-infer infer.input=/data/photos infer.output=/data/photos-masks
    mrcnn-infer infer=gpu infer.input=s3://bucket/images infer.output=s3://bucket/masks \\
        infer.model=models:/maskrcnn@champion tracking=server

Ray Data, streaming: list -> drop inputs already in the output -> read + decode (CPU tasks) ->
predict + RLE-encode (an actor pool, model loaded once per actor) -> write_parquet. A file that
cannot be read or decoded becomes a row with `error` set; the job goes on. A rerun writes only
what is missing (see `prepare_output`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from omegaconf import DictConfig

from mrcnn.data.images import ImageDecodeError, decode_image
from mrcnn.masks import decode_rle_masks, encode_masks
from mrcnn.visualization import draw_predictions
from workflows.allocator import reuse_large_blocks
from workflows.config import CONF_DIR, register_configs, to_container
from workflows.data import read_uri
from workflows.engine import predict_images, set_detection_limits
from workflows.model_io import load_model, resolve_version
from workflows.storage import filesystem, is_s3, read_bytes
from workflows.tracking import (
    check_tracking_server,
    log_metrics,
    mlflow_client,
    resolve_tracking_uri,
    start_or_resume_run,
    ui_command,
)

log = logging.getLogger(__name__)
register_configs()

RLE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("width", pa.int32()),  # as displayed (after EXIF orientation)
    ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # x1, y1, x2, y2 pixels
    ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int64())),  # the dataset's category ids
    ("category_names", pa.list_(pa.string())),
    ("masks", pa.list_(RLE)),  # COCO compressed RLE
    ("model", pa.string()),  # the URI the job was given
    ("model_version", pa.string()),  # the registry version it resolved to (or the path)
    ("error", pa.string()),  # null when fine
])
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def _fs(uri: str, s3: dict[str, Any]) -> tuple[pafs.FileSystem, str]:
    return filesystem(uri, s3)


def _uri(fs_path: str, like: str) -> str:
    return f"s3://{fs_path}" if is_s3(like) else fs_path


def list_inputs(infer: dict[str, Any], s3: dict[str, Any]) -> pa.Array:
    """The input URIs as one Arrow string array (compact: no Python object per path). A folder
    or prefix is walked recursively and filtered by extension (case-insensitive); a manifest
    gives its `path` column."""
    src = infer["input"]
    fs, root = _fs(src, s3)
    if input_kind(src, s3) == "manifest":
        return read_manifest(src, s3)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in infer["extensions"])
    selector = pafs.FileSelector(root, recursive=True)
    paths = pa.array(sorted(_uri(i.path, src) for i in fs.get_file_info(selector)
                            if i.type == pafs.FileType.File and i.path.lower().endswith(exts)), pa.string())
    if len(paths) == 0:
        raise FileNotFoundError(f"infer.input: no files ending in {', '.join(exts)} under {src} "
                                "(set infer.extensions to the ones the store holds)")
    return paths


def input_kind(src: str, s3: dict[str, Any]) -> str:
    """"folder" or "manifest"; raises naming infer.input when it does not exist."""
    fs, root = _fs(src, s3)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"infer.input: {src} does not exist")
    return "manifest" if info.type == pafs.FileType.File else "folder"


def read_manifest(uri: str, s3: dict[str, Any]) -> pa.Array:
    """A .txt (one path a line), .csv or .parquet (a `path` column) manifest of local paths or
    s3:// URIs; relative local paths are relative to the manifest's folder."""
    if not uri.lower().endswith(MANIFEST_SUFFIXES):
        raise ValueError(f"infer.input: {uri} is a file but not a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    fs, path = _fs(uri, s3)
    kind = uri.lower().rsplit(".", 1)[1]
    if kind == "txt":
        with fs.open_input_stream(path) as f:
            column = pa.array(f.read().decode("utf-8").splitlines(), pa.string())
    else:
        with fs.open_input_file(path) as f:
            table = pacsv.read_csv(f) if kind == "csv" else pq.read_table(f)
        if "path" not in table.column_names:
            raise ValueError(f"infer.input: manifest {uri} has no `path` column (columns: {table.column_names})")
        column = table.column("path").combine_chunks().cast(pa.string())
    base = str(Path(uri).resolve().parent)
    out = []
    for p in column.to_pylist():
        p = (p or "").strip()
        if p and not is_s3(p):
            p = os.path.normpath(os.path.join(base, p))  # absolute paths stay as they are
        if p:
            out.append(p)
    return pa.array(out, pa.string())


def path_blocks(paths: pa.Array, infer: dict[str, Any]) -> ray.data.Dataset:
    """A dataset of `path` in blocks of `infer.rows_per_file`: work streams through the stages and
    reaches the disk as it goes (one block of the whole listing would be written at the end)."""
    n = infer["rows_per_file"]
    return ray.data.from_arrow([pa.table({"path": paths.slice(i, n)}) for i in range(0, len(paths), n)])


def output_files(output: str, s3: dict[str, Any]) -> list[str]:
    fs, root = _fs(output, s3)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def prepare_output(output: str, s3: dict[str, Any], retry_errors: bool) -> pa.Array:
    """Make the output folder consistent and return the paths already done.

    A file that cannot be read (a write cut short by a crash) is removed: its rows were never
    complete and are redone. With `retry_errors`, rows holding an error are removed from their
    files (each rewritten whole, then swapped in), so those inputs are tried again.
    """
    fs, root = _fs(output, s3)
    fs.create_dir(root, recursive=True)
    done = []
    for f in output_files(output, s3):
        try:
            table = pq.read_table(f, filesystem=fs, columns=["path", "error"])
        except (pa.ArrowInvalid, OSError) as e:
            log.warning("removing %s: unreadable (%s); its rows are redone", f, e)
            fs.delete_file(f)
            continue
        if retry_errors and table.column("error").null_count < len(table):
            full = pq.read_table(f, filesystem=fs, schema=SCHEMA)
            keep = full.filter(pc.is_null(full.column("error")))
            tmp = f + ".tmp"
            pq.write_table(keep, tmp, filesystem=fs)
            fs.move(tmp, f)
            table = keep.select(["path", "error"])
        done.append(table.column("path").combine_chunks())
    return pa.concat_arrays(done) if done else pa.array([], pa.string())


# ---------------------------------------------------------------------------------------------
# Decode (CPU tasks) and predict (actors)


def decode_batch(batch: pa.Table, s3: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Read and decode each image; a failure becomes an `error` message for that row only.
    The column holds "" when fine: a batch of only nulls would change its type downstream."""
    out: dict[str, list] = {"path": [], "image": [], "error": []}
    for path in batch.column("path").to_pylist():
        try:
            image, error = decode_image(read_uri(path, s3), path, max_pixels=max_pixels), ""
        except (ImageDecodeError, OSError, ValueError) as e:
            image, error = np.zeros((0, 0, 3), np.uint8), str(e) or type(e).__name__
        out["path"].append(path)
        out["image"].append(image)
        out["error"].append(error)
    return {"path": np.array(out["path"], dtype=object), "image": out["image"],
            "error": np.array(out["error"], dtype=object)}


class Predictor:
    """One per actor: the model is loaded once, then each batch is predicted in one call and its
    masks RLE-encoded here, so dense masks never leave the actor."""

    def __init__(self, model_uri: str, tracking_uri: str, version: str, infer: dict[str, Any]):
        if infer["torch_threads"]:
            torch.set_num_threads(infer["torch_threads"])
        reuse_large_blocks()
        loaded = load_model(model_uri, tracking_uri)
        self.device = torch.device("cuda" if infer["num_gpus"] > 0 and torch.cuda.is_available() else "cpu")
        self.model = set_detection_limits(loaded.model, infer["score_threshold"], infer["max_detections"])
        self.model.eval().to(self.device)
        self.labels = loaded.labels
        self.uri, self.version = model_uri, version

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        paths, errors = list(batch["path"]), [str(e) or None for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if e is None]
        images = [torch.from_numpy(np.ascontiguousarray(batch["image"][i])).permute(2, 0, 1) for i in good]
        preds = {}
        if images:
            preds = dict(zip(good, predict_images(self.model, [im.to(self.device).float() / 255 for im in images])))
        rows = {name: [] for name in SCHEMA.names}
        for i, path in enumerate(paths):
            p = preds.get(i)
            h, w = (batch["image"][i].shape[:2]) if p is not None else (None, None)
            labels = [self.labels.category_id(int(k)) for k in p["labels"]] if p is not None else []
            names = [self.labels.names[int(k) - 1] for k in p["labels"]] if p is not None else []
            rows["path"].append(path)
            rows["width"].append(w)
            rows["height"].append(h)
            rows["boxes"].append(p["boxes"].tolist() if p is not None else None)
            rows["scores"].append(p["scores"].tolist() if p is not None else None)
            rows["labels"].append(labels if p is not None else None)
            rows["category_names"].append(names if p is not None else None)
            rows["masks"].append(encode_masks(p["masks"]) if p is not None else None)
            rows["model"].append(self.uri)
            rows["model_version"].append(self.version)
            rows["error"].append(errors[i])
        return pa.Table.from_pydict(rows, schema=SCHEMA)


# ---------------------------------------------------------------------------------------------
# After the write: summary, COCO results, overlays


@dataclass
class Summary:
    images: int = 0
    detections: int = 0
    errors: int = 0
    error_examples: list[str] | None = None
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def iter_rows(files: list[str], fs: pafs.FileSystem, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of the output files, a record batch at a time (never the whole store in memory)."""
    for f in files:
        for rb in pq.ParquetFile(fs.open_input_file(f)).iter_batches(columns=columns, batch_size=256):
            yield from rb.to_pylist()


def summarize(files: list[str], fs: pafs.FileSystem, seconds: float) -> Summary:
    s = Summary(error_examples=[], seconds=seconds)
    for f in files:
        t = pq.read_table(f, filesystem=fs, columns=["path", "scores", "error"])
        s.images += len(t)
        s.detections += int(pc.sum(pc.list_value_length(t.column("scores"))).as_py() or 0)
        errs = t.filter(pc.is_valid(t.column("error")))
        s.errors += len(errs)
        for row in errs.slice(0, 5).to_pylist():
            if len(s.error_examples) < 5:
                s.error_examples.append(f"{row['path']}: {row['error']}")
    return s


def write_coco_results(infer: dict[str, Any], files: list[str], fs: pafs.FileSystem, s3: dict[str, Any],
                       out: str) -> int:
    """Every detection of the output as COCO results, image ids from `infer.coco_annotations`
    matched by file name (the path under the input folder, else the base name)."""
    coco = json.loads(read_bytes(infer["coco_annotations"], s3))
    by_name = {im["file_name"]: im["id"] for im in coco["images"]}
    by_base = {posixpath.basename(k): v for k, v in by_name.items()}
    root = infer["input"].rstrip("/") + "/"
    n = 0
    ofs, opath = _fs(out, s3)
    with ofs.open_output_stream(opath) as f:
        f.write(b"[")
        for row in iter_rows(files, fs, ["path", "boxes", "scores", "labels", "masks", "error"]):
            if row["error"] is not None:
                continue
            rel = row["path"][len(root):] if row["path"].startswith(root) else row["path"]
            image_id = by_name.get(rel, by_base.get(posixpath.basename(row["path"])))
            if image_id is None:
                continue
            for (x1, y1, x2, y2), score, cat, rle in zip(row["boxes"], row["scores"], row["labels"], row["masks"]):
                det = {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                       "score": score, "segmentation": {"size": rle["size"], "counts": rle["counts"]}}
                f.write((b"," if n else b"") + json.dumps(det).encode())
                n += 1
        f.write(b"]")
    return n


def safe_name(path: str, root: str) -> str:
    """A flat file name from an input path: no folders, no `..`, nothing outside the output."""
    rel = path[len(root):] if path.startswith(root) else posixpath.basename(path)
    name = re.sub(r"[^\w.-]+", "_", rel.replace("\\", "/").replace("/", "__")).lstrip("._")
    return (name or "image")[:180]


def write_overlays(infer: dict[str, Any], files: list[str], fs: pafs.FileSystem, s3: dict[str, Any],
                   folder: str) -> list[str]:
    """Overlay PNGs for the first `infer.overlays` images without error (in path order)."""
    rows = []
    columns = ["path", "boxes", "scores", "labels", "category_names", "masks", "error", "width", "height"]
    for row in iter_rows(files, fs, columns):
        if row["error"] is None:
            rows.append(row)
    rows = sorted(rows, key=lambda r: r["path"])[: infer["overlays"]]
    ofs, opath = _fs(folder, s3)
    ofs.create_dir(opath, recursive=True)
    root = infer["input"].rstrip("/") + "/"
    written = []
    for row in rows:
        image = decode_image(read_uri(row["path"], s3), row["path"])
        masks = decode_rle_masks(row["masks"], (row["height"], row["width"])).bool()
        # Category ids as labels: a class keeps its colour across images.
        names = [""] * max(row["labels"], default=0)
        for cat, name in zip(row["labels"], row["category_names"]):
            names[cat - 1] = name
        pred = {"boxes": torch.tensor(row["boxes"]).reshape(-1, 4), "scores": torch.tensor(row["scores"]),
                "labels": torch.tensor(row["labels"], dtype=torch.long), "masks": masks}
        picture = draw_predictions(image, pred, names, score_threshold=0.0)
        target = posixpath.join(opath, safe_name(row["path"], root) + ".png")
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        with ofs.open_output_stream(target) as f:
            f.write(buf.getvalue())
        written.append(_uri(target, folder))
    return written


# ---------------------------------------------------------------------------------------------
# The job


def check_model(uri: str, tracking_uri: str) -> str:
    """Resolve the model before any Ray work: the registry version (pinned for every actor,
    even if the alias moves meanwhile) or the checkpoint path. Raises naming infer.model."""
    if uri.startswith("models:/"):
        try:
            return str(resolve_version(mlflow_client(tracking_uri), uri).version)
        except ValueError as e:
            raise ValueError(f"infer.model: {e}") from None
    if uri.startswith("runs:/"):
        run_id, _, sub = uri[len("runs:/"):].partition("/")
        client = mlflow_client(tracking_uri)
        try:
            files = {f.path for f in client.list_artifacts(run_id, sub or None)}
        except Exception as e:  # noqa: BLE001 - MlflowException or a store error for an unknown run
            raise ValueError(f"infer.model: {uri} does not exist ({e})") from None
        if not any(f.endswith("weights.pt") for f in files):
            raise ValueError(f"infer.model: {uri} holds no weights.pt (files: {sorted(files)})")
        return run_id
    if not Path(uri).is_file():
        raise FileNotFoundError(f"infer.model: {uri} is not a file nor a models:/ or runs:/ URI")
    return str(Path(uri).resolve())


def write_rows(ds: ray.data.Dataset, infer: dict[str, Any], s3: dict[str, Any], model_uri: str, tracking_uri: str,
               version: str, fs: pafs.FileSystem, out_path: str) -> None:
    """decode (CPU tasks) -> predict (actor pool) -> Parquet files under `out_path`."""
    # The light stages ask for a fraction of a CPU: with whole CPUs they would wait behind the
    # predictors on a small machine, and rows would reach the disk only at the end.
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=infer["batch_size"],
                        compute=ray.data.TaskPoolStrategy(size=infer["decode_concurrency"]),
                        num_cpus=0.5,  # light work; differing resources keep it out of the actors
                        fn_kwargs={"s3": s3, "max_pixels": infer["max_pixels"]})
    ds = ds.map_batches(Predictor, batch_size=infer["batch_size"], batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=infer["concurrency"]),
                        num_gpus=infer["num_gpus"], num_cpus=infer["cpus_per_actor"],
                        fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri, "version": version,
                                               "infer": infer})
    ds.write_parquet(out_path, filesystem=fs, schema=SCHEMA, min_rows_per_file=infer["rows_per_file"],
                     ray_remote_args={"num_cpus": 0.25})


def check_capacity(infer: dict[str, Any], cpus: float) -> None:
    """The predictor actors hold their CPUs for the whole job: they must leave half a CPU for a
    decode task and a quarter for a write task, or the job waits forever."""
    held = infer["concurrency"] * infer["cpus_per_actor"]
    if held + 0.75 > cpus:
        raise ValueError(f"infer.concurrency={infer['concurrency']} x infer.cpus_per_actor={infer['cpus_per_actor']:g} "
                         f"= {held:g} CPUs for the predictors leaves too little of this machine's {cpus:g} CPUs for "
                         "decoding and writing (0.75): lower infer.concurrency or infer.cpus_per_actor")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    infer, s3 = cfg["infer"], cfg["data"]["s3"]
    for key in ("input", "output"):
        if not infer[key]:
            raise ValueError(f"infer.{key} is not set: give a folder or s3:// prefix, e.g. infer.{key}=/data/images")
    for key in ("batch_size", "concurrency", "decode_concurrency", "max_pixels", "rows_per_file"):
        if infer[key] <= 0:
            raise ValueError(f"infer.{key}={infer[key]} must be > 0")
    if not is_s3(infer["input"]):
        infer["input"] = str(Path(infer["input"]).resolve())
    if not is_s3(infer["output"]):
        infer["output"] = str(Path(infer["output"]).resolve())
    cfg["output_dir"] = str(Path(cfg["output_dir"]).resolve())
    uri = resolve_tracking_uri(cfg["tracking"], cfg["output_dir"])
    check_tracking_server(uri)
    version = check_model(infer["model"], uri)
    input_kind(infer["input"], s3)
    model_uri = infer["model"]
    if model_uri.startswith("models:/"):
        model_uri = f"models:/{model_uri[len('models:/'):].split('@')[0].split('/')[0]}/{version}"

    if not ray.is_initialized():
        ray.init(address=cfg["ray_address"])
    if cfg["ray_address"] is None:  # a cluster may add nodes; this machine will not
        check_capacity(infer, ray.cluster_resources().get("CPU", 0))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    done = prepare_output(infer["output"], s3, infer["retry_errors"])
    before = set(output_files(infer["output"], s3))  # after the clean-up: what this run did not write
    t0 = time.time()
    paths = list_inputs(infer, s3)
    todo = paths.filter(pc.invert(pc.is_in(paths, value_set=done))) if len(done) else paths
    print(f"{len(paths)} inputs, {len(paths) - len(todo)} already in {infer['output']}, {len(todo)} to segment")
    fs, out_path = _fs(infer["output"], s3)
    if len(todo):
        write_rows(path_blocks(todo, infer), infer, s3, model_uri, uri, version, fs, out_path)
    seconds = time.time() - t0
    files = output_files(infer["output"], s3)
    new = [f for f in files if f not in before]
    summary = summarize(new, fs, seconds)
    outputs: dict[str, Any] = {"output": infer["output"], "files": files}
    if infer["coco_annotations"]:
        # Side outputs start with "_": readers of the folder as a Parquet dataset (pandas,
        # pyarrow, Spark) skip them.
        target = posixpath.join(infer["output"], "_coco_results.json")
        outputs["coco_results"] = target
        outputs["coco_detections"] = write_coco_results(infer, files, fs, s3, target)
    if infer["overlays"]:
        outputs["overlays"] = write_overlays(infer, files, fs, s3, posixpath.join(infer["output"], "_overlays"))
    run_id = track(cfg, uri, version, summary, outputs)
    print_summary(summary, outputs, run_id, uri)
    return {"summary": summary, "run_id": run_id, "tracking_uri": uri, "model_uri": model_uri, **outputs}


def track(cfg: dict[str, Any], uri: str, version: str, s: Summary, outputs: dict[str, Any]) -> str:
    """The job as an MLflow run: the infer config as params, the summary as metrics, overlays."""
    run_id = start_or_resume_run(uri, cfg["tracking"]["experiment"], time.strftime("infer-%Y%m%d-%H%M%S-")
                                 + f"{time.time_ns() % 10**6:06d}", {"infer": cfg["infer"]},
                                 tags={"job": "infer", "output": cfg["infer"]["output"], "model_version": version})
    client = mlflow_client(uri)
    log_metrics(client, run_id, {"infer/images": s.images, "infer/detections": s.detections,
                                 "infer/errors": s.errors, "system/images_per_s": s.images_per_s}, 0)
    for png in outputs.get("overlays", []):
        if not is_s3(png):
            client.log_artifact(run_id, png, "overlays")
    client.set_terminated(run_id)
    return run_id


def print_summary(s: Summary, outputs: dict[str, Any], run_id: str, uri: str) -> None:
    print(f"\nsegmented {s.images} images in {s.seconds:.1f} s ({s.images_per_s:.2f} images/s): "
          f"{s.detections} detections, {s.errors} errors")
    for example in s.error_examples or []:
        print(f"  error: {example}")
    print(f"rows: {outputs['output']} ({len(outputs['files'])} Parquet files)")
    if "coco_results" in outputs:
        print(f"COCO results: {outputs['coco_results']} ({outputs['coco_detections']} detections)")
    if outputs.get("overlays"):
        print(f"overlays: {posixpath.dirname(outputs['overlays'][0])}")
    print(f"MLflow run {run_id} at {uri}; open the UI: {ui_command(uri, run_id)}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run(to_container(cfg))


if __name__ == "__main__":
    main()
