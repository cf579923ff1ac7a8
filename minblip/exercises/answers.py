"""A student's answer to one exercise: where it is, how it is put in place, and
what it may not call.

* :func:`find_function` cuts one function (``Class.method`` or ``function``) out
  of a student's file, even when another part of that file does not parse.
* :func:`graft` puts the student's functions of one exercise into the running
  reference package (every other function stays the reference one), so each
  exercise is graded alone: a wrong 1.1 cannot cost marks on 5.1.
* :func:`ban_shortcuts` makes the package functions an exercise re-implements
  (``Exercise.reimplements``) raise :class:`ShortcutError` when the student's
  code calls them, directly or through other package code; the checks
  themselves may still call them to compare.

An *answer site* is ``(filename, first line, last line)`` of the student's code
as the interpreter sees it (``co_filename``); a frame inside a site is the
student's code running.
"""
from __future__ import annotations

import __future__
import ast
import importlib
import json
import linecache
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import Exercise
from .student import STUB, _cell_text, _functions


class AnswerProblem(Exception):
    """The answer cannot be run at all (a missing file or function, a syntax error)."""


class ShortcutError(RuntimeError):
    """The student's code called the package function the exercise asks them to write."""


Site = tuple  # (filename, first line, last line), lines 1-based and inclusive


# ---------------------------------------------------------------------------
# Finding a function in a student's file
# ---------------------------------------------------------------------------

@dataclass
class FunctionText:
    rel: str  # the file, relative to the project
    qualname: str
    first: int  # 1-based line of the first decorator or the def line
    last: int
    lines: list  # the file's lines first..last, as written


_DEF = re.compile(r"^(\s*)(?:async\s+)?(def|class)\s+(\w+)")


def find_function(text: str, qualname: str, rel: str) -> FunctionText:
    """The lines of ``qualname`` in ``text``. With the file parsing, by its syntax
    tree; without, by indentation, so that a syntax error elsewhere in the file
    does not hide this function. Raises AnswerProblem when it is not there."""
    lines = text.split("\n")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        first, last = _find_by_indentation(lines, qualname)
    else:
        nodes = dict(_functions(tree))
        if qualname not in nodes:
            first = last = None
        else:
            node = nodes[qualname]
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            last = node.end_lineno
    if first is None:
        raise AnswerProblem(f"{rel} has no function {qualname}: the exercise is written in its "
                            f"body (was it renamed or deleted?)")
    return FunctionText(rel, qualname, first, last, lines[first - 1:last])


def _find_by_indentation(lines, qualname):
    """(first, last) 1-based of the def of ``qualname``, read from the indentation
    of def/class lines only; (None, None) when absent."""
    want, stack = qualname.split("."), []  # stack of (indent, name) of open def/class lines
    for i, line in enumerate(lines):
        match = _DEF.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(3)))
        if match.group(2) == "def" and [name for _, name in stack] == want:
            first = i
            while first > 0 and lines[first - 1].strip().startswith("@"):
                first -= 1
            last = i
            for j in range(i + 1, len(lines)):
                stripped = lines[j].strip()
                if not stripped:
                    continue
                dedented = len(lines[j]) - len(lines[j].lstrip()) <= indent
                if dedented and not stripped.startswith("#"):
                    break
                last = j
            return first + 1, last + 1
    return None, None


def _compile_function(fn: FunctionText, filename: str, future_annotations: bool):
    """Compile the function alone, with its line numbers in the student's file."""
    indent = len(fn.lines[0]) - len(fn.lines[0].lstrip())
    body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in fn.lines)
    try:
        tree = ast.parse(body)
    except SyntaxError as err:
        line = (err.lineno or 1) + fn.first - 1
        raise AnswerProblem(syntax_message(fn.rel, line, err.msg,
                                           fn.lines[(err.lineno or 1) - 1])) from None
    ast.increment_lineno(tree, fn.first - 1)
    flags = __future__.annotations.compiler_flag if future_annotations else 0
    return compile(tree, filename, "exec", flags=flags, dont_inherit=True)


def syntax_message(where: str, line: int, message: str, text: str) -> str:
    return f"{where}, line {line}: {message}\n    {text.strip()}"


def _new_top_level(student: str, reference: str):
    """Top-level imports, functions, classes and assignments of the student's file
    that define names the reference file does not: helpers and imports that come
    with the answer. Empty when the student's file does not parse."""
    try:
        tree = ast.parse(student)
    except SyntaxError:
        return []
    known = set()
    for node in ast.parse(reference).body:
        known |= _defined(node)
    return [node for node in tree.body if _defined(node) and not _defined(node) & known]


def _defined(node) -> set:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {t.id for t in targets if isinstance(t, ast.Name)}
    return set()


