"""The exercise machinery: the registry, the student version, grading, and the
wrong answers the checks must catch. Instructor-only (left out of the student
version).

The student version is generated once per module into a temporary folder. Only
the exercise checks and a few exercise-free test files run inside it, with
pytest in a subprocess, so the whole module stays well under two minutes.
"""
import ast
import importlib
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from exercise_wrong_answers import WRONG_ANSWERS
from minblip.exercises import BY_ID, EXERCISES, INSTRUCTOR_ONLY, by_region
from minblip.exercises.grading import existing_tests, grade, notebook_exercise_cells, run_pytest
from minblip.exercises.student import (BEGIN, BEGIN_HIDDEN, END, END_HIDDEN, STUB, ExerciseError,
                                       _functions, find_regions, generate, locate, project_files,
                                       restore, solution_lines, transform_text)

ROOT = Path(__file__).resolve().parents[1]
# exercise-free test files that must pass untouched in the student version, besides the
# exercise checks; test_layers.py also holds tests that depend on exercises 1.1 and 1.2
CHANGED = []  # the files the student version changed, filled by the fixture
OTHER_TEST_FILES = ["tests/test_layers.py", "tests/test_gradcheck_selftest.py",
                    "tests/test_tokenizer.py"]


def strip_hidden(text):
    lines = text.split("\n")
    drop = set()
    for r in find_regions(text, "text"):
        if r.kind == "hidden":
            drop.update(range(r.begin, r.end + 1))
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


# ---------------------------------------------------------------------------
# The registry and the source tree agree
# ---------------------------------------------------------------------------

def test_registry_matches_the_regions_in_the_source():
    found = set()
    for path in project_files(ROOT):
        rel = path.relative_to(ROOT).as_posix()
        if path.suffix == ".ipynb":
            texts = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]
        elif path.suffix == ".py":
            texts = [path.read_text()]
        else:
            continue
        for text in texts:
            for r in locate(text, rel):
                if r.kind == "solution":
                    key = rel.replace(".py", ".ipynb") if rel.startswith("notebooks/") else rel
                    found.add(f"{key}::{r.qualname}")
    assert found == set(by_region())
    ids = [e.id for e in EXERCISES]
    assert len(ids) == len(set(ids))
    notebooks = {e.notebook for e in EXERCISES}
    assert {f"{i:02d}" for i in range(1, 15)} <= {n[:2] for n in notebooks}, "one per notebook 01-14"


def test_every_check_is_a_zero_argument_test_function():
    module = importlib.import_module("test_exercise_checks")
    for e in EXERCISES:
        assert e.tests, e.id
        for node in e.tests:
            path, name = node.split("::")
            assert path == "tests/test_exercise_checks.py"
            fn = getattr(module, name)
            assert fn.__code__.co_argcount == 0, node


