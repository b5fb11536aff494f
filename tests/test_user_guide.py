"""What a new user meets: the README's runnable commands, the notebooks and the MLflow UI in a
real browser, all on the store that the README's commands fill (on tiny settings)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.browser import CHROMIUM, capture, ui_pages
from tests.helpers.notebooks import outputs, run_notebook, stdout
from tests.helpers.processes import stopped_after
from tests.helpers.servers import mlflow_server, ray_temp_dir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOBS = ("mrcnn-train", "mrcnn-tune", "mrcnn-infer", "mrcnn-evaluate")
# Appended to every job command of the README: the same commands, on 64 px images for 1 epoch,
# the sweep over the backbones alone (two trials, one after the other on two cores).
TINY = ["~sweep.space.model.anchors", "model.transform.min_size=[64]", "model.transform.max_size=64",
        "trainer.epochs=1", "trainer.batch_size=2",
        "trainer.log_every_steps=2", "trainer.optimizer.warmup_steps=2", "tracking.log_images=2",
        "sweep.scheduler.max_epochs=1", "sweep.scheduler.grace_period=1", "infer.overlays=2",
        "infer.score_threshold=0.05"]


def runnable_blocks(markdown: str) -> list[str]:
    """The README's code blocks marked ```bash runnable, in order."""
    return re.findall(r"^```bash runnable\n(.*?)^```", markdown, flags=re.S | re.M)


def on_tiny_settings(block: str) -> str:
    """The block as a script, with TINY added to each job command (before a pipe, after a
    `mrcnn-models promote`'s `--`). Comments sit two spaces after their command."""
    tiny = " ".join(f"'{o}'" for o in TINY)
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        cmd = line.split("  #")[0].rstrip()
        words = cmd.split()
        if not words:
            continue
        if words[0] in JOBS:
            head, pipe, tail = cmd.partition(" | ")
            cmd = f"{head} {tiny}{' | ' + tail if pipe else ''}"
        elif words[:2] == ["mrcnn-models", "promote"]:
            cmd += f" {tiny}" if "--" in words else f" -- {tiny}"
        lines.append(cmd)
    return "\n".join(lines)


def test_the_readme_marks_its_main_commands_runnable():
    blocks = runnable_blocks((REPO / "README.md").read_text())
    commands = [line.split()[0:2] for b in blocks for line in on_tiny_settings(b).splitlines()]
    for want in (["mrcnn-train"], ["mrcnn-tune"], ["mrcnn-infer"], ["mrcnn-evaluate"], ["mrcnn-models", "promote"]):
        assert any(c[:len(want)] == want for c in commands), f"no runnable README block runs {want}"
    script = on_tiny_settings("mrcnn-train --cfg job | head  # comment\nmrcnn-models promote maskrcnn")
    assert script.splitlines()[0].startswith("mrcnn-train --cfg job '~sweep.space.model.anchors' 'model.")
    assert script.splitlines()[0].endswith("'infer.score_threshold=0.05' | head")
    assert script.splitlines()[1].startswith("mrcnn-models promote maskrcnn -- '~sweep.space.model.anchors'")


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """A fresh folder in which every runnable README block ran, in order, as a user would run
    them (the shapes dataset made small first, with one broken image among the val files)."""
    import ray

    ray.shutdown()
    cwd = tmp_path_factory.mktemp("guide")
    temp = ray_temp_dir("rg")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_TMPDIR=str(temp))
    shapes = cwd / "outputs/data/shapes"
    subprocess.run([BIN / "mrcnn-shapes", "--out", shapes, "--train", "16", "--val", "6", "--size", "64"],
                   check=True, env=env, capture_output=True)
    (shapes / "val" / "broken.jpg").write_bytes(b"not an image")
    runs = []
    try:
        for block in runnable_blocks((REPO / "README.md").read_text()):
            script = on_tiny_settings(block)
            with stopped_after():  # anything a block's Ray instance left running
                done = subprocess.run(["bash", "-ec", script], cwd=cwd, env=env, capture_output=True, text=True,
                                      timeout=900)
            runs.append((script, done))
            if done.returncode:
                break
        yield {"cwd": cwd, "runs": runs, "uri": f"sqlite:///{cwd / 'outputs/mlflow.db'}"}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_readme_commands_work_as_written(guide):
    for script, done in guide["runs"]:
        assert done.returncode == 0, f"{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = "\n".join(done.stdout for _, done in guide["runs"])
    assert "registered maskrcnn version 1 (alias candidate)" in out
    assert "sweep bb-anchors: 2 trials" in out and "registered maskrcnn version 2" in out
    assert "maskrcnn@champion -> version 1" in out
    assert re.search(r"promoted version 2|kept version 1", out)
    assert "segmented 7 images" in out and "1 errors" in out and "broken.jpg" in out
    assert "name: resnet50" in out  # --cfg job printed the composed config

    # Every training run and sweep trial logged its model; MLflow ranks them by the linked AP.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(guide["uri"])
    exp = client.get_experiment_by_name("maskrcnn").experiment_id
    ranked = client.search_logged_models([exp], order_by=[{"field_name": "metrics.val/segm_AP", "ascending": False}])
    ap = [next(m.value for m in lm.metrics if m.key == "val/segm_AP") for lm in ranked]
    assert len(ranked) == 3 and ap == sorted(ap, reverse=True)  # shapes-a and the 2 trials


