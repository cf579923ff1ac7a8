"""Make the student version of the project, and put solutions back into one.

Markers are whole comment lines, compared after stripping the indentation:

* a solution region ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` becomes
  ``# YOUR CODE HERE`` and ``raise NotImplementedError("Exercise ...")`` at the
  marker's indentation (nbgrader's ``ClearSolutions`` stub, with a message naming
  the exercise and the notebook section that explains it);
* a hidden-test region ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS``
  is removed with its markers (nbgrader's ``ClearHiddenTests``).

A solution region must sit inside a function body: at module level its stub would
raise on import and break the package and test collection. Every region must
belong to an exercise of the registry (found by the enclosing function's
qualified name), and every transformed Python file must still parse.

Notebooks are handled cell by cell, the paired jupytext ``.py`` line by line, so
the two stay in sync. A notebook cell that was changed, or whose stored output
shows a line of a solution (``inspect.getsource`` of a solved function, say) or of
a package function a handed-out exercise re-implements (``Exercise.reimplements``),
has its outputs cleared; execution counts are kept.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import INSTRUCTOR_ONLY, Exercise, by_region, select

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB = "# YOUR CODE HERE"

SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints",
             ".venv", "venv", "build", "dist", "runs"}
# a solution line shorter than this is too generic ("return dx") to count as a leak
LEAK_MIN_CHARS = 24


class ExerciseError(ValueError):
    """A solution or hidden-test region that cannot be turned into a student version."""


@dataclass
class Region:
    kind: str  # "solution" or "hidden"
    begin: int  # index of the BEGIN line
    end: int  # index of the END line
    indent: str
    qualname: str | None = None  # enclosing function (solution regions only)


def find_regions(text: str, where: str) -> list[Region]:
    """The marked regions of ``text``; ``where`` names it in error messages."""
    regions, open_region = [], None
    for i, line in enumerate(text.split("\n")):
        mark = line.strip()
        if mark in (BEGIN, BEGIN_HIDDEN):
            if open_region is not None:
                raise ExerciseError(f"{where}:{i + 1}: {mark!r} inside the region opened at "
                                    f"line {open_region.begin + 1} (regions cannot nest)")
            kind = "solution" if mark == BEGIN else "hidden"
            open_region = Region(kind, i, -1, line[:len(line) - len(line.lstrip())])
        elif mark in (END, END_HIDDEN):
            want = END if open_region is not None and open_region.kind == "solution" else END_HIDDEN
            if open_region is None or mark != want:
                raise ExerciseError(f"{where}:{i + 1}: {mark!r} without a matching BEGIN line")
            open_region.end = i
            regions.append(open_region)
            open_region = None
    if open_region is not None:
        raise ExerciseError(f"{where}:{open_region.begin + 1}: region is never closed")
    return regions


def _functions(tree) -> list[tuple[str, ast.AST]]:
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((name, child))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def locate(text: str, where: str) -> list[Region]:
    """``find_regions`` plus, for each solution region, its enclosing function.
    A solution region outside every function body is refused."""
    regions = find_regions(text, where)
    if not any(r.kind == "solution" for r in regions):
        return regions
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise ExerciseError(f"{where}: does not parse ({err})") from None
    functions = _functions(tree)
    lines = text.split("\n")
    for r in regions:
        if r.kind != "solution":
            continue
        # 1-based numbers of the region's first and last code lines (comments have no AST node)
        code = [i + 1 for i in range(r.begin + 1, r.end)
                if lines[i].strip() and not lines[i].strip().startswith("#")]
        if not code:
            raise ExerciseError(f"{where}:{r.begin + 1}: empty solution region")
        first, last = code[0], code[-1]
        inside = [(name, node) for name, node in functions
                  if node.body[0].lineno <= first and last <= node.end_lineno
                  and len(r.indent) > node.col_offset]
        if not inside:
            raise ExerciseError(
                f"{where}:{first}: solution region at module level; put it inside a function "
                f"body (its stub would raise on import and break the package)")
        r.qualname = max(inside, key=lambda item: item[1].lineno)[0]  # the innermost
    return regions


def _exercise_for(key: str, where: str, line: int) -> Exercise:
    ex = by_region().get(key)
    if ex is None:
        raise ExerciseError(f"{where}:{line}: solution region in {key!r}, which no exercise of "
                            f"minblip.exercises.EXERCISES lists")
    return ex


def region_key(rel_path: str, qualname: str) -> str:
    """The registry key of a region: the paired ``.py`` of a notebook counts as the notebook."""
    if rel_path.startswith("notebooks/") and rel_path.endswith(".py"):
        rel_path = rel_path[:-3] + ".ipynb"
    return f"{rel_path}::{qualname}"


def transform_text(text: str, rel_path: str, selected: set[str], *, parse: bool = True,
                   where: str | None = None) -> tuple[str, list[str]]:
    """The student version of one file's (or one cell's) text.

    Solution regions of ``selected`` exercise ids become stubs; those of other
    exercises keep their code and lose the marker lines. Hidden tests go.
    Returns the new text and the solution lines that were removed.
    """
    where = where or rel_path
    regions = locate(text, where)
    if not regions:
        return text, []
    lines = text.split("\n")
    out, removed, pos = [], [], 0
    for r in regions:
        out += lines[pos:r.begin]
        body = lines[r.begin + 1:r.end]
        if r.kind == "solution":
            ex = _exercise_for(region_key(rel_path, r.qualname), where, r.begin + 1)
            if ex.id in selected:
                out += [r.indent + STUB,
                        f"{r.indent}raise NotImplementedError({ex.stub_message()!r})"]
                removed += body
            else:
                out += body
        pos = r.end + 1
    out += lines[pos:]
    new = "\n".join(out)
    if parse:
        try:
            ast.parse(new)
        except SyntaxError as err:
            raise ExerciseError(f"{where}: the student version does not parse ({err})") from None
    return new, removed


# ---------------------------------------------------------------------------
# Notebooks
# ---------------------------------------------------------------------------

def _cell_text(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _set_cell_text(cell, text: str) -> None:
    lines = text.split("\n")
    cell["source"] = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _output_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        for key in ("text", "traceback"):
            value = out.get(key)
            if value:
                parts.append("".join(value) if isinstance(value, list) else value)
        for value in out.get("data", {}).values():
            if isinstance(value, (str, list)):
                parts.append("".join(value) if isinstance(value, list) else value)
    return "\n".join(parts)


def transform_notebook(nb: dict, rel_path: str, selected: set[str],
                       leak_lines: set[str]) -> tuple[dict, list[str]]:
    """The student version of a notebook (a JSON dict), cell by cell."""
    removed = []
    for index, cell in enumerate(nb.get("cells", [])):
        text = _cell_text(cell)
        where = f"{rel_path} cell {index}"
        if cell.get("cell_type") == "code":
            new, gone = transform_text(text, rel_path, selected, where=where)
        else:
            if find_regions(text, where):
                raise ExerciseError(f"{where}: solution or hidden-test markers in a "
                                    f"{cell.get('cell_type')} cell; only code cells may hold them")
            new, gone = text, []
        removed += gone
        if new != text:
            _set_cell_text(cell, new)
        if cell.get("cell_type") == "code" and cell.get("outputs"):
            shown = _output_text(cell)
            if new != text or any(line in shown for line in leak_lines):
                cell["outputs"] = []
    return nb, removed


# ---------------------------------------------------------------------------
# The whole tree
# ---------------------------------------------------------------------------

def project_files(root: Path) -> list[Path]:
    """Every file of the project below ``root``, minus caches and build output."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix != ".pyc":
            files.append(path)
    return files