def test_every_exercise_has_its_section_and_check_cell_in_its_notebook():
    for e in EXERCISES:
        nb = nbformat.read(ROOT / e.notebook_path, as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert f"### {e.heading} · " in text, f"{e.notebook_path} lacks the section {e.heading}"
        meta = {c.metadata.get("nbgrader", {}).get("grade_id"): c.metadata["nbgrader"]
                for c in nb.cells if "nbgrader" in c.metadata}
        prefix = "ex" + e.id.replace(".", "_")
        assert meta[f"{prefix}_check"]["grade"] and meta[f"{prefix}_check"]["locked"]
        if e.in_notebook:
            assert meta[f"{prefix}_solution"]["solution"]
        assert len(notebook_exercise_cells(ROOT, e)) >= 2 or not e.in_notebook


# ---------------------------------------------------------------------------
# The transformation, on small texts
# ---------------------------------------------------------------------------

def test_stub_replaces_a_region_and_names_the_exercise():
    text = (ROOT / "minblip/layers.py").read_text()
    new, removed = transform_text(text, "minblip/layers.py", {"1.2"})
    assert BEGIN not in new and END not in new and removed
    stub = [line for line in new.split("\n") if "raise NotImplementedError" in line]
    assert len(stub) == 1 and stub[0].startswith(" " * 8 + "raise NotImplementedError('Exercise 1.2")
    assert "notebooks/01_backprop_and_gradcheck.ipynb" in stub[0]
    ast.parse(new)
    kept, removed = transform_text(text, "minblip/layers.py", set())  # not handed out
    assert BEGIN not in kept and not removed and "self.gamma.grad +=" in kept


@pytest.mark.parametrize("text,pattern", [
    (f"x = 1\n{BEGIN}\ny = 2\n{END}\n", "module level"),
    (f"def f():\n    {BEGIN}\n    return 1\n", "never closed"),
    (f"def f():\n    {BEGIN}\n    {BEGIN_HIDDEN}\n    {END_HIDDEN}\n    {END}\n", "cannot nest"),
    (f"def f():\n    {END}\n", "without a matching BEGIN"),
    (f"def f():\n    {BEGIN}\n    return 1\n    {END}\n", "no exercise"),
])
def test_bad_regions_are_refused(text, pattern):
    with pytest.raises(ExerciseError, match=pattern):
        transform_text(text, "minblip/somewhere.py", {"1.1"})


def test_hidden_tests_are_removed_and_the_rest_kept():
    text = f"def test_a():\n    pass\n\n\n{BEGIN_HIDDEN}\ndef test_b():\n    pass\n{END_HIDDEN}\n"
    new, _ = transform_text(text, "tests/test_x.py", set())
    assert "test_a" in new and "test_b" not in new and BEGIN_HIDDEN not in new


# ---------------------------------------------------------------------------
# The student version
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("exercises") / "student"
    summary = generate(ROOT, out)
    assert summary["exercises"] == [e.id for e in EXERCISES]
    assert sorted(summary["left_out"]) == sorted(p for p in INSTRUCTOR_ONLY if (ROOT / p).exists())
    CHANGED[:] = summary["changed"]
    return out


def test_generate_refuses_a_folder_that_is_not_empty(student):
    with pytest.raises(ExerciseError, match="not empty"):
        generate(ROOT, student)


def test_student_version_imports_and_keeps_everything_else(student):
    code = ("import importlib, pkgutil, minblip; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(minblip.__path__, "
            "'minblip.')]; print(minblip.__file__)")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], cwd=student, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(student)}, check=True)
    assert out.stdout.strip() == str(student / "minblip" / "__init__.py")
    for path in project_files(ROOT):
        rel = path.relative_to(ROOT).as_posix()
        if rel in INSTRUCTOR_ONLY:
            assert not (student / rel).exists()
        elif path.suffix not in (".py", ".ipynb"):
            assert (student / rel).read_bytes() == path.read_bytes(), rel


def test_student_version_shows_no_solution_and_no_hidden_test(student):
    leaks = solution_lines(ROOT, {e.id for e in EXERCISES})
    assert len(leaks) > 30
    markers = (BEGIN, END, BEGIN_HIDDEN, END_HIDDEN)
    for path in project_files(student):
        if path.suffix not in (".py", ".ipynb", ".md"):
            continue
        text = path.read_text()
        rel = path.relative_to(student).as_posix()
        if path.suffix != ".md":  # the guide shows the markers in its examples
            assert not any(line.strip() in markers for line in text.split("\n")), rel
        if path.suffix == ".ipynb":  # the JSON escapes quotes: compare decoded text
            nb = json.loads(text)
            text = "\n".join("".join(c["source"]) + json.dumps(c.get("outputs", []))
                             for c in nb["cells"])
            text += "\n".join("".join(o.get("text", "")) for c in nb["cells"]
                              for o in c.get("outputs", []))
        leaked = [line for line in leaks if line in text]
        assert not leaked, f"{rel} shows solution lines: {leaked[:3]}"
    for e in EXERCISES:
        for node in e.tests:
            hidden = node not in existing_tests(student, e)
            assert hidden == (node in _hidden_nodes()), node


def _hidden_nodes():
    text = (ROOT / "tests/test_exercise_checks.py").read_text()
    visible = strip_hidden(text)
    return {f"tests/test_exercise_checks.py::{n}" for n in
            {node.name for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)}
            - {node.name for node in ast.parse(visible).body if isinstance(node, ast.FunctionDef)}}


