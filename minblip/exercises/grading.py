"""Run an exercise's checks with plain pytest, in a project folder of one's choice."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from . import EXERCISES, Exercise
from .student import SKIP_DIRS, _cell_text


def existing_tests(root: Path, exercise: Exercise) -> list[str]:
    """The exercise's node ids whose test function exists under ``root`` (a
    student version has no hidden tests)."""
    found = []
    for node in exercise.tests:
        path, name = node.split("::")
        file = Path(root) / path
        if file.exists() and re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.M):
            found.append(node)
    return found


def run_pytest(root: Path, node_ids, extra_args=(), timeout: float = 900) -> dict:
    """Run pytest on ``node_ids`` (and ``extra_args``, e.g. whole files) inside
    ``root``, with ``root`` first on the import path, so the ``minblip`` there
    is the one tested. Returns {node id: (outcome, message)}, outcome one of
    "passed", "failed", "error", "skipped"."""
    root = Path(root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]]
                                                           if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", "-o", "junit_family=xunit2", *node_ids, *extra_args]
        subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, check=False)
        if not report.exists():
            raise RuntimeError(f"pytest wrote no report in {root}: {' '.join(cmd)}")
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            parts = case.get("classname", "").split(".")
            path = "/".join(parts) + ".py"
            if not (root / path).exists():  # a class inside the module
                path = "/".join(parts[:-1]) + ".py::" + parts[-1]
            node = f"{path}::{case.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                child = case.find(tag)
                if child is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (child.get("message") or "") + "\n" + (child.text or "")
                    break
            results[node] = (outcome, message)
        return results


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=lambda d, names: [
        n for n in names if n in SKIP_DIRS or n.endswith((".egg-info", ".pyc"))])


def _overwrite_locked_cells(student_nb: Path, source_nb: Path) -> None:
    """nbgrader's rule: cells marked locked or grade in the source replace the
    student's cells of the same grade_id (so hidden tests come back)."""
    nb = json.loads(student_nb.read_text())
    src = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id"): c
           for c in json.loads(source_nb.read_text()).get("cells", [])}
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        gid = meta.get("grade_id")
        if gid in src and (meta.get("locked") or meta.get("grade")) and not meta.get("solution"):
            cell["source"] = _cell_text(src[gid])
    student_nb.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def grade(submission: Path, source: Path, exercises=EXERCISES) -> list[dict]:
    """Grade a student's project folder against the instructor's source.

    The submission is copied to a temporary folder; its ``tests/`` is replaced by
    the source's (with the hidden tests) and, in its notebooks, the locked and
    graded cells are taken from the source. Then every check of every exercise
    runs with pytest. Returns one row per exercise: id, title, passed, total.
    """
    submission, source = Path(submission).resolve(), Path(source).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "submission"
        _copy_tree(submission, work)
        shutil.rmtree(work / "tests", ignore_errors=True)
        _copy_tree(source / "tests", work / "tests")
        for nb in (work / "notebooks").glob("*.ipynb"):
            if (source / "notebooks" / nb.name).exists():
                _overwrite_locked_cells(nb, source / "notebooks" / nb.name)
        nodes = [n for e in exercises for n in e.tests]
        results = run_pytest(work, nodes)
    rows = []
    for e in exercises:
        passed = sum(results.get(n, ("missing", ""))[0] == "passed" for n in e.tests)
        rows.append({"id": e.id, "title": e.title, "passed": passed, "total": len(e.tests)})
    return rows


def notebook_exercise_cells(root: Path, exercise: Exercise) -> list[str]:
    """The code a notebook exercise is checked with: the notebook's first code cell
    (its imports) and then every cell whose nbgrader grade_id starts with
    ``ex{N}_{k}_`` (the solution cell and the check cells), in notebook order."""
    nb = json.loads((Path(root) / exercise.notebook_path).read_text())
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    prefix = "ex" + exercise.id.replace(".", "_") + "_"
    cells = [c for c in code
             if c.get("metadata", {}).get("nbgrader", {}).get("grade_id", "").startswith(prefix)]
    if not cells:
        raise ValueError(f"{exercise.notebook_path} has no cells with a grade_id starting "
                         f"with {prefix!r}")
    return [_cell_text(code[0])] + [_cell_text(c) for c in cells]


def run_notebook_exercise(root: Path, exercise: Exercise) -> dict:
    """Execute a notebook exercise's cells (see :func:`notebook_exercise_cells`)
    in a fresh namespace; any failing check raises. Returns the namespace."""
    namespace = {"__name__": f"exercise_{exercise.id.replace('.', '_')}"}
    for source in notebook_exercise_cells(root, exercise):
        exec(compile(source, f"{exercise.notebook_path} (exercise {exercise.id})", "exec"),
             namespace)
    return namespace