# ---------------------------------------------------------------------------
# Putting a student's functions into the running reference package
# ---------------------------------------------------------------------------

def package_regions(exercise: Exercise) -> list[tuple[str, str]]:
    """(file, qualified name) of every package function that holds the exercise."""
    return [tuple(r.split("::")) for r in exercise.regions if not r.startswith("notebooks/")]


def module_name(rel: str) -> str:
    return rel[:-3].replace("/", ".")


@contextmanager
def graft(exercise: Exercise, submission: Path):
    """Run the block with the student's functions of ``exercise`` (read from
    ``submission``) in place of the reference package's. Yields the answer sites.

    Each function is compiled on its own, in a copy of its module's namespace
    that also holds the new helpers and imports of the student's file, and then
    replaces the original on its class, or on every module that imported it by
    name. Everything is put back when the block ends."""
    submission = Path(submission)
    grafted, sites = [], []  # (module, qualname, new function)
    namespaces = {}
    for rel, qualname in package_regions(exercise):
        path = submission / rel
        if not path.is_file():
            raise AnswerProblem(f"{rel} is not in the submission")
        module = importlib.import_module(module_name(rel))
        text = path.read_text()
        fn = find_function(text, qualname, rel)
        reference = Path(module.__file__).read_text()
        if rel not in namespaces:
            namespace = dict(vars(module))
            for node in _new_top_level(text, reference):
                try:
                    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
                except Exception as err:  # noqa: BLE001 - the student's helper may fail any way
                    raise AnswerProblem(f"{rel}, line {node.lineno}: {type(err).__name__}: "
                                        f"{err}") from None
            namespaces[rel] = namespace
        namespace = namespaces[rel]
        future = "from __future__ import annotations" in reference
        code = _compile_function(fn, str(path), future)
        name = qualname.split(".")[-1]
        saved = namespace.get(name, _MISSING)
        try:
            exec(code, namespace)
        except Exception as err:  # noqa: BLE001 - a decorator or default value of the student's
            raise AnswerProblem(f"{rel}, line {fn.first}: {type(err).__name__}: {err}") from None
        new = namespace[name]
        if "." in qualname:  # a method: the module-level name was not meant to change
            if saved is _MISSING:
                del namespace[name]
            else:
                namespace[name] = saved
        grafted.append((module, qualname, new))
        sites.append((str(path), fn.first, fn.last))
    linecache.checkcache()
    items = []
    for module, qualname, new in grafted:
        parts = qualname.split(".")
        owner = _lookup(module, ".".join(parts[:-1])) if len(parts) > 1 else module
        items.append((owner, parts[-1], _lookup(module, qualname), new))
    _NAMESPACES.extend(namespaces.values())
    try:
        with _replaced(items):
            yield sites
    finally:
        mine = [id(n) for n in namespaces.values()]
        _NAMESPACES[:] = [n for n in _NAMESPACES if id(n) not in mine]


_MISSING = object()


def _lookup(module, qualname):
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_NAMESPACES: list[dict] = []  # the namespaces of the grafted functions, while grafted


def _holders():
    """Every namespace that may hold a package function by name: the loaded
    modules' and the grafted functions'."""
    return [vars(m) for m in list(sys.modules.values()) if hasattr(m, "__dict__")] + _NAMESPACES


@contextmanager
def _replaced(items):
    """Replace each ``(owner, name, original, new)``: on the class for a method;
    for a function, in every namespace that holds it by name."""
    undo = []
    try:
        for owner, name, original, new in items:
            if isinstance(owner, type):
                undo.append((vars(owner), name, owner.__dict__[name], owner))
                setattr(owner, name, new)
                continue
            for holder in _holders():
                for key, value in list(holder.items()):
                    if value is original:
                        undo.append((holder, key, original, None))
                        holder[key] = new
        yield
    finally:
        for holder, key, original, cls in reversed(undo):
            if cls is not None:
                setattr(cls, key, original)
            else:
                holder[key] = original


# ---------------------------------------------------------------------------
# Where the answer is, in a project as it is (the student's own checks)
# ---------------------------------------------------------------------------

def local_sites(exercise: Exercise, root: Path) -> list[Site]:
    """The answer sites of a package exercise in a project whose own package is
    the one running (``python -m minblip.exercises check``)."""
    sites = []
    for rel, qualname in package_regions(exercise):
        path = Path(root) / rel
        fn = find_function(path.read_text(), qualname, rel)
        sites.append((str(path), fn.first, fn.last))
    return sites


# ---------------------------------------------------------------------------
# Notebook answers
# ---------------------------------------------------------------------------

def cell_filename(exercise: Exercise, grade_id: str) -> str:
    """The name a notebook cell is compiled under: tracebacks and answer sites use it."""
    return f"{exercise.notebook_path} [{grade_id}]"


