"""The exercise machinery: the registry, the student version, the feedback of
``check``, grading (each exercise alone, a whole class at once), the student
notebooks, and the wrong answers and shortcuts the checks must catch.
Instructor-only (left out of the student version).

The student version is generated once per module into a temporary folder, and
the solutions are put back into a copy of it once; submissions are small edits
of that copy. Workers and notebooks run in subprocesses with tiny exercises and
time limits, so the whole module stays around a minute.
"""
import ast
import csv
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from exercise_wrong_answers import SHORTCUTS, WRONG_ANSWERS
from minblip.exercises import BY_ID, EXERCISES, INSTRUCTOR_ONLY, by_region
from minblip.exercises.answers import find_function, resolve
from minblip.exercises.grading import check_project, grade_submission
from minblip.exercises.notebook import check_package, names_assigned
from minblip.exercises.runner import (BLOCKED, ERROR, FAILED, NOT_STARTED, PASSED, SHORTCUT,
                                      notebook_exercise_cells, run_exercise)
from minblip.exercises.student import (BEGIN, BEGIN_HIDDEN, END, END_HIDDEN, LEAK_MIN_CHARS, STUB,
                                       ExerciseError, definition_lines, find_regions, generate,
                                       locate, project_files, restore, solution_lines,
                                       transform_text)

ROOT = Path(__file__).resolve().parents[1]
# exercise-free test files that must pass untouched in the student version, besides the
# exercise checks; test_layers.py also holds tests that depend on exercises 1.1 to 1.3
CHANGED = []  # the files the student version changed, filled by the fixture
OTHER_TEST_FILES = ["tests/test_layers.py", "tests/test_gradcheck_selftest.py",
                    "tests/test_tokenizer.py"]
PYTHON = sys.executable


def existing_tests(root, exercise):
    """The exercise's node ids whose test function exists under ``root`` (a
    student version has no hidden tests)."""
    text = (Path(root) / "tests/test_exercise_checks.py").read_text()
    return [n for n in exercise.tests if re.search(rf"^def {n.split('::')[1]}\(", text, re.M)]


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


def _run_pytest(root, args):
    """pytest on ``args`` in ``root``, its minblip first: {node id: (outcome, text)}."""
    report = Path(root) / ".report.xml"
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *args], cwd=root, env=env, capture_output=True,
                   timeout=600, check=False)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name")
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome, text = tag, (child.get("message") or "") + (child.text or "")
                break
        results[node] = (outcome, text)
    report.unlink()
    return results


def test_unfinished_exercises_are_reported_as_not_started_and_the_rest_passes(student):
    outcomes = check_project(student, EXERCISES, limit=120)
    for outcome in outcomes:
        assert outcome.points == 0, outcome.id
        for check in outcome.checks:
            # a check may stop at an earlier exercise it builds on (6.1's model needs 8.1)
            assert check.status in (NOT_STARTED, BLOCKED), (outcome.id, check)
            assert "Exercise " in check.message, (outcome.id, check.name)
    assert {o.id for o in outcomes if o.status == NOT_STARTED} >= {"1.1", "1.2", "5.2", "14.2"}
    results = _run_pytest(student, OTHER_TEST_FILES)
    assert sum(outcome == "passed" for outcome, _ in results.values()) >= 50
    for node, (outcome, text) in results.items():
        stopped = "NotImplementedError" in text and re.search(r"Exercise 1\.[123] ", text)
        assert outcome == "passed" or stopped, (node, text[:300])


# ---------------------------------------------------------------------------
# The solutions put back; submissions
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def solved(student, tmp_path_factory):
    """The student version with every solution put back: a perfect submission."""
    out = tmp_path_factory.mktemp("solved") / "project"
    shutil.copytree(student, out)
    assert restore(out, ROOT)
    return out


def _submission(solved, folder, edits=()):
    """A copy of the solved project with ``edits``: (exercise id, region key, new body)
    to put in place of a solution region, or (path, None, text) to write a file."""
    shutil.copytree(solved, folder)
    for _, key, body in edits:
        if key is None:
            (folder / _).write_text(body)
            continue
        rel, qualname = key.split("::")
        if rel.startswith("notebooks/"):
            _edit_notebook_cell(folder / rel, qualname, body)
        else:
            path = folder / rel
            path.write_text(_swap_region(path.read_text(), rel, qualname, body))
    return folder