@pytest.mark.slow
def test_notebooks_run_on_what_the_commands_made(guide, tmp_path):
    quick = run_notebook("01_quickstart.ipynb", tmp_path,
                         f"OUT = '{tmp_path / 'shapes'}'\nTRAIN_IMAGES = 8\nSTEPS = 3\nBATCH = 2")
    assert len(outputs(quick, "image/png")) == 5  # the loss curve and four val images side by side
    assert "detections per image" in stdout(quick)

    compare = run_notebook("02_compare_runs.ipynb", tmp_path, f"TRACKING_URI = '{guide['uri']}'\nSWEEP = 'bb-anchors'")
    assert "sweep 'bb-anchors': 2 trials" in stdout(compare)
    table = outputs(compare, "text/html")[0]
    assert table.count("resnet18") == 1 and table.count("resnet34") == 1
    assert len(outputs(compare, "image/png")) >= 2  # the metric plot and the best trial's overlays

    rows = run_notebook("03_batch_inference.ipynb", tmp_path,
                        f"OUTPUT = '{guide['cwd'] / 'outputs/infer'}'\nSCORE = 0.05")
    assert "7 images: 6 segmented, 1 errors" in stdout(rows)
    assert any("broken.jpg" in html for html in outputs(rows, "text/html"))
    assert len(outputs(rows, "image/png")) >= 5  # the per-class bars and four overlays


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it where apt is available)")
def test_mlflow_ui_shows_runs_sweeps_and_models_in_a_real_browser(guide, tmp_path):
    from mlflow.tracking import MlflowClient

    store = guide["cwd"] / "outputs"
    with mlflow_server(tmp_path / "server", backend=f"sqlite:///{store / 'mlflow.db'}") as url:
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("maskrcnn").experiment_id
        run = client.search_runs([exp], filter_string="tags.ray_run_name = 'shapes-a'")[0].info.run_id
        sweep = client.search_runs([exp], filter_string="tags.job = 'sweep'")[0].info.run_id
        text = capture(ui_pages(url, client, run, sweep, "maskrcnn"), tmp_path / "screenshots")
    for name, page in text.items():
        assert "Model training" in page and "Evaluation runs" not in page, f"{name} opened in the GenAI view"
    assert "shapes-a" in text["run_metrics"]
    sections = dict(re.findall(r"\b(train|val|data) \((\d+)\)", text["run_metrics"]))
    assert int(sections["train"]) >= 10 and int(sections["val"]) >= 4, sections  # losses; COCO AP and AR
    assert "epoch_loss_mask" in text["run_metrics"]
    assert all(a in text["run_artifacts"] for a in ("predictions", "config.yaml", "data_report"))
    assert "Comparing 2 Runs" in text["compare"] and "Parallel Coordinates Plot" in text["compare"]
    assert "model.backbone.name" in text["compare"] and "resnet34" in text["compare"]
    assert "bb-anchors" in text["runs_chart"] and "shapes-a" in text["runs_chart"]
    assert "Version 2" in text["model"] and "@ champion" in text["model"] and "@ candidate" in text["model"]
    assert "val/segm_AP" in text["models_tab"] and "Ready" in text["models_tab"]
    assert "maskrcnn v1" in text["models_tab"] and "maskrcnn v2" in text["models_tab"]  # registered from them
    for name in text:
        assert (tmp_path / "screenshots" / f"{name}.png").stat().st_size > 10_000