def _is_notebook(rel: str) -> bool:
    return rel.endswith(".ipynb")


def solution_lines(root: Path, selected: set[str]) -> set[str]:
    """Distinctive lines of the selected solutions: stripped, long enough, and not
    also found outside every solution region (where they would not give anything away)."""
    inside, outside = set(), set()
    for path in project_files(root):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".py":
            texts = [path.read_text()]
        elif _is_notebook(rel):
            texts = [_cell_text(c) for c in json.loads(path.read_text()).get("cells", [])]
        else:
            continue
        for text in texts:
            lines = text.split("\n")
            covered = set()
            for r in locate(text, rel):
                covered.update(range(r.begin, r.end + 1))
                if r.kind == "solution":
                    ex = _exercise_for(region_key(rel, r.qualname), rel, r.begin + 1)
                    if ex.id in selected:
                        inside.update(line.strip() for line in lines[r.begin + 1:r.end])
            outside.update(line.strip() for i, line in enumerate(lines) if i not in covered)
    return {line for line in inside - outside
            if len(line) >= LEAK_MIN_CHARS and not line.startswith("#")}


def locate_dotted(root: Path, dotted: str) -> tuple[str, str]:
    """``"minblip.softmax.L2Normalize.backward"`` -> ("minblip/softmax.py",
    "L2Normalize.backward"): the file and qualified name of a package function."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        rel = "/".join(parts[:cut]) + ".py"
        if (Path(root) / rel).is_file():
            return rel, ".".join(parts[cut:])
    raise ExerciseError(f"{dotted!r} names no function in a file under {root}")


def definition_lines(root: Path, dotted: str, *, whole_class: bool = False) -> tuple[str, int, int]:
    """(file, first line, last line), 1-based, of the package function ``dotted``;
    with ``whole_class``, of the class that holds it when it is a method."""
    rel, qualname = locate_dotted(root, dotted)
    tree = ast.parse((Path(root) / rel).read_text())
    if whole_class and "." in qualname:
        qualname = qualname.rsplit(".", 1)[0]
        nodes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    else:
        nodes = dict(_functions(tree))
    if qualname not in nodes:
        raise ExerciseError(f"{rel} has no {qualname} (named by {dotted!r} in the registry)")
    node = nodes[qualname]
    return rel, node.lineno, node.end_lineno


def printed_answer_lines(root: Path, selected: set[str]) -> set[str]:
    """The lines whose appearance in a kept notebook output gives an answer away:
    the selected solutions' distinctive lines and those of the package functions
    the selected exercises re-implement (``Exercise.reimplements``)."""
    lines = solution_lines(root, selected)
    for exercise in select(sorted(selected, key=_id_order)):
        for dotted in exercise.reimplements:
            rel, first, last = definition_lines(root, dotted)
            text = (Path(root) / rel).read_text().split("\n")[first - 1:last]
            lines |= {line.strip() for line in text if len(line.strip()) >= LEAK_MIN_CHARS
                      and not line.strip().startswith(("#", '"""'))}
    return lines