def _edit_notebook_cell(path, qualname, body):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        text = "".join(cell["source"])
        if f"def {qualname}(" in text and BEGIN in text:
            cell["source"] = _swap_region(text, str(path), qualname, body)
    path.write_text(json.dumps(nb, indent=1))


def _wrong_answer(exercise_id, what):
    """(exercise id, region, body) of a wrong answer of exercise_wrong_answers.py."""
    [(_, region, _, body)] = [w for w in WRONG_ANSWERS if w[0] == exercise_id and w[2] == what]
    return exercise_id, region, body


BROKEN_CE = _wrong_answer("1.1", "forgets the upstream gradient dloss")


def test_putting_the_solutions_back_restores_the_source(solved):
    for rel in CHANGED:  # files other than these are copied unchanged (tested above)
        path = ROOT / rel
        if path.suffix == ".py":
            assert (solved / rel).read_text() == strip_hidden(path.read_text()), rel
        elif path.suffix == ".ipynb":
            cells = json.loads((solved / rel).read_text())["cells"]
            original = json.loads(path.read_text())["cells"]
            assert ["".join(c["source"]) for c in cells] == [strip_hidden("".join(c["source"]))
                                                             for c in original], rel


def test_each_exercise_is_graded_alone(solved, tmp_path):
    """Only CrossEntropyLoss.backward broken: without isolation 5.1 and 10.1 fail too
    (their checks run it); graded, only 1.1 loses marks, and every other exercise,
    hidden checks included, gets full marks from the solutions put back."""
    broken = _submission(solved, tmp_path / "broken", [BROKEN_CE])
    cascade = {o.id: o for o in check_project(broken, [BY_ID["5.1"], BY_ID["10.1"]])}
    assert cascade["5.1"].points < cascade["5.1"].max_points
    assert cascade["10.1"].points < cascade["10.1"].max_points
    outcomes = grade_submission(broken, ROOT, EXERCISES)
    lost = {o.id: (o.points, o.max_points) for o in outcomes if o.points < o.max_points}
    assert list(lost) == ["1.1"], lost
    assert all(o.max_points == len(o.checks) == len(BY_ID[o.id].tests) for o in outcomes)


def test_grading_the_untouched_student_version_gives_nothing(student):
    outcomes = grade_submission(student, ROOT, [BY_ID["1.2"], BY_ID["2.2"], BY_ID["6.1"]])
    assert [o.points for o in outcomes] == [0, 0, 0]
    assert [o.status for o in outcomes] == [NOT_STARTED] * 3  # 6.1 alone: 8.1 is the reference


# ---------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------

PADDING_VISIBLE = _wrong_answer("9.1", "forgets the padding columns")
ASSIGN_NOT_ADD = _wrong_answer("1.2", "= instead of += into gamma.grad and beta.grad")


def _outcome(solved, tmp_path, edit):
    folder = _submission(solved, tmp_path / "sub", [edit])
    checks = importlib.import_module("test_exercise_checks")
    return run_exercise(BY_ID[edit[0]], checks, ROOT, submission=folder), folder


def test_feedback_names_the_entry_the_expected_and_the_received(solved, tmp_path):
    outcome, _ = _outcome(solved, tmp_path, PADDING_VISIBLE)
    first = outcome.checks[0]
    assert first.status == FAILED and first.error == "AssertionError"
    for part in ("mode 'itc', caption 0", "Mismatch", "ACTUAL", "DESIRED", "[2, 5]: True"):
        assert part in first.message, part
    assert any(w.startswith("the check: tests/test_exercise_checks.py, line ") for w in first.where)
    assert "entries that differ" in first.hint


def test_feedback_shows_the_gradient_check_table_and_reads_it(solved, tmp_path):
    outcome, _ = _outcome(solved, tmp_path, ASSIGN_NOT_ADD)
    twice = next(c for c in outcome.checks if c.name == "test_ex_1_2_layernorm_used_twice")
    assert twice.status == FAILED and twice.error == "GradcheckError"
    assert re.search(r"^gamma\s+\(6,\)\s+6\s+\S+\s+\S+\s+FAIL$", twice.message, re.M)
    assert "tolerance: |analytic - numeric|" in twice.message
    # the hint reads the failing rows and says what a Param's row checks
    assert "the gradient of gamma: yours is" in twice.hint and "with +=" in twice.hint


