"""Running the notebooks as a reader would, with a cell of parameters injected after the one
tagged `parameters` (as papermill does)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run_notebook(name: str, cwd: Path, parameters: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute notebooks/`name` in `cwd`; returns the executed notebook (a failing cell raises
    `nbclient.exceptions.CellExecutionError` with its traceback)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode, mime: str) -> list:
    """Every output of the executed notebook carrying `mime` (e.g. image/png, text/plain)."""
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if mime in o.get("data", {})]


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("name") == "stdout")