def generate(source: Path, out: Path, ids=None) -> dict:
    """Write the student version of the project at ``source`` into ``out``.

    ``ids``: the exercise ids to turn into stubs (None: all of them). ``out``
    must not exist or be empty. Returns a summary: the stubbed exercise ids, the
    files changed, and the files left out (``INSTRUCTOR_ONLY``).
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    selected = {e.id for e in select(ids)}
    if out.exists() and any(out.iterdir()):
        raise ExerciseError(f"{out} exists and is not empty; give a new folder")
    if out == source or source in out.parents:
        raise ExerciseError(f"the student version must go outside the project, got {out}")
    leak = printed_answer_lines(source, selected)
    changed, left_out = [], []
    seen_regions: set[str] = set()
    for path in project_files(source):
        rel = path.relative_to(source).as_posix()
        target = out / rel
        if rel in INSTRUCTOR_ONLY:
            left_out.append(rel)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py" or _is_notebook(rel):
            text = path.read_text()
            if _is_notebook(rel):
                nb = json.loads(text)
                seen_regions |= _region_keys(rel, [_cell_text(c) for c in nb.get("cells", [])])
                nb, _ = transform_notebook(nb, rel, selected, leak)
                new = _dump_notebook(nb)
                if new == _dump_notebook(json.loads(text)):
                    new = text  # nothing to change: keep the file byte for byte
            else:
                seen_regions |= _region_keys(rel, [text])
                new, _ = transform_text(text, rel, selected)
            if new != text:
                changed.append(rel)
            target.write_text(new)
        else:
            shutil.copy2(path, target)
    missing = sorted(set(by_region()) - seen_regions)
    if missing:
        raise ExerciseError(f"the registry lists solution regions that the source does not "
                            f"have: {missing}")
    return {"exercises": sorted(selected, key=_id_order), "changed": changed,
            "left_out": left_out}


def _dump_notebook(nb: dict) -> str:
    """JSON as Jupyter writes it (nbformat: indent 1, sorted keys, UTF-8)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _region_keys(rel: str, texts: list[str]) -> set[str]:
    keys = set()
    for text in texts:
        for r in locate(text, rel):
            if r.kind == "solution":
                keys.add(region_key(rel, r.qualname))
    return keys


