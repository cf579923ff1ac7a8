"""Run the checks of exercises in this process and say what went wrong.

One check is one zero-argument function of ``tests/test_exercise_checks.py``.
:func:`run_exercise` runs an exercise's checks under a time limit, with the
shortcuts of ``Exercise.reimplements`` banned, either on the project as it is
(a student checking their own work) or with the student's answer grafted into
the reference project (grading: :mod:`minblip.exercises.answers`). A notebook
exercise's check runs the cells of its notebook (:func:`run_notebook_exercise`),
its solution cell taken from the student's ``.ipynb``. Each check gives a
:class:`CheckOutcome`: a status, the whole message of the failure (the
assertion text with the entries that differ, the gradient-check table), where it
happened, and a hint at what to look at.

``python -m minblip.exercises.runner`` is the worker process the command line
starts (:mod:`minblip.exercises.grading`): it writes one JSON line when an
exercise starts and one with its outcome when it ends, so the parent can stop a
worker that hangs and go on with the next exercise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import linecache
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import BY_ID, CHECKS, Exercise
from .answers import (AnswerProblem, ShortcutError, Sites, ban_shortcuts, cell_filename, graft,
                      local_sites, notebook_sites, read_notebook, solution_ids, twin_differs)
from .student import _cell_text

# the statuses of a check, and of an exercise (that of its first check that did not pass)
PASSED, FAILED, NOT_STARTED, BLOCKED = "passed", "failed", "not started", "blocked"
SHORTCUT, TIMEOUT, ERROR, CRASHED = "shortcut", "timeout", "error", "crashed"
OUTPUT_LINES = 15  # the last lines a failed check printed, kept for the report


class ExerciseTimeout(BaseException):
    """The exercise ran past its time limit (a BaseException, so that a student's
    ``except Exception`` cannot swallow it)."""


@dataclass
class CheckOutcome:
    name: str
    status: str
    error: str = ""  # the exception's type
    message: str = ""  # the exception's whole message
    where: list = field(default_factory=list)  # "your code: file, line N: source" lines
    hint: str = ""  # what to look at
    output: str = ""  # the last lines the check printed, for a check that did not pass


@dataclass
class ExerciseOutcome:
    id: str
    title: str
    graded: list  # what was read as the student's answer, one line each
    checks: list  # CheckOutcome
    note: str = ""  # something to know that is not a failure (the jupytext twin differs)
    seconds: float = 0.0
    fatal: bool = False  # no check could run: the project's checks do not import

    @property
    def points(self) -> int:
        return sum(c.status == PASSED for c in self.checks)

    @property
    def max_points(self) -> int:
        return len(self.checks)

    @property
    def status(self) -> str:
        return next((c.status for c in self.checks if c.status != PASSED), PASSED)

    def first_failure(self):
        return next((c for c in self.checks if c.status != PASSED), None)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ExerciseOutcome":
        return cls(**{**d, "checks": [CheckOutcome(**c) for c in d["checks"]]})


def graded_files(exercise: Exercise) -> list[str]:
    """What the student's answer to ``exercise`` is read from, one line each."""
    out = []
    for region in exercise.regions:
        rel, qualname = region.split("::")
        if rel.startswith("notebooks/"):
            twin = rel.replace(".ipynb", ".py")
            out.append(f"{rel}, the cell that defines {qualname} (the .ipynb; its jupytext "
                       f"twin {twin} is not read)")
        else:
            out.append(f"{rel}, {qualname}")
    return out


# ---------------------------------------------------------------------------
# Notebook exercises
# ---------------------------------------------------------------------------

_ANSWERS: list = [None]  # the project whose notebooks hold the answers (None: the checked one)


@contextlib.contextmanager
def notebook_answers(submission):
    """While the block runs, notebook exercises take their solution cells from
    ``submission``'s notebooks (None: from the project being checked)."""
    previous, _ANSWERS[0] = _ANSWERS[0], submission
    try:
        yield
    finally:
        _ANSWERS[0] = previous


def notebook_exercise_cells(root: Path, exercise: Exercise, answers: Path | None = None):
    """The cells a notebook exercise is checked with, as (label, source): the
    notebook's first code cell ("setup", its imports) and every cell whose
    nbgrader grade_id starts with ``ex{N}_{k}_``, in notebook order. The solution
    cells come from ``answers``' copy of the notebook when given, the rest from
    ``root``'s."""
    nb = read_notebook(root, exercise)
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    prefix = "ex" + exercise.id.replace(".", "_") + "_"

    def gid(cell):
        return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")

    cells = [(gid(c), _cell_text(c)) for c in code if gid(c).startswith(prefix)]
    if not cells:
        raise ValueError(f"{exercise.notebook_path} has no cells with a grade_id starting "
                         f"with {prefix!r}")
    if answers is not None:
        theirs = {gid(c): _cell_text(c) for c in read_notebook(answers, exercise).get("cells", [])
                  if c.get("cell_type") == "code"}
        for label in solution_ids(exercise):
            if label not in theirs:
                raise AnswerProblem(
                    f"{exercise.notebook_path} of the submission has no code cell with the "
                    f"nbgrader grade_id {label!r}: the answer is read from that cell, so keep "
                    f"the cell (and its metadata) that held the stub")
        cells = [(label, theirs[label] if label in solution_ids(exercise) else source)
                 for label, source in cells]
    return [("setup", _cell_text(code[0]))] + cells


