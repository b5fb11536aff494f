"""The MLflow UI in headless Chromium (Debian's `chromium`, driven by Playwright): each page is
loaded in the model-training view, its rendered text returned and a screenshot saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Quiet on a closed network: no background services that would call out at start.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ML = "workflowType=machine_learning"


def ui_pages(base: str, client: MlflowClient, run_id: str, sweep_run_id: str,
             model: str) -> dict[str, tuple]:
    """The pages a user opens, each with a text it shows once its data has loaded: a training
    run's charts and artifacts, a sweep's trials compared, the experiment's runs in the chart
    view, a registered model, the experiment's logged models."""
    run = client.get_run(run_id)
    exp = run.info.experiment_id
    trials = [r.info.run_id for r in client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")]
    return {
        "run_metrics": (f"{base}/#/experiments/{exp}/runs/{run_id}/model-metrics?{ML}", "epoch_loss_mask"),
        "run_artifacts": (f"{base}/#/experiments/{exp}/runs/{run_id}/artifacts?{ML}", "data_report"),
        "compare": (f"{base}/#/compare-runs?runs={json.dumps(trials)}&experiments={json.dumps([exp])}&{ML}",
                    "Parallel Coordinates Plot"),
        "runs_chart": (f"{base}/#/experiments/{exp}/runs?{ML}&compareRunsMode=CHART", run.info.run_name),
        "model": (f"{base}/#/models/{model}?{ML}", "champion"),
        # Wide: the table draws only the metric columns that fit, and val/segm_AP is the fifth.
        "models_tab": (f"{base}/#/experiments/{exp}/models?{ML}", run.info.run_name, 2400),
    }


def capture(pages: dict[str, tuple], out: Path, width: int = 1400, height: int = 900,
            timeout_ms: int = 60_000) -> dict[str, str]:
    """Load each page until its text shows, close the assistant panel, save out/NAME.png;
    returns NAME -> the text the page rendered."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        for name, (url, ready, *wide) in pages.items():
            page.set_viewport_size({"width": wide[0] if wide else width, "height": height})
            page.goto(url)  # the UI polls its server: "network idle" never comes; wait for the data
            page.get_by_text(ready).first.wait_for(timeout=timeout_ms)
            page.wait_for_timeout(500)  # charts draw after their data arrives
            close = page.locator("button[aria-label='Close']")
            if close.count():
                close.first.click()
                page.wait_for_timeout(500)
            texts[name] = " ".join(page.inner_text("body").split())
            page.screenshot(path=str(out / f"{name}.png"))
        browser.close()
    return texts