def _id_order(exercise_id: str):
    return tuple(int(part) for part in exercise_id.split("."))


# ---------------------------------------------------------------------------
# Putting the solutions back
# ---------------------------------------------------------------------------

_STUB_RAISE = re.compile(r"""^\s*raise NotImplementedError\((['"])Exercise (\S+) """)


def restore_text(student: str, source: str, rel_path: str) -> str:
    """Put the source's solution regions (with their markers) back in place of
    the stubs of ``student``. Stubs are matched to the source's regions of the
    same exercise in order; everything else in ``student`` is kept."""
    src_lines = source.split("\n")
    pending: dict[str, list[list[str]]] = {}
    for r in locate(source, rel_path):
        if r.kind == "solution":
            ex = _exercise_for(region_key(rel_path, r.qualname), rel_path, r.begin + 1)
            pending.setdefault(ex.id, []).append(src_lines[r.begin:r.end + 1])
    lines = student.split("\n")
    out, i = [], 0
    while i < len(lines):
        match = _STUB_RAISE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if lines[i].strip() == STUB and match:
            queue = pending.get(match.group(2))
            if not queue:
                raise ExerciseError(f"{rel_path}:{i + 1}: a stub of exercise {match.group(2)} "
                                    f"with no solution region left in the source")
            out += queue.pop(0)
            i += 2
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def restore(student_root: Path, source_root: Path) -> list[str]:
    """Put every solution of ``source_root`` back into the student tree in place.
    Notebook cells are matched by their nbgrader ``grade_id``. Returns the files changed."""
    student_root, source_root = Path(student_root), Path(source_root)
    changed = []
    for path in project_files(student_root):
        rel = path.relative_to(student_root).as_posix()
        src = source_root / rel
        if not src.exists() or not (path.suffix == ".py" or _is_notebook(rel)):
            continue
        text = path.read_text()
        if STUB not in text:
            continue
        if _is_notebook(rel):
            nb = json.loads(text)
            by_id = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id"): c
                     for c in json.loads(src.read_text()).get("cells", [])}
            for cell in nb.get("cells", []):
                body = _cell_text(cell)
                if STUB in body:
                    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
                    if grade_id not in by_id or grade_id is None:
                        raise ExerciseError(f"{rel}: a stubbed cell without a grade_id that "
                                            f"the source notebook has")
                    _set_cell_text(cell, restore_text(body, _cell_text(by_id[grade_id]), rel))
            new = _dump_notebook(nb)
        else:
            new = restore_text(text, src.read_text(), rel)
        if new != text:
            path.write_text(new)
            changed.append(rel)
    return changed