def test_feedback_for_a_syntax_error_gives_file_line_and_message(solved, tmp_path):
    # in the exercise's own function: that exercise, with the place
    bad = ("1.2", "minblip/layers.py::LayerNorm.backward", "xhat, rstd = cache(\nreturn xhat")
    outcome, _ = _outcome(solved, tmp_path, bad)
    assert outcome.status == ERROR and outcome.points == 0
    message = outcome.checks[0].message
    assert re.match(r"minblip/layers\.py, line \d+: '\(' was never closed\n"
                    r"    xhat, rstd = cache\(", message), message
    # elsewhere in the same file: the exercise is still graded from its own function
    folder = tmp_path / "elsewhere"
    shutil.copytree(solved, folder)
    layers = folder / "minblip/layers.py"
    layers.write_text(layers.read_text().replace("class ReLU(Module):", "class ReLU(Module:"))
    checks = importlib.import_module("test_exercise_checks")
    assert run_exercise(BY_ID["1.2"], checks, ROOT, submission=folder).status == PASSED
    # and checking one's own project that does not import says so once, with the place
    result = subprocess.run([PYTHON, "-m", "minblip.exercises", "check", "1.1,1.2"], cwd=folder,
                            env={**os.environ, "PYTHONPATH": str(folder)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "No check could run: the project does not import." in result.stdout
    assert re.search(r"minblip/layers\.py, line \d+: ", result.stdout), result.stdout


def test_check_prints_the_whole_message_and_the_graded_file(solved, tmp_path):
    folder = _submission(solved, tmp_path / "sub", [PADDING_VISIBLE])
    result = subprocess.run([PYTHON, "-m", "minblip.exercises", "check", "9.1,5.2"],
                            cwd=folder, env={**os.environ, "PYTHONPATH": str(folder)},
                            capture_output=True, text=True, timeout=300)
    out = " ".join(result.stdout.split())  # the report is wrapped to the terminal's width
    assert result.returncode == 1, result.stdout
    assert "Exercise 9.1 · the Q-Former's three masks: 0/2 checks passed (failed)" in out
    assert "graded: minblip/qformer.py, qformer_mask" in out
    assert "mode 'itc', caption 0" in out and "[2, 5]: True (ACTUAL), False (DESIRED)" in out
    assert "what to look at:" in out
    assert ("graded: notebooks/05_itc.ipynb, the cell that defines l2_normalize_backward (the "
            ".ipynb; its jupytext twin notebooks/05_itc.py is not read)") in out
    assert "Exercise 5.2 · L2 normalisation backward: 1/1 checks passed" in out


def test_an_answer_only_in_the_jupytext_twin_is_pointed_out(student, tmp_path):
    folder = tmp_path / "twin"
    shutil.copytree(student, folder)
    twin = folder / "notebooks/05_itc.py"
    solution = _solution_body("notebooks/05_itc.ipynb::l2_normalize_backward")
    stub = next(line for line in twin.read_text().split("\n")
                if "raise NotImplementedError('Exercise 5.2 " in line)
    text = twin.read_text().replace("    " + STUB + "\n" + stub, solution)
    twin.write_text(text)
    [outcome] = check_project(folder, [BY_ID["5.2"]])
    assert outcome.status == NOT_STARTED
    assert "notebooks/05_itc.py (the jupytext twin)" in outcome.note
    assert "jupytext --sync notebooks/05_itc.py" in outcome.note
    assert "05_itc.ipynb (an edit to its jupytext twin" in outcome.checks[0].message


# ---------------------------------------------------------------------------
# No leaks, no shortcuts
# ---------------------------------------------------------------------------

def _spans_outside_regions(text, rel):
    lines = text.split("\n")
    covered = set()
    for r in locate(text, rel):
        covered.update(range(r.begin, r.end + 1))
    return {i: line.strip() for i, line in enumerate(lines) if i not in covered}


def _answer_lines():
    """{exercise id: the distinctive lines of its solution regions}."""
    lines = {}
    for path in project_files(ROOT):
        rel = path.relative_to(ROOT).as_posix()
        if path.suffix == ".py":
            texts = [path.read_text()]
        elif path.suffix == ".ipynb":
            texts = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]
        else:
            continue
        for text in texts:
            for r in locate(text, rel):
                if r.kind == "solution":
                    key = rel.replace(".py", ".ipynb") if rel.startswith("notebooks/") else rel
                    lines.setdefault(by_region()[f"{key}::{r.qualname}"].id, set()).update(
                        line.strip() for line in text.split("\n")[r.begin + 1:r.end]
                        if len(line.strip()) >= LEAK_MIN_CHARS and not line.strip().startswith("#"))
    return lines


def test_no_package_function_holds_an_answer_outside_its_region():
    """A distinctive line of a solution may appear in the package only inside its
    region, or inside a function (or its class) that the exercise lists as the one it
    re-implements: a helper like the old lm._layernorm_dx (exercise 1.2's formula,
    unstubbed) fails this."""
    outside = [(p.relative_to(ROOT).as_posix(), i, line)
               for p in project_files(ROOT / "minblip") if p.suffix == ".py"
               for i, line in _spans_outside_regions(p.read_text(),
                                                     p.relative_to(ROOT).as_posix()).items()]
    answers = _answer_lines()
    assert set(answers) == set(BY_ID)
    for e in EXERCISES:
        allowed = set()
        for dotted in e.reimplements:
            rel, first, last = definition_lines(ROOT, dotted, whole_class=True)
            allowed |= {(rel, i) for i in range(first - 1, last)}
        for rel, i, line in outside:
            assert line not in answers[e.id] or (rel, i) in allowed, (
                f"{rel}:{i + 1} holds a line of exercise {e.id}'s answer outside its "
                f"solution region: {line!r}")


# (notebook, code that prints a package function's source, the exercise it answers)
PRINTED_ANSWERS = [
    ("05_itc", "inspect.getsource(L2Normalize.backward)", "minblip.softmax.L2Normalize.backward"),
    ("04_text_transformer", "inspect.getsource(LMHead.backward)", "minblip.text.LMHead.backward"),
    ("09_qformer_masks", "source_from(QFormer.backward", "minblip.qformer.QFormer.backward"),
]


def test_the_leaks_found_in_review_stay_closed(student):
    # outputs that print the package's version of a notebook exercise are cleared
    for stem, code, dotted in PRINTED_ANSWERS:
        assert any(dotted in e.reimplements for e in EXERCISES), dotted
        for root, kept in ((ROOT, True), (student, False)):
            cells = [c for c in json.loads((root / f"notebooks/{stem}.ipynb").read_text())["cells"]
                     if code in "".join(c["source"])]
            assert len(cells) == 1, (stem, code)
            assert bool(cells[0]["outputs"]) == kept, (root, stem, code)
    # the package helpers that were answers are the exercises now: stubbed
    for rel, qualname, exercise_id in (("minblip/softmax.py", "Softmax.backward", "1.3"),
                                       ("minblip/vit.py", "unpatchify", "3.2")):
        fn = find_function((student / rel).read_text(), qualname, rel)
        body = "\n".join(fn.lines)
        assert f"raise NotImplementedError('Exercise {exercise_id} " in body, (rel, qualname)
    assert not hasattr(importlib.import_module("minblip.lm"), "_layernorm_dx")


def test_reimplemented_functions_exist_and_the_checks_may_still_call_them():
    for e in EXERCISES:
        for dotted in e.reimplements:
            assert callable(resolve(dotted)[2]), dotted


@pytest.mark.parametrize("exercise_id,region_key,what,body", SHORTCUTS,
                         ids=[f"{s[0]}-{s[2][:40]}" for s in SHORTCUTS])
def test_calling_the_package_instead_is_caught(exercise_id, region_key, what, body, tmp_path):
    outcome = _graded(exercise_id, region_key, body, tmp_path)
    assert outcome.status == SHORTCUT, (what, outcome.checks)
    assert "is not available" in outcome.checks[0].message


# ---------------------------------------------------------------------------
# Grading a class
# ---------------------------------------------------------------------------

LOOP_FOREVER = ("1.1", "minblip/softmax.py::CrossEntropyLoss.backward", """
while True:
    pass
""")
LOOP_STUBBORNLY = ("1.1", "minblip/softmax.py::CrossEntropyLoss.backward", """
import time
while True:
    try:
        time.sleep(0.1)
    except BaseException:  # swallows the grader's alarm: the grader must stop the process
        pass
""")
CRASH = ("1.1", "minblip/softmax.py::CrossEntropyLoss.backward", """
import os
os._exit(3)
""")
SYNTAX = ("5.2", "notebooks/05_itc.ipynb::l2_normalize_backward", "return (dy - x\n")


def test_grading_a_class_never_stops_on_a_bad_submission(solved, tmp_path):
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for name, edits in (("ada", []), ("crash", [CRASH]), ("loop", [LOOP_FOREVER]),
                        ("stubborn", [LOOP_STUBBORNLY]), ("syntax", [SYNTAX])):
        _submission(solved, submissions / name, edits)
    (submissions / "empty").mkdir()
    table = tmp_path / "grades.csv"
    result = subprocess.run(
        [PYTHON, "-m", "minblip.exercises", "--source", str(ROOT), "grade", str(submissions),
         "--only", "1.1,5.2", "--timeout", "2", "--jobs", "2", "--csv", str(table)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not a sandbox" in result.stdout
    rows = {(r["student"], r["exercise"]): r for r in csv.DictReader(table.open())}
    assert len(rows) == 12

    def row(student, exercise):
        r = rows[(student, exercise)]
        return r["status"], int(r["points"]), int(r["max_points"])

    assert row("ada", "1.1") == (PASSED, 3, 3) and row("ada", "5.2") == (PASSED, 1, 1)
    assert row("crash", "1.1") == ("crashed", 0, 3) and row("crash", "5.2")[0] == PASSED
    assert "exit code 3" in rows[("crash", "1.1")]["message"]
    assert row("loop", "1.1") == ("timeout", 0, 3) and row("loop", "5.2")[0] == PASSED
    assert row("stubborn", "1.1") == ("timeout", 0, 3) and row("stubborn", "5.2")[0] == PASSED
    assert "process was stopped" in rows[("stubborn", "1.1")]["message"]
    assert row("syntax", "1.1")[0] == PASSED and row("syntax", "5.2") == (ERROR, 0, 1)
    assert re.search(r"notebooks/05_itc\.ipynb \[ex5_2_solution\], line \d+",
                     rows[("syntax", "5.2")]["message"])
    assert row("empty", "1.1") == (ERROR, 0, 3)
    assert "minblip/softmax.py is not in the submission" in rows[("empty", "1.1")]["message"]


# ---------------------------------------------------------------------------
# The student notebooks run from top to bottom
# ---------------------------------------------------------------------------

def test_every_notebook_starts_with_the_locked_setup_cell():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        meta = first.metadata.get("nbgrader", {})
        assert meta.get("grade_id") == "setup" and meta.get("locked"), path.name
        assert not meta.get("solution") and not meta.get("grade"), path.name
        src = first.source
        # the project's folders first on the path, then the check, then everything else
        order = [src.index("sys.path[:0] = [str(Path.cwd()), str(Path.cwd().parent)]"),
                 src.index("\nsetup_exercises()"), src.index("\nimport numpy as np")]
        assert order == sorted(order), path.name


def test_the_setup_refuses_another_projects_package(tmp_path):
    """A notebook outside the project whose minblip is imported (an nbgrader submission
    without its package, graded where the instructor's package is installed) stops in
    its first cell, and no later cell can import minblip: its checks cannot pass."""
    assert check_package(ROOT / "notebooks") == ROOT
    with pytest.raises(RuntimeError, match="must use the minblip of its own project"):
        check_package(tmp_path)
    script = ("from minblip.exercises.notebook import setup_exercises\n"
              "try:\n    setup_exercises()\nexcept RuntimeError as err:\n    print('refused')\n"
              "from minblip.layers import LayerNorm\n")
    result = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.stdout.strip() == "refused"
    assert "ImportError: minblip cannot be imported here: this notebook imported minblip from" in (
        result.stderr)


def test_names_a_stopped_cell_did_not_make():
    cell = ("a = 1\nb, c = f(a)\nfor i in range(3):\n    d = i\n\n"
            "def g():\n    e = 1\nimport x.y as z")
    assert names_assigned(cell) == {"a", "b", "c", "i", "d", "g", "z"}
    assert names_assigned(cell, from_line=2) == {"b", "c", "i", "d", "g", "z"}
    assert names_assigned(cell, from_line=6) == {"g", "z"}


def test_a_fresh_student_notebook_runs_to_the_end(student):
    """Run All on notebook 01 with every exercise a stub: no cell fails, the figure is
    drawn, and each cell that needs an exercise says which one, on stderr."""
    path = student / "notebooks/01_backprop_and_gradcheck.ipynb"
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)  # the setup cell must still pick the student's package
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_before
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    notes = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    for exercise_id in ("1.1", "1.2", "1.3"):
        assert f"it needs exercise {exercise_id} (" in notes
    assert "Traceback" not in notes
    checks = {c.metadata["nbgrader"]["grade_id"]: c for c in code
              if c.metadata.get("nbgrader", {}).get("grade")}
    for grade_id, cell in checks.items():  # nbgrader gives a check cell with stderr no points
        assert any(o.output_type == "stream" and o.name == "stderr" for o in cell.outputs), grade_id


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
    return "\n".join(source.split("\n")[region.begin:region.end + 1])


def _graded(exercise_id, region_key, body, tmp_path):
    """Grade, in this process, a submission whose only answer is ``body`` in place of
    the region: the same grafting, shortcut ban and checks as the grader."""
    rel, qualname = region_key.split("::")
    folder = tmp_path / "submission"
    for other in {r.split("::")[0] for r in BY_ID[exercise_id].regions}:  # its other regions
        (folder / other).parent.mkdir(parents=True, exist_ok=True)  # keep their solution
        shutil.copy(ROOT / other, folder / other)
    path = folder / rel
    if rel.startswith("notebooks/"):
        _edit_notebook_cell(path, qualname, body)
    else:
        path.write_text(_swap_region(path.read_text(), rel, qualname, body))
    checks = importlib.import_module("test_exercise_checks")
    return run_exercise(BY_ID[exercise_id], checks, ROOT, submission=folder)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a wrong answer may overflow
@pytest.mark.parametrize("exercise_id,region_key,what,body", WRONG_ANSWERS,
                         ids=[f"{w[0]}-{w[2][:40]}" for w in WRONG_ANSWERS])
def test_wrong_answer_is_caught(exercise_id, region_key, what, body, tmp_path):
    assert region_key in BY_ID[exercise_id].regions
    outcome = _graded(exercise_id, region_key, body, tmp_path)
    assert outcome.points < outcome.max_points, (
        f"exercise {exercise_id}: the wrong answer '{what}' passes every check")
    assert outcome.status not in (NOT_STARTED, BLOCKED), outcome.checks
    assert not any(c.error == "AnswerProblem" for c in outcome.checks), outcome.checks


@pytest.mark.parametrize("region_key", sorted(by_region()))
def test_the_solution_put_in_the_same_way_passes(region_key, tmp_path):
    exercise = by_region()[region_key]
    outcome = _graded(exercise.id, region_key, _solution_body(region_key), tmp_path)
    assert outcome.status == PASSED, outcome.checks


def test_an_answer_that_exits_is_an_error_not_the_end_of_grading(tmp_path):
    outcome = _graded("1.1", "minblip/softmax.py::CrossEntropyLoss.backward",
                      "import sys\nsys.exit(2)", tmp_path)
    assert outcome.status == ERROR and outcome.points == 0
    assert "the code called exit (2)" in outcome.checks[0].message


def test_every_exercise_has_a_wrong_answer():
    assert {w[0] for w in WRONG_ANSWERS} == {e.id for e in EXERCISES}
    assert {w[1] for w in WRONG_ANSWERS} == set(by_region())
    assert STUB == "# YOUR CODE HERE"
