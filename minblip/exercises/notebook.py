"""What every notebook's first cell sets up: the right package, and Run All
that goes to the end while exercises are unfinished.

The first cell puts the notebook's own project first on the import path and
then calls :func:`setup_exercises`, which

* checks that the ``minblip`` imported is the one of the project the notebook
  sits in (the folder that holds it, or the one above): the package the student
  edits, and the one the check cells test, under Jupyter and under nbgrader's
  autograder alike. It runs before anything else is imported, and when the
  package is another one, minblip cannot be imported for the rest of the
  session: every check cell then fails instead of testing the wrong package.
  A package with solution markers next to the notebook (nbgrader's flat layout)
  is refused too: it is the instructor's, copied over a submission;
* in a Jupyter kernel, turns the ``NotImplementedError`` of an unfinished
  exercise into a short note naming the exercise to do first, instead of a
  traceback, and lets the notebook go on. A later cell that needs a name the
  stopped cell did not get to define is stopped the same way. The note goes to
  stderr, so a check cell that stops this way still counts as failed (nbgrader
  gives no points to a test cell with stderr output). Any other error shows its
  traceback and stops Run All as usual.

The kernel part uses IPython's public hooks only: ``set_custom_exc`` for the
message and the ``pre_run_cell`` / ``post_run_cell`` events, whose
``ExecutionResult.error_in_exec`` is cleared for a cell that stopped at an
unfinished exercise (ipykernel reads it after the event to decide whether the
cell failed).
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from . import BY_ID
from .student import BEGIN as SOLUTION_MARK

_STUB = re.compile(r"Exercise (\S+) \(")


def setup_exercises() -> None:
    """Check the package in use; under IPython, install the unfinished-exercise notes.

    When the package is not the notebook's own, every later import of minblip in
    this process fails too (the modules already loaded are dropped and the
    import refused), so no check cell can pass by testing another package."""
    try:
        check_package()
    except RuntimeError as err:
        for name in [m for m in sys.modules if m == "minblip" or m.startswith("minblip.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _Refuse(str(err)))
        raise
    shell = _running_shell()
    if shell is not None:
        _Notes.install(shell)


class _Refuse:
    """A meta-path finder that refuses to import minblip, saying why."""

    def __init__(self, why: str):
        self.why = why

    def find_spec(self, name, path=None, target=None):
        if name == "minblip" or name.startswith("minblip."):
            raise ImportError(f"minblip cannot be imported here: {self.why}")
        return None


def check_package(cwd: Path | None = None) -> Path:
    """The project whose ``minblip`` is imported; raises RuntimeError when it is
    not the project of the notebook running in ``cwd`` (that folder or the one
    above it)."""
    import minblip

    here = (cwd or Path.cwd()).resolve()
    project = Path(minblip.__file__).resolve().parent.parent
    if project not in (here, here.parent):
        raise RuntimeError(
            f"this notebook imported minblip from {project}, but it must use the minblip of "
            f"its own project: the folder that holds the notebook ({here}) or the one above it. "
            f"That is the package you edit, and the one the check cells test. Start Jupyter in "
            f"the project (the notebooks sit in its notebooks/ folder), or, when grading, put "
            f"each submission's minblip/ folder next to its notebooks.")
    if project == here:  # notebooks next to the package: an nbgrader assignment's layout
        solved = next((p for p in sorted((project / "minblip").rglob("*.py"))
                       if any(line.strip() == SOLUTION_MARK for line in p.read_text().split("\n"))),
                      None)
        if solved is not None:
            raise RuntimeError(
                f"the minblip next to this notebook holds the exercises' solutions "
                f"({solved.relative_to(project)} has {SOLUTION_MARK!r} markers): it is the "
                f"instructor's package, not a student's. Under nbgrader, autograde copies the "
                f"source folder's files over each submission: put the student version of the "
                f"package in source/<assignment>/ and list its files in "
                f"Autograde.exclude_overwriting (docs/instructors.md).")
    return project


def _running_shell():
    if "IPython" not in sys.modules:
        return None
    shell = sys.modules["IPython"].get_ipython()
    return shell if shell is not None and hasattr(shell, "set_custom_exc") else None


def unfinished_exercise(error: BaseException) -> str | None:
    """The id of the exercise whose stub raised ``error``, else None."""
    if isinstance(error, NotImplementedError):
        match = _STUB.search(str(error))
        if match and match.group(1) in BY_ID:
            return match.group(1)
    return None


def names_assigned(source: str, from_line: int = 1) -> set[str]:
    """The names the top-level statements of ``source`` bind, from the statement
    that holds line ``from_line`` on (function and class bodies not entered)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for stmt in tree.body:
        if stmt.end_lineno < from_line:
            continue
        for node in _walk_scope(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _walk_scope(node):
    """ast.walk that does not enter functions, classes and lambdas (their names count)."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(current))


class _Notes:
    """The kernel hooks; one instance per kernel."""

    installed = None

    def __init__(self, shell):
        self.shell = shell
        self.cell = ""
        self.pending = {}  # name -> the exercise whose stub kept a cell from defining it
        self.handled = None

    @classmethod
    def install(cls, shell) -> None:
        if cls.installed is not None:
            cls.installed.uninstall()
        notes = cls(shell)
        shell.events.register("pre_run_cell", notes.pre_run_cell)
        shell.events.register("post_run_cell", notes.post_run_cell)
        shell.set_custom_exc((NotImplementedError, NameError), notes.handler)
        cls.installed = notes

    def uninstall(self) -> None:
        self.shell.events.unregister("pre_run_cell", self.pre_run_cell)
        self.shell.events.unregister("post_run_cell", self.post_run_cell)
        self.shell.set_custom_exc((), None)
        _Notes.installed = None

    def pre_run_cell(self, info) -> None:
        self.cell, self.handled = info.raw_cell or "", None

    def post_run_cell(self, result) -> None:
        if self.handled is not None and result.error_in_exec is self.handled:
            result.error_in_exec = None  # the cell stopped on purpose: the notebook goes on

    def handler(self, shell, etype, value, tb, tb_offset=None):
        exercise = unfinished_exercise(value)
        missing = None
        if exercise is None and isinstance(value, NameError):
            missing = getattr(value, "name", None)
            exercise = self.pending.get(missing)
        if exercise is None:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
            return None
        self.handled = value
        for name in names_assigned(self.cell, self._cell_line(tb)):
            self.pending[name] = exercise
            shell.user_ns.pop(name, None)  # an older value would not be what this cell makes
        e = BY_ID[exercise]
        why = (f"This cell uses `{missing}`, which an earlier cell could not make" if missing
               else "This cell stopped")
        print(f"{why}: it needs exercise {e.id} ({e.title}), which is not written yet. See "
              f"{e.notebook_path}, section {e.heading}. The rest of the notebook still runs; "
              f"run this cell again once exercise {e.id} is done.", file=sys.stderr)
        return None

    def _cell_line(self, tb) -> int:
        """The line of the cell that was running when the error came (1: unknown)."""
        line = 1
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_globals is self.shell.user_ns and frame.f_code.co_name == "<module>":
                line = tb.tb_lineno
            tb = tb.tb_next
        return line