def run_notebook_exercise(root: Path, exercise: Exercise) -> dict:
    """Execute a notebook exercise's cells (:func:`notebook_exercise_cells`) in a
    fresh namespace, from the notebook's folder as Jupyter would; any failing
    check raises. Each cell is compiled under the name
    ``notebooks/NN_name.ipynb [grade_id]``, so tracebacks show its lines.
    Returns the namespace."""
    cells = notebook_exercise_cells(root, exercise, _ANSWERS[0])
    namespace = {"__name__": f"exercise_{exercise.id.replace('.', '_')}"}
    here = os.getcwd()
    os.chdir(Path(root) / "notebooks")
    try:
        for label, source in cells:
            filename = cell_filename(exercise, label)
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            exec(compile(source, filename, "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace


# ---------------------------------------------------------------------------
# Running one exercise
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def time_limit(seconds):
    """Raise ExerciseTimeout in the block after ``seconds`` (None: no limit).
    Uses SIGALRM, so only in the main thread of a POSIX process."""
    if (not seconds or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def on_alarm(signum, frame):
        raise ExerciseTimeout(f"the exercise ran for more than its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_checks(root: Path):
    """Import ``tests/test_exercise_checks.py`` of ``root`` as the module
    ``test_exercise_checks``."""
    root = Path(root)
    path = root / CHECKS
    if str(root / "tests") not in sys.path:
        sys.path.insert(0, str(root / "tests"))
    spec = importlib.util.spec_from_file_location("test_exercise_checks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_exercise_checks"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["test_exercise_checks"]
        raise
    return module


def run_exercise(exercise: Exercise, checks, root: Path, *, submission: Path | None = None,
                 limit: float | None = None, hidden_ok: bool = True) -> ExerciseOutcome:
    """Run every check of ``exercise`` that ``checks`` (the imported checks module
    of ``root``) defines.

    ``submission`` None: the project ``root`` is the student's, its code is the
    answer. Otherwise ``root`` is the reference project and the answer is read
    from ``submission`` and grafted in. A check missing from ``checks`` is
    skipped when ``hidden_ok`` (the student's copy has no hidden checks)."""
    start = time.perf_counter()
    names = [n.split("::")[1] for n in exercise.tests]
    names = [n for n in names if hasattr(checks, n) or not hidden_ok]
    outcome = ExerciseOutcome(exercise.id, exercise.title, graded_files(exercise), [],
                              twin_differs(submission or root, exercise))
    with contextlib.ExitStack() as stack:
        try:
            if submission is None:
                sites = local_sites(exercise, root)
            else:
                sites = stack.enter_context(graft(exercise, submission))
            stack.enter_context(notebook_answers(submission))
            sites = sites + notebook_sites(exercise)
            stack.enter_context(ban_shortcuts(exercise, sites))
        except AnswerProblem as problem:
            outcome.checks = [CheckOutcome(n, ERROR, "AnswerProblem", str(problem),
                                           hint=_answer_hint(exercise, str(problem)))
                              for n in names]
            outcome.seconds = time.perf_counter() - start
            return outcome
        try:
            with time_limit(limit):
                for name in names:
                    outcome.checks.append(_run_check(exercise, getattr(checks, name, None),
                                                     name, sites, root, submission))
        except ExerciseTimeout as err:
            done = {c.name for c in outcome.checks}
            for name in names:
                if name not in done:
                    outcome.checks.append(CheckOutcome(
                        name, TIMEOUT, "ExerciseTimeout", str(err),
                        hint="Look for a loop that never ends, or a Python loop over every "
                             "element where one NumPy operation on the whole array will do."))
    outcome.seconds = time.perf_counter() - start
    return outcome


def _run_check(exercise, fn, name, sites, root, submission) -> CheckOutcome:
    if fn is None:
        return CheckOutcome(name, ERROR, "MissingCheck",
                            f"{CHECKS} has no check named {name}",
                            hint="The instructor's copy of the checks does not match the registry.")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            fn()
    except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure of a check is reported
        outcome = describe_failure(exercise, err, sites, root, submission)
        outcome.name = name
        outcome.output = "\n".join(printed.getvalue().rstrip().split("\n")[-OUTPUT_LINES:])
        return outcome
    return CheckOutcome(name, PASSED)


# ---------------------------------------------------------------------------
# Saying what went wrong
# ---------------------------------------------------------------------------

_STUB_MESSAGE = re.compile(r"Exercise (\S+) \(")


def describe_failure(exercise: Exercise, err: BaseException, sites, root: Path,
                     submission: Path | None) -> CheckOutcome:
    """Classify an exception raised by a check and say where and what to look at."""
    kind = type(err).__name__
    if isinstance(err, SyntaxError):  # the message holds the place; the import chain is noise
        message, where = _syntax_text(err, root, submission), []
    else:
        message = str(err).strip("\n")
        where = _locations(err, sites, root, submission,
                           raised_in=not isinstance(err, (AssertionError, ShortcutError)))
    if isinstance(err, AnswerProblem):  # raised while a notebook answer was read
        return CheckOutcome("", ERROR, kind, message, [], _answer_hint(exercise, message))
    if isinstance(err, ShortcutError):
        return CheckOutcome("", SHORTCUT, kind, message, where,
                            "Write the computation yourself: the check compares your code with "
                            "the package, so calling the package proves nothing.")
    if isinstance(err, NotImplementedError):
        match = _STUB_MESSAGE.search(message)
        if match and match.group(1) == exercise.id:
            return CheckOutcome("", NOT_STARTED, kind, message, where,
                                f"Replace the `raise NotImplementedError` of exercise "
                                f"{exercise.id} with your code, in {exercise_place(exercise)}.")
        if match:
            return CheckOutcome("", BLOCKED, kind, message, where,
                                f"This check runs the code of exercise {match.group(1)}, which "
                                f"is not written yet: do exercise {match.group(1)} first.")
    if isinstance(err, AssertionError):
        return CheckOutcome("", FAILED, kind, message, where, _assertion_hint(err, where))
    if isinstance(err, SyntaxError):
        return CheckOutcome("", ERROR, kind, message, where,
                            "Python could not read this code: fix the line shown (an unclosed "
                            "bracket or quote often shows up on the line after).")
    if isinstance(err, ImportError):
        return CheckOutcome("", ERROR, kind, message, where,
                            "An import failed: the project uses only NumPy (and the standard "
                            "library) for its math; check the module and name imported.")
    if isinstance(err, SystemExit):
        return CheckOutcome("", ERROR, kind, f"the code called exit ({message})", where,
                            "Return the result instead of stopping Python.")
    mine = any(w.startswith("your code") for w in where)
    return CheckOutcome("", ERROR, kind, message, where,
                        "Your code raised this error at the line shown: check the shapes and "
                        "types of the arrays it uses there (print them)." if mine else
                        "The error was raised outside your code, from values your code "
                        "returned: check the shapes and types of what you return.")


def exercise_place(exercise: Exercise) -> str:
    return " and ".join(graded_files(exercise))


def _answer_hint(exercise: Exercise, problem: str) -> str:
    if "line" in problem:
        return "Python could not read this code: fix the line shown."
    return (f"The answer to exercise {exercise.id} is read from {exercise_place(exercise)}; "
            f"keep its name and place.")


def _syntax_text(err: SyntaxError, root: Path, submission) -> str:
    return (f"{_display(err.filename or '?', root, submission)}, line {err.lineno}: {err.msg}"
            + (f"\n    {err.text.strip()}" if err.text else ""))


def _display(filename: str, root: Path, submission) -> str:
    """A file name relative to the project it belongs to, when it belongs to one."""
    for base in filter(None, (submission, root)):
        try:
            return Path(filename).resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            continue
    return filename


def _locations(err, sites, root, submission, raised_in: bool = True) -> list[str]:
    """Where the error happened: the last frame of the student's code, the last
    frame of the check, and (``raised_in``) the frame that raised when it is
    neither (not for a failed assertion: numpy.testing and the gradient checker
    raise those)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return []
    mine = Sites(sites)
    checks_file = str((Path(root) / CHECKS).resolve())
    student = check = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        code = frame.f_code
        if mine.holds(code.co_filename, lineno):
            student = (code.co_filename, lineno, code.co_name)
        elif (os.path.realpath(code.co_filename) == checks_file
              or code.co_filename.startswith("notebooks/")):
            check = (code.co_filename, lineno, code.co_name)
    out = []
    if student:
        out.append("your code: " + _frame_text(*student, root, submission))
    if check:
        out.append("the check: " + _frame_text(*check, root, submission))
    last = frames[-1]
    if raised_in and (last.filename, last.lineno) not in {(f[0], f[1]) for f in (student, check)
                                                          if f}:
        out.append("raised in: " + _frame_text(last.filename, last.lineno, last.name, root,
                                               submission))
    return out


def _frame_text(filename, lineno, name, root, submission) -> str:
    line = linecache.getline(filename, lineno).strip()
    return (f"{_display(filename, root, submission)}, line {lineno}, in {name}"
            + (f": {line}" if line else ""))


def _assertion_hint(err: AssertionError, where) -> str:
    report = getattr(err, "report", None)
    if report is not None:
        return gradcheck_hint(report)
    text = str(err)
    if "Mismatched elements" in text or "not equal" in text.lower():
        return ("The check compared what your code returned with the expected values: the "
                "message lists the entries that differ (ACTUAL is what the check got, DESIRED "
                "what it expected). Recompute one of those entries by hand.")
    return "The assertion at the check's line above did not hold: read that line and the message."


def gradcheck_hint(report) -> str:
    """What a failed gradient check says about the backward, Param by Param."""
    lines = []
    rows = list(report.rows) + ([report.directional] if report.directional else [])
    for row in rows:
        if row.passed or row.worst_values is None:
            continue
        analytic, numeric = row.worst_values
        at = f" at {list(row.worst_index)}" if row.worst_index else ""
        what = _gradient_name(row.name)
        if analytic == 0 and numeric != 0:
            lines.append(f"{what} is 0{at} where it should be {numeric:.4g}: no gradient "
                         f"reaches it (never added, or added to a copy)")
        elif numeric == 0 and analytic != 0:
            lines.append(f"{what} is {analytic:.4g}{at} where the loss does not change at all")
        else:
            ratio = analytic / numeric
            text = f"{what}: yours is {analytic:.6g}, the finite difference {numeric:.6g}{at}"
            if abs(ratio + 1) < 1e-3:
                text += " (the sign is flipped)"
            elif abs(ratio - round(ratio)) < 1e-3 and round(ratio) >= 2:
                text += (f" ({round(ratio)} times too large: added twice, or a factor not "
                         f"divided out)")
            elif abs(1 / ratio - round(1 / ratio)) < 1e-3 and round(1 / ratio) >= 2:
                text += (f" (1/{round(1 / ratio)} of the right value: a missing factor, or a "
                         f"gradient that should add up from several uses)")
            lines.append(text)
    rows_say = ("A Param's row checks what your backward adds into its .grad (with +=, so a "
                "layer used twice before the check gets both parts); an input's row checks the "
                "gradient your backward returns for it.")
    if not lines:
        return ("Read the table: a row marked FAIL is a gradient your backward gets wrong. "
                + rows_say)
    return "Rows marked FAIL in the table: " + "; ".join(lines) + ". " + rows_say


def _gradient_name(name: str) -> str:
    match = re.fullmatch(r"input(\d+)", name)
    if match:
        return f"the gradient your backward returns for input {match.group(1)} of forward"
    if name.startswith("(random direction"):
        return "the check along one random direction of all Params at once"
    return f"the gradient of {name}"


# ---------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------

def _emit(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()
    os.fsync(out.fileno())


def worker(root: Path, ids, out_path: Path, *, submission: Path | None, limit: float | None):
    """Run the exercises ``ids`` one after the other, writing JSON lines to ``out_path``."""
    root = Path(root).resolve()
    with open(out_path, "a") as out:
        try:
            checks = load_checks(root)
        except BaseException as err:  # noqa: BLE001 - a broken file of the student's
            if submission is not None:
                raise  # the reference project must import
            outcome = describe_failure(BY_ID[ids[0]], err, [], root, None)
            _emit(out, {"event": "fatal", "check": asdict(outcome)})
            return
        for exercise_id in ids:
            exercise = BY_ID[exercise_id]
            _emit(out, {"event": "start", "id": exercise_id, "time": time.time()})
            result = run_exercise(exercise, checks, root, submission=submission, limit=limit,
                                  hidden_ok=submission is None)
            _emit(out, {"event": "result", "outcome": result.to_json()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minblip.exercises.runner",
                                     description="Run exercise checks (the grader's worker).")
    parser.add_argument("--root", type=Path, required=True,
                        help="the project whose package and checks run")
    parser.add_argument("--submission", type=Path,
                        help="the student's project whose answers are grafted into ROOT")
    parser.add_argument("--ids", required=True, help="comma-separated exercise ids")
    parser.add_argument("--limit", type=float, default=None, help="seconds per exercise")
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file to append to")
    args = parser.parse_args(argv)
    worker(args.root, args.ids.split(","), args.out, submission=args.submission,
           limit=args.limit)
    return 0


if __name__ == "__main__":
    # run as the module the checks import (python -m makes this file a second module,
    # __main__, whose notebook_answers the checks would not see)
    from minblip.exercises import runner

    sys.exit(runner.main())
