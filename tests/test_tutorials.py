"""Every notebook in tutorials/ runs top to bottom, is the notebook of its jupytext script
(``tutorials/NN_*.py``, the source: ``jupytext --sync tutorials/*.py`` rewrites the notebooks),
and the committed files carry no outputs.

The kernel is this interpreter (a kernel spec written to a temporary directory), so the test needs
no kernel installed in the environment; it runs in a temporary working directory, with one
thread per kernel: the tutorials' models are tiny, and extra threads only add hand-offs (and
contention when the test suite shares the machine).
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
SCRIPTS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
KERNEL = "captum-influence-tests"
CELL_TIMEOUT_S = 300
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _prepend(path, variable):
    return os.pathsep.join(filter(None, [str(path), os.environ.get(variable)]))


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A directory holding one kernel spec, for JUPYTER_PATH."""
    path = tmp_path_factory.mktemp("jupyter")
    kernels = path / "kernels"
    (kernels / KERNEL).mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (tests)",
        "language": "python",
    }
    (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return path


def test_the_four_tutorials_are_there():
    assert {"01_", "02_", "03_", "04_"} <= {p.name[:3] for p in NOTEBOOKS}
    assert [p.stem for p in SCRIPTS] == [p.stem for p in NOTEBOOKS]  # each notebook has its script


def _cells(nb):
    return [(cell.cell_type, cell.source) for cell in nb.cells]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_notebook_is_its_script(script):
    jupytext = pytest.importorskip("jupytext", reason="jupytext (the dev and tutorials extras) reads the scripts")
    text = jupytext.read(script)
    assert text.metadata["jupytext"]["formats"] == "ipynb,py:percent"  # paired: jupytext --sync updates both
    nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    assert _cells(nb) == _cells(text), f"{script.name} and its notebook differ: run jupytext --sync tutorials/*.py"
    assert all(cell_type in ("code", "markdown") for cell_type, _ in _cells(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, jupyter_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", _prepend(jupyter_path, "JUPYTER_PATH"))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _prepend(ROOT, "PYTHONPATH")}
    failure = None
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        failure = ANSI_COLOUR.sub("", str(err))  # the failing cell's source and its traceback
    if failure is not None:
        pytest.fail(f"{path.name} failed:\n{failure}", pytrace=False)
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