def test_student_notebooks_stay_paired_with_their_sources(student):
    for ipynb in sorted((student / "notebooks").glob("*.ipynb")):
        if not ipynb.with_suffix(".py").exists():
            continue
        nb = nbformat.read(ipynb, as_version=4)
        py = jupytext.read(ipynb.with_suffix(".py"))
        assert ([(c.cell_type, c.source.strip()) for c in nb.cells]
                == [(c.cell_type, c.source.strip()) for c in py.cells]), ipynb.name


def test_unfinished_exercises_fail_with_not_implemented_and_the_rest_passes(student):
    visible = [n for e in EXERCISES for n in existing_tests(student, e)]
    assert len(visible) >= len(EXERCISES)
    results = run_pytest(student, visible, OTHER_TEST_FILES)
    for e in EXERCISES:
        for node in existing_tests(student, e):
            outcome, message = results[node]
            # a check may stop at an earlier exercise it builds on (6.1's model needs 8.1)
            assert outcome == "failed" and "NotImplementedError" in message, (node, outcome)
            assert "Exercise " in message, node
    others = {n: r for n, r in results.items() if n not in visible}
    assert sum(outcome == "passed" for outcome, _ in others.values()) >= 50
    for node, (outcome, message) in others.items():
        assert outcome == "passed" or ("NotImplementedError" in message
                                       and "Exercise 1." in message), (node, message[:300])


def test_putting_the_solutions_back_passes_every_check(student, tmp_path):
    restored = tmp_path / "restored"
    shutil.copytree(student, restored)
    changed = restore(restored, ROOT)
    assert changed
    for rel in CHANGED:  # files other than these are copied unchanged (tested above)
        path = ROOT / rel
        if path.suffix == ".py":
            assert (restored / rel).read_text() == strip_hidden(path.read_text()), rel
        elif path.suffix == ".ipynb":
            cells = json.loads((restored / rel).read_text())["cells"]
            original = json.loads(path.read_text())["cells"]
            assert ["".join(c["source"]) for c in cells] == [strip_hidden("".join(c["source"]))
                                                             for c in original], rel
    rows = grade(restored, ROOT)  # the instructor's tests, hidden ones included
    assert [(r["id"], r["passed"]) for r in rows] == [(r["id"], r["total"]) for r in rows]


def test_grading_the_untouched_student_version_gives_nothing(student):
    rows = grade(student, ROOT, [BY_ID["1.2"], BY_ID["2.2"], BY_ID["6.1"]])
    assert [r["passed"] for r in rows] == [0, 0, 0]


def _execute_until_first_error(notebook, root):
    nb = nbformat.read(notebook, as_version=4)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(root)  # the kernel imports the student's minblip
    try:
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(notebook.parent)}})
        with pytest.raises(CellExecutionError) as info:
            client.execute()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    failed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    return info.value, nb, failed[0]


def test_student_notebook_runs_until_its_first_unfinished_exercise(student):
    err, nb, index = _execute_until_first_error(
        student / "notebooks/01_backprop_and_gradcheck.ipynb", student)
    assert err.ename == "NotImplementedError" and "Exercise 1.1" in err.evalue
    assert sum(c.cell_type == "code" and bool(c.get("outputs")) for c in nb.cells[:index]) >= 4


def test_notebook_exercise_alone_runs_the_whole_notebook_up_to_its_check(tmp_path):
    out = tmp_path / "only_2_2"
    generate(ROOT, out, ["2.2"])
    err, nb, index = _execute_until_first_error(out / "notebooks/02_attention.ipynb", out)
    assert err.ename == "NotImplementedError" and "Exercise 2.2" in err.evalue
    assert nb.cells[index].metadata["nbgrader"]["grade_id"] == "ex2_2_check"


# ---------------------------------------------------------------------------
# Wrong answers are caught; the solution put in the same way passes
# ---------------------------------------------------------------------------

