"""`mrcnn-infer` on real files: a local folder, the same store on a local S3 server, a model
from a real MLflow registry, a killed driver, and a two-node cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mrcnn.checkpoint import write_model_files
from mrcnn.data.images import decode_image
from mrcnn.evaluation.coco_eval import coco_ground_truth
from mrcnn.segment import predict_images
from tests.helpers.jobs import compose_job
from tests.helpers.processes import stopped_after
from tests.helpers.registry import LABEL_MAP, TINY, assert_same_row, register_tiny_models, tiny_model
from tests.helpers.s3server import s3_server, set_credentials, upload_folder
from tests.helpers.servers import kill_job, ray_temp_dir
from tests.helpers.stores import make_store
from workflows.checks import validate
from workflows.config import as_dict
from workflows.inference.inputs import SCHEMA
from workflows.inference.outputs import safe_name
from workflows.jobs import infer
from workflows.logged_model import load_model
from workflows.tracking import mlflow_client, start_or_resume_run

REPO = Path(__file__).resolve().parents[1]
LIMITS = ["infer.score_threshold=0.05", "infer.max_detections=20", "infer.max_pixels=1000000"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, gapped_shapes):
    """A tiny model (ids 3, 7, 11) logged to a run and registered as shapes-infer@champion in
    a SQLite registry."""
    root = tmp_path_factory.mktemp("registry")
    uri, (version,) = register_tiny_models(root, "shapes-infer")
    model, client = tiny_model(0), mlflow_client(uri)
    cfg = compose_job(TINY)
    # The same weights as a version of the older layout: the three files under a run's model/.
    legacy_run = start_or_resume_run(uri, "maskrcnn", "infer-model-legacy", {"model": as_dict(cfg.model)})
    folder = write_model_files(root / "legacy" / "model", model.state_dict(), model.cfg.to_dict(),
                               LABEL_MAP)
    client.log_artifacts(legacy_run, str(folder), "model")
    legacy = client.create_model_version("shapes-infer", f"{client.get_run(legacy_run).info.artifact_uri}/model",
                                         run_id=legacy_run)
    client.set_registered_model_alias("shapes-infer", "legacy", legacy.version)
    return {"uri": uri, "version": version, "root": root}


@pytest.fixture(scope="module")
def store(tmp_path_factory, gapped_shapes):
    root = tmp_path_factory.mktemp("store")
    return root, make_store(root, gapped_shapes)


def job(out: Path, src: str, dst: str, registered: dict, *extra: str) -> dict:
    return compose_job([f"output_dir={out}", f"tracking.tracking_uri={registered['uri']}",
                        f"infer.input={src}", f"infer.output={dst}", "infer.model=models:/shapes-infer@champion",
                        "infer.batch_size=3", "infer.rows_per_file=4", *LIMITS, *extra])


def rows_of(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.mark.slow
def test_folder_store_every_file_one_row(ray_local, registered, store, gapped_shapes, tmp_path):
    root, expect = store
    out = tmp_path / "rows"
    result = infer.run(job(tmp_path, str(root), str(out), registered, "infer.overlays=3",
                           f"infer.coco_annotations={gapped_shapes / 'annotations/instances_val.json'}"))
    rows = rows_of(out)
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == len(expect)  # one row per input; readme.txt not taken
    assert pq.read_schema(next(out.glob("*.parquet"))).equals(SCHEMA, check_metadata=False)
    for rel, want in expect.items():
        row = by_path[str(root / rel)]
        assert row["model"] == f"models:/shapes-infer/{registered['version']}"
        assert row["model_version"] == registered["version"]
        if "error" in want:
            assert row["error"] and want["error"] in row["error"], (rel, row["error"])
            assert row["boxes"] is None and row["width"] is None
        else:
            assert row["error"] is None, (rel, row["error"])
            assert (row["width"], row["height"]) == want["size"], rel
            assert len(row["boxes"]) == len(row["masks"]) == len(row["scores"]) <= 20
            assert set(row["labels"]) <= {3, 7, 11}
            assert all(m["size"] == [row["height"], row["width"]] for m in row["masks"])
    assert "pixels" in by_path[str(root / "bomb.png")]["error"]

    # A good image's row equals the same model called in-process on the same decoded image.
    loaded = load_model("models:/shapes-infer@champion", registered["uri"])
    model = loaded.model.set_detection_limits(0.05, 20).eval()
    name = "000001.jpg"
    image = torch.from_numpy(decode_image((root / name).read_bytes())).permute(2, 0, 1).float() / 255
    pred = predict_images(model, [image])[0]
    row = by_path[str(root / name)]
    assert len(pred["scores"]) > 0
    assert torch.allclose(torch.tensor(row["boxes"]), pred["boxes"], atol=1e-4)
    assert torch.allclose(torch.tensor(row["scores"]), pred["scores"], atol=1e-6)
    assert row["labels"] == [loaded.labels.category_id(int(k)) for k in pred["labels"]]
    from mrcnn.masks import encode_masks

    assert [m["counts"] for m in row["masks"]] == [m["counts"] for m in encode_masks(pred["masks"])]

    # Summary, MLflow run, COCO results evaluated by pycocotools, overlays inside the output.
    s = result["summary"]
    assert s.images == len(expect) and s.errors == 4 and s.detections == sum(len(r["scores"] or []) for r in rows)
    run = mlflow_client(registered["uri"]).get_run(result["run_id"])
    assert run.data.metrics["infer/errors"] == 4 and run.data.metrics["infer/images"] == len(expect)
    assert len([a for a in mlflow_client(registered["uri"]).list_artifacts(result["run_id"], "overlays")]) == 3
    results = json.loads((out / "_coco_results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2, 3, 4}
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(json.loads((gapped_shapes / "annotations/instances_val.json").read_text()), "pycocotools")
    for r in results:
        r["segmentation"]["counts"] = r["segmentation"]["counts"].encode()
    ev = COCOeval(gt, gt.loadRes(results), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert 0 <= ev.stats[0] <= 1
    overlays = sorted((out / "_overlays").iterdir())
    assert [p.name for p in overlays] == ["000000.jpg.png", "000001.jpg.png", "000002.jpg.png"]

    # Rerun after completion: nothing new is written.
    files = sorted(out.glob("*.parquet"))
    again = infer.run(job(tmp_path, str(root), str(out), registered, "infer.overlays=0"))
    assert again["summary"].images == 0 and sorted(out.glob("*.parquet")) == files

    # retry_errors: the error rows are tried again and still one row per input.
    retried = infer.run(job(tmp_path, str(root), str(out), registered, "infer.overlays=0", "infer.retry_errors=true"))
    assert retried["summary"].images == 4 and retried["summary"].errors == 4
    assert sorted(r["path"] for r in rows_of(out)) == sorted(by_path)


@pytest.mark.slow
def test_same_store_on_s3_and_from_a_manifest(ray_local, registered, store, tmp_path):
    root, expect = store
    local = tmp_path / "local"
    infer.run(job(tmp_path, str(root), str(local), registered, "infer.overlays=0"))
    want = {r["path"][len(str(root)) + 1:]: r for r in rows_of(local)}
    set_credentials()
    with s3_server() as endpoint:
        upload_folder(endpoint, "images", root, "store")
        s3 = [f"data.s3.endpoint_override={endpoint}", "data.s3.access_key=testing", "data.s3.secret_key=testing"]
        result = infer.run(job(tmp_path, "s3://images/store", "s3://images/rows", registered, "infer.overlays=1", *s3))
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1")
        got = {r["path"][len("s3://images/store/"):]: r
               for f in result["files"] for r in pq.read_table(f, filesystem=fs).to_pylist()}
        assert result["overlays"] and result["overlays"][0].startswith("s3://images/rows/_overlays/")
    assert set(got) == set(want) == set(expect)
    for k, row in want.items():
        a, b = dict(got[k]), dict(row)
        if a["error"]:  # the messages name the file where it is
            a["error"] = a["error"].replace("s3://images/store/", "")
            b["error"] = b["error"].replace(str(root) + "/", "")
        assert {**a, "path": None} == {**b, "path": None}, k

    # A CSV manifest with relative paths, one of them missing on disk.
    manifest = tmp_path / "list.csv"
    rels = [k for k in expect if "error" not in expect[k]][:3]
    manifest.write_text("path\n" + "\n".join(str(Path(os.path.relpath(root / r, tmp_path))) for r in rels)
                        + "\nnot/there.jpg\n")
    out = tmp_path / "from-manifest"
    infer.run(job(tmp_path, str(manifest), str(out), registered, "infer.overlays=0"))
    rows = {r["path"]: r for r in rows_of(out)}
    assert set(rows) == {str(root / r) for r in rels} | {str(tmp_path / "not/there.jpg")}
    assert "does not exist" in rows[str(tmp_path / "not/there.jpg")]["error"] or \
        "not/there.jpg" in rows[str(tmp_path / "not/there.jpg")]["error"]


@pytest.mark.parametrize("override,message", [
    ("infer.model=models:/shapes-infer@nope", "infer.model: models:/shapes-infer@nope does not exist"),
    ("infer.model=models:/missing@champion", "no registered model 'missing'"),
    ("infer.model=/no/such/checkpoint.pt", "infer.model: /no/such/checkpoint.pt"),
    ("infer.input=/no/such/folder", "infer.input: /no/such/folder does not exist"),
])
def test_bad_infer_config_fails_before_ray(override, message, registered, store, tmp_path):
    import ray

    ray.shutdown()
    cfg = job(tmp_path, str(store[0]), str(tmp_path / "rows"), registered, override)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        infer.run(cfg)
    assert not ray.is_initialized()


def test_safe_overlay_names_stay_inside_the_output():
    root = "/data/store/"
    for path in ["/data/store/../../etc/passwd", "/data/store/a/../../b.png", "/elsewhere/x.png",
                 "/data/store/..", "s3://bucket/../../x.jpg", "/data/store/ünïcode name.jpg"]:
        name = safe_name(path, root)
        assert "/" not in name and not name.startswith(".") and name
    assert safe_name("/data/store/a/b c.jpg", root) == "a__b_c.jpg"


@pytest.mark.slow
def test_killed_infer_job_reruns_to_exactly_one_row_per_input(registered, gapped_shapes, tmp_path):
    """SIGKILL the driver once rows are on disk, leave a half-written file as a crash would; the
    same command completes with exactly one row per input. (A rerun of a finished output writes
    nothing: test_folder_store_every_file_one_row.)"""
    import ray

    ray.shutdown()
    from mrcnn.data.shapes import write_shapes_dataset

    root = write_shapes_dataset(tmp_path / "many", train=1, val=120, size=64, seed=3) / "val"
    out = tmp_path / "rows"
    temp = ray_temp_dir("ri")
    args = [str(Path(sys.executable).parent / "mrcnn-infer"), f"output_dir={tmp_path}",
            f"tracking.tracking_uri={registered['uri']}", f"infer.input={root}", f"infer.output={out}",
            "infer.model=models:/shapes-infer@champion", "infer.batch_size=2", "infer.rows_per_file=2",
            "infer.overlays=0", *LIMITS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(RAY_TMPDIR=str(temp), PYTHONPATH=str(REPO))
    with stopped_after():  # what a killed driver's workers leave is stopped, by PID
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.parquet"))) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed"
        kill_job(proc)
    partial = rows_of(out)
    assert 0 < len(partial) < 120
    (out / "cut-short.parquet").write_bytes(b"PAR1" + b"\0" * 100)  # a write cut off mid-file
    try:
        with stopped_after():
            done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        rows = rows_of(out)
        assert len(rows) == 120 and len({r["path"] for r in rows}) == 120
        assert f"segmented {120 - len(partial)} images" in done.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_predictors_that_would_leave_no_cpu_for_writing_are_refused(registered, store, tmp_path):
    """On a 2-CPU machine, predictors holding every CPU would starve the write tasks: the job
    would wait forever. The check names the keys to change (the job makes it on starting Ray)."""
    cfg = job(tmp_path, str(store[0]), str(tmp_path / "rows"), registered, "infer.concurrency=2")
    validate(cfg, "infer")  # without the machine's size: fine
    with pytest.raises(ValueError, match=r"infer.concurrency=2 x infer.cpus_per_actor=1 = 2 CPUs .* this "
                                         r"machine's 2 CPUs"):
        validate(cfg, "infer", cpus=2)
    validate(cfg, "infer", cpus=3)


@pytest.mark.slow
def test_predictors_stay_flat_over_thousands_of_images_with_detections(registered, tmp_path):
    """The store-scale load of `benchmarks/infer.py`, smaller: 2,000 files through two predictor
    actors, 20 detections (boxes and RLE masks) an image. Rows are exactly one per input. After
    warm-up (half the images) a predictor maps no more of Ray's object store: under 2 MiB per
    1,000 images, where one decoded image kept per image was 47. Its own heap is the
    benchmark's to bound (over 20,000 images): over 1,000 the heap's steps, 10-35 MiB whenever
    a batch needs more than any before it, hide a slope of that size."""
    import ray

    from mrcnn.data.shapes import write_shapes_dataset
    from tests.helpers.memory import ProcessMemory, slope_per_1000

    ray.shutdown()  # a fresh instance: 2 one-CPU actors + write tasks
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    n, per_file = 2000, 100
    root = write_shapes_dataset(tmp_path / "big", train=1, val=n, size=64, seed=5) / "val"
    out = tmp_path / "rows"
    cfg = job(tmp_path, str(root), str(out), registered, "infer.overlays=0", "infer.concurrency=2",
              "infer.torch_threads=1", "infer.batch_size=8", f"infer.rows_per_file={per_file}",
              "infer.score_threshold=0.0")
    done = lambda: per_file * sum(1 for f in out.glob("*.parquet")) if out.exists() else 0  # noqa: E731
    with ProcessMemory(done, interval=0.5) as mem:
        result = infer.run(cfg)
    ray.shutdown()
    assert result["summary"].images == n and result["summary"].errors == 0
    assert result["summary"].detections >= 15 * n  # masks in the rows, as a trained model's
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == n
    shared = [p for p in mem.series("predictor", "shmem") if p[0] >= n // 2]
    assert len({p[0] for p in shared}) >= 8, shared  # files of 100 rows: up to 11 points
    slope = slope_per_1000(shared)
    assert slope < 2.0, f"predictors map {slope:.2f} MiB of the object store per 1,000 images: {shared}"


def _model_folder(store_root: Path, dst: Path) -> list[Path]:
    """Four shapes JPEGs and one as PNG, all 64 x 64 (batched alike in any grouping)."""
    from PIL import Image

    dst.mkdir()
    files = []
    for src in sorted(store_root.glob("0000*.jpg")):
        files.append(dst / src.name)
        files[-1].write_bytes(src.read_bytes())
    Image.open(files[0]).save(dst / "as_png.png")
    return [*files, dst / "as_png.png"]


@pytest.mark.slow
def test_the_registered_model_in_mlflow_predicts_what_infer_writes(ray_local, registered, store, tmp_path):
    """`mlflow.pyfunc.load_model("models:/NAME@champion")` in a fresh process (MLflow's loader,
    executing the logged code file) returns for real image files the rows `mrcnn-infer` wrote, in
    fp32 and in bf16 (`infer.precision` and the pyfunc's `precision` param; the bf16 rows differ
    from the fp32 ones). A version registered before logged models (three files under a run's
    `model/`) segments in `mrcnn-infer` as the same weights logged today."""
    files = _model_folder(store[0], tmp_path / "images")
    rows = {}
    # bf16 results depend on the batch an image is predicted in (its padding, the kernels chosen):
    # there both sides predict one image at a time.
    for alias, precision in (("champion", "fp32"), ("legacy", "fp32"), ("champion", "bf16")):
        out = tmp_path / f"{alias}-{precision}"
        infer.run(job(tmp_path, str(tmp_path / "images"), str(out), registered, "infer.overlays=0",
                      f"infer.model=models:/shapes-infer@{alias}", f"infer.precision={precision}",
                      *(["infer.batch_size=1"] if precision == "bf16" else [])))
        rows[alias, precision] = {r["path"]: {k: v for k, v in r.items() if not k.startswith("model")}
                                  for r in rows_of(out)}
    assert rows["legacy", "fp32"] == rows["champion", "fp32"] and len(rows["legacy", "fp32"]) == 5
    assert rows["champion", "bf16"] != rows["champion", "fp32"]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/shapes-infer@champion')\n"
        "frame = pd.DataFrame({'image': [open(p, 'rb').read() for p in sys.argv[1:]]})\n"
        "params = {'score_threshold': 0.05, 'max_detections': 20}\n"
        "print(json.dumps(model.predict(frame, params={**params, 'precision': 'fp32'}).to_dict('records')))\n"
        "rows = [model.predict(frame.iloc[i:i + 1], params={**params, 'precision': 'bf16'}).to_dict('records')[0]\n"
        "        for i in range(len(frame))]\n"
        "print(json.dumps(rows))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "OMP_NUM_THREADS": "1"}  # as one-CPU actors
    done = subprocess.run([sys.executable, "-c", script, *map(str, files)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    assert any(r["boxes"] for r in served[0]), "degenerate: no detections to compare"
    for precision, rows_served in zip(("fp32", "bf16"), served):
        written = rows["champion", precision]
        for path, row in zip(files, rows_served):
            assert_same_row(row, written[str(path)])


@pytest.mark.slow
def test_mlflow_serves_the_registered_model_over_http(registered, store, tmp_path):
    """`mlflow models serve --env-manager local` on 127.0.0.1: JPEG and PNG bytes (base64 in the
    JSON request) give rows, a broken file an error row, an empty body a 4xx."""
    import base64
    import urllib.error
    import urllib.request

    from tests.helpers.servers import free_port, wait_http

    files = _model_folder(store[0], tmp_path / "images")
    port = free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m",
                             "models:/shapes-infer@champion", "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(body: bytes) -> dict:
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    try:
        wait_http(f"{url}/ping", timeout=240)
        images = [files[0].read_bytes(), files[-1].read_bytes(), b"\x89PNG\r\n\x1a\n broken"]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]},
                "params": {"score_threshold": 0.05, "max_detections": 20}}
        rows = post(json.dumps(body).encode())["predictions"]
        with pytest.raises(urllib.error.HTTPError) as empty:
            post(b"")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()
    assert len(rows) == 3
    for row in rows[:2]:
        assert row["error"] is None and (row["width"], row["height"]) == (64, 64)
        assert len(row["boxes"]) == len(row["masks"]) == len(row["scores"]) <= 20 and set(row["labels"]) <= {3, 7, 11}
    assert rows[0]["labels"] and rows[0]["masks"][0]["size"] == [64, 64]
    assert rows[2]["boxes"] is None and "cannot decode" in rows[2]["error"]
    assert 400 <= empty.value.code < 500