def notebook_sites(exercise: Exercise) -> list[Site]:
    return [(cell_filename(exercise, gid), 1, 10 ** 9) for gid in solution_ids(exercise)]


def solution_ids(exercise: Exercise) -> list[str]:
    """The grade ids of the notebook cells in which the student writes the exercise."""
    prefix = "ex" + exercise.id.replace(".", "_")
    in_notebook = any(r.startswith("notebooks/") for r in exercise.regions)
    return [f"{prefix}_solution"] if in_notebook else []


def read_notebook(root: Path, exercise: Exercise) -> dict:
    path = Path(root) / exercise.notebook_path
    if not path.is_file():
        raise AnswerProblem(f"{exercise.notebook_path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnswerProblem(f"{exercise.notebook_path} is not a readable notebook "
                            f"({err})") from None


def twin_differs(root: Path, exercise: Exercise) -> str:
    """A note when the jupytext twin ``notebooks/NN_name.py`` holds another version
    of the exercise's cell than the ``.ipynb``, which is the file checked and
    graded; '' when they agree or there is no twin."""
    twin = Path(root) / exercise.notebook_path.replace(".ipynb", ".py")
    if not twin.is_file() or not solution_ids(exercise):
        return ""
    try:
        cells = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id"): _cell_text(c)
                 for c in read_notebook(root, exercise).get("cells", [])}
    except AnswerProblem:
        return ""
    notes = []
    for gid in solution_ids(exercise):
        in_py = _percent_cell(twin.read_text(), gid)
        if in_py is not None and in_py.strip() != cells.get(gid, "").strip():
            stub = STUB in cells.get(gid, "")
            notes.append(
                f"{twin.relative_to(root).as_posix()} (the jupytext twin) holds another version "
                f"of cell {gid} than {exercise.notebook_path}"
                + (", which still has the stub" if stub else "")
                + f". Only the .ipynb is checked and graded: if your answer is in the .py, "
                  f"run `jupytext --sync {twin.relative_to(root).as_posix()}` (or open the .py in "
                  f"Jupyter and save) so the notebook gets it.")
    return " ".join(notes)


def _percent_cell(text: str, grade_id: str):
    """The source of the cell with ``grade_id`` in a jupytext percent file, or None."""
    lines, out, inside = text.split("\n"), [], False
    for line in lines:
        if line.startswith("# %%"):
            if inside:
                break
            inside = f'"grade_id": "{grade_id}"' in line
            continue
        if inside:
            out.append(line)
    return "\n".join(out).strip("\n") if inside or out else None


# ---------------------------------------------------------------------------
# Shortcuts
# ---------------------------------------------------------------------------

def resolve(dotted: str):
    """``"minblip.optim.AdamW.step"`` -> (owner object, attribute name, the object)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        owner = obj
        for part in parts[cut:-1]:
            owner = getattr(owner, part)
        return owner, parts[-1], getattr(owner, parts[-1])
    raise ValueError(f"cannot import {dotted!r}")


class Sites:
    """Answer sites, with file names compared after resolving links."""

    def __init__(self, sites):
        self.by_file = {}
        for filename, first, last in sites:
            self.by_file.setdefault(self._norm(filename), []).append((first, last))
        self._cache = {}

    @staticmethod
    def _norm(filename):
        return os.path.realpath(filename) if os.path.isabs(filename) else filename

    def contains(self, frame) -> bool:
        return self.holds(frame.f_code.co_filename, frame.f_lineno)

    def holds(self, filename: str, lineno: int) -> bool:
        norm = self._cache.get(filename)
        if norm is None:
            norm = self._cache[filename] = self._norm(filename)
        spans = self.by_file.get(norm)
        return bool(spans) and any(a <= lineno <= b for a, b in spans)


@contextmanager
def ban_shortcuts(exercise: Exercise, sites):
    """While the block runs, every function in ``exercise.reimplements`` raises
    ShortcutError when called with the student's code anywhere on the stack."""
    if not exercise.reimplements or not sites:
        yield
        return
    where = Sites(sites)
    items = []
    for dotted in exercise.reimplements:
        owner, name, original = resolve(dotted)
        items.append((owner, name, original, _guard(exercise, dotted, original, where)))
    with _replaced(items):
        yield


def _guard(exercise, dotted, original, where):
    def guard(*args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None:
            if where.contains(frame):
                raise ShortcutError(
                    f"your code for exercise {exercise.id} calls {dotted}, the package's own "
                    f"version of what the exercise asks you to write; while the exercise is "
                    f"checked it is not available. Write the computation yourself.")
            frame = frame.f_back
        return original(*args, **kwargs)

    guard.__name__ = getattr(original, "__name__", "guard")
    guard.__wrapped__ = original
    return guard