def _swap_region(text, rel, qualname, body):
    [region] = [r for r in locate(text, rel) if r.kind == "solution" and r.qualname == qualname]
    lines = text.split("\n")
    new = [region.indent + line if line.strip() else line
           for line in textwrap.dedent(body).strip("\n").split("\n")]
    return "\n".join(lines[:region.begin] + new + lines[region.end + 1:])


def _solution_body(region_key):
    rel, qualname = region_key.split("::")
    source = (ROOT / rel).read_text() if not rel.endswith(".ipynb") else (
        ROOT / rel).with_suffix(".py").read_text()
    [region] = [r for r in locate(source, rel) if r.kind == "solution" and r.qualname == qualname]
    return "\n".join(source.split("\n")[region.begin + 1:region.end])


def _run_package_checks(exercise, region_key, body):
    """Rebuild the function around ``body`` in its module's namespace, put it in
    place of the original everywhere it is referenced, run every check, restore."""
    rel, qualname = region_key.split("::")
    module = importlib.import_module(rel[:-3].replace("/", "."))
    text = _swap_region((ROOT / rel).read_text(), rel, qualname, body)
    names = qualname.split(".")
    node = dict(_functions(ast.parse(text)))[qualname]
    source = textwrap.dedent("\n".join(text.split("\n")[node.lineno - 1:node.end_lineno]))
    namespace = dict(vars(module))
    exec(compile(source, f"{rel} ({qualname}, replaced)", "exec"), namespace)
    new = namespace[names[-1]]
    # imported before the search below, so that its own references get patched too
    checks = importlib.import_module("test_exercise_checks")
    patches = []
    if len(names) == 2:
        owner = getattr(module, names[0])
        patches.append((owner, names[1], owner.__dict__[names[1]]))
    else:
        original = getattr(module, names[0])
        patches += [(m, names[0], original) for m in list(sys.modules.values())
                    if getattr(m, names[0], None) is original]
    failures = []
    try:
        for owner, name, _ in patches:
            setattr(owner, name, new)
        for node_id in exercise.tests:
            try:
                getattr(checks, node_id.split("::")[1])()
            except Exception as err:  # noqa: BLE001 - any failure of a check counts
                failures.append((node_id, err))
    finally:
        for owner, name, original in patches:
            setattr(owner, name, original)
    return failures


def _run_notebook_checks(exercise, region_key, body):
    cells = notebook_exercise_cells(ROOT, exercise)
    qualname = region_key.split("::")[1]
    cells = [_swap_region(c, exercise.notebook_path, qualname, body) if BEGIN in c else c
             for c in cells]
    namespace = {"__name__": "wrong_answer"}
    try:
        for source in cells:
            exec(compile(source, exercise.notebook_path, "exec"), namespace)
    except Exception as err:  # noqa: BLE001
        return [(exercise.notebook_path, err)]
    return []


def _run_checks(exercise_id, region_key, body):
    exercise = BY_ID[exercise_id]
    if region_key.startswith("notebooks/"):
        return _run_notebook_checks(exercise, region_key, body)
    return _run_package_checks(exercise, region_key, body)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a wrong answer may overflow
@pytest.mark.parametrize("exercise_id,region_key,what,body", WRONG_ANSWERS,
                         ids=[f"{w[0]}-{w[2][:40]}" for w in WRONG_ANSWERS])
def test_wrong_answer_is_caught(exercise_id, region_key, what, body):
    assert region_key in BY_ID[exercise_id].regions
    failures = _run_checks(exercise_id, region_key, body)
    assert failures, f"exercise {exercise_id}: the wrong answer '{what}' passes every check"
    assert not any(isinstance(err, NotImplementedError) for _, err in failures)


@pytest.mark.parametrize("region_key", sorted(by_region()))
def test_the_solution_put_in_the_same_way_passes(region_key):
    exercise = by_region()[region_key]
    assert _run_checks(exercise.id, region_key, _solution_body(region_key)) == []


def test_every_exercise_has_a_wrong_answer():
    assert {w[0] for w in WRONG_ANSWERS} == {e.id for e in EXERCISES}
    assert {w[1] for w in WRONG_ANSWERS} == set(by_region())
    assert STUB == "# YOUR CODE HERE"
