"""Every notebook is committed executed and in sync with its plain-text source.

(The notebooks themselves are re-executed from scratch by ``pytest --nbmake``.)
"""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_source(path):
    source = path.with_suffix(".py")
    assert source.exists(), f"{path.name} has no paired source {source.name}"
    nb = nbformat.read(path, as_version=4)
    py = jupytext.read(source)
    cells_nb = [(c.cell_type, c.source.strip()) for c in nb.cells]
    cells_py = [(c.cell_type, c.source.strip()) for c in py.cells]
    assert cells_nb == cells_py, (f"{path.name} and {source.name} differ: rebuild the notebook "
                                  f"with jupytext --to ipynb and re-execute it")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code"
    counts = [c.execution_count for c in code]
    assert None not in counts, f"{path.name} has unexecuted cells"
    assert counts == sorted(counts), f"{path.name} was not executed top to bottom"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was committed with an error output"
