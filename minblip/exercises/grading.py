"""Checking and grading: the worker processes, a whole class of submissions, the CSV.

* :func:`check_project` runs the (visible) checks of a project on its own code,
  in one worker process: what a student runs.
* :func:`grade_submission` grades one student's project folder: a fresh copy
  of the instructor's project (hidden checks included) runs in its own worker
  process, and each exercise is graded with only that exercise's functions and
  notebook cells taken from the student (:func:`minblip.exercises.answers.graft`),
  so one wrong answer costs only its own marks.
* :func:`grade_all` grades every folder of a submissions folder, writes the CSV,
  and never stops on one bad submission.

A worker (:mod:`minblip.exercises.runner`) has a time limit per exercise,
enforced inside it (SIGALRM) and, should that fail, by this process, which then
kills it and starts a new one for the exercises that remain. Grading runs the
students' code with the grader's permissions: it is not a sandbox
(docs/instructors.md shows how to run it in a container).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..files import write_text_atomic
from . import INSTRUCTOR_ONLY, Exercise
from .runner import CRASHED, ERROR, TIMEOUT, CheckOutcome, ExerciseOutcome, graded_files
from .student import project_files

STARTUP_SECONDS = 120  # for a worker to import NumPy, the package and the checks
GRACE_SECONDS = 5  # at most, past an exercise's limit, before the worker is killed from outside
MESSAGE_CHARS = 3000  # of the first failure, in the CSV


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------

def _worker_env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _kill(proc) -> None:
    """Stop a worker this process started, with everything it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            events.append(json.loads(line))
    return events


def run_worker(root: Path, exercises, *, submission: Path | None = None,
               limit: float | None = None) -> list[ExerciseOutcome]:
    """Run ``exercises`` in worker processes on ``root`` (with the answers of
    ``submission`` grafted in, when given). A worker that crashes or outlives an
    exercise's limit is killed; that exercise is reported as such and a new
    worker goes on with the rest. Returns one outcome per exercise, in order."""
    root = Path(root).resolve()
    exercises = list(exercises)
    results: dict[str, ExerciseOutcome] = {}
    remaining = [e.id for e in exercises]
    by_id = {e.id: e for e in exercises}
    with tempfile.TemporaryDirectory(prefix="minblip-grade-") as tmp:
        log = Path(tmp) / "worker.log"
        while remaining:
            out = Path(tmp) / f"events-{len(results)}.jsonl"
            cmd = [sys.executable, "-m", "minblip.exercises.runner", "--root", str(root),
                   "--ids", ",".join(remaining), "--out", str(out)]
            cmd += ["--submission", str(Path(submission).resolve())] if submission else []
            cmd += ["--limit", repr(limit)] if limit else []
            with open(log, "w") as log_file:
                proc = subprocess.Popen(cmd, cwd=root, env=_worker_env(root), stdout=log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
                killed = _watch(proc, out, limit)
            events = _read_events(out)
            started = None
            for event in events:
                if event["event"] == "start":
                    started = event["id"]
                elif event["event"] == "result":
                    outcome = ExerciseOutcome.from_json(event["outcome"])
                    results[outcome.id] = outcome
                    started = None
                elif event["event"] == "fatal":  # the project's checks do not import
                    for exercise_id in remaining:
                        failure = CheckOutcome(**event["check"])
                        results[exercise_id] = _every_check(by_id[exercise_id], failure)
                        results[exercise_id].fatal = True
                    started = None
            if started is None and not any(e["event"] in ("start", "fatal") for e in events):
                # the worker died before its first exercise: nothing more will run
                tail = "\n".join(log.read_text().strip().split("\n")[-20:])
                for exercise_id in remaining:
                    results.setdefault(exercise_id, _every_check(by_id[exercise_id], CheckOutcome(
                        "", CRASHED, "WorkerFailed",
                        f"the checking process stopped before any exercise ran:\n{tail}")))
            elif started is not None and started not in results:
                status = TIMEOUT if killed else CRASHED
                message = (f"the exercise ran for more than its limit of {limit:g} s and the "
                           f"process was stopped" if killed else
                           f"the checking process died during this exercise (exit code "
                           f"{proc.returncode}):\n"
                           + "\n".join(log.read_text().strip().split("\n")[-20:]))
                results[started] = _every_check(by_id[started], CheckOutcome(
                    "", status, "WorkerStopped", message,
                    hint="Look for a loop that never ends, or for code that stops Python "
                         "(os._exit, a crash in a C extension)."))
            remaining = [i for i in remaining if i not in results]
    return [results[e.id] for e in exercises]


def _watch(proc, out: Path, limit) -> bool:
    """Wait for the worker; kill it when an exercise outlives its limit (plus a
    grace) or when it does not start within STARTUP_SECONDS. True if killed."""
    launched, seen, current = time.monotonic(), 0, None
    while proc.poll() is None:
        time.sleep(0.05)
        events = _read_events(out)
        for event in events[seen:]:
            if event["event"] == "start":
                current = time.monotonic()
            elif event["event"] == "result":
                current = None
        seen = len(events)
        now = time.monotonic()
        grace = min(GRACE_SECONDS, max(1.0, limit or 0.0))
        if (current is None and not events and now - launched > STARTUP_SECONDS) or (
                current is not None and limit and now - current > limit + grace):
            _kill(proc)
            return True
    return False


def _every_check(exercise: Exercise, failure: CheckOutcome) -> ExerciseOutcome:
    checks = [CheckOutcome(**{**failure.__dict__, "name": n.split("::")[1]})
              for n in exercise.tests]
    return ExerciseOutcome(exercise.id, exercise.title, graded_files(exercise), checks)


# ---------------------------------------------------------------------------
# Checking one's own project, grading submissions
# ---------------------------------------------------------------------------

def check_project(root: Path, exercises, limit: float | None = 60.0) -> list[ExerciseOutcome]:
    """The visible checks of ``exercises`` on the project ``root`` as it is."""
    root = Path(root).resolve()
    if not (root / "tests" / "test_exercise_checks.py").is_file():
        raise ValueError(f"{root} has no tests/test_exercise_checks.py: run the checks from the "
                         f"top folder of a minblip project (or give it with --source)")
    return run_worker(root, exercises, limit=limit)


def copy_reference(source: Path, dest: Path) -> None:
    """Copy the instructor's project (without caches and instructor-only files)."""
    source = Path(source).resolve()
    for path in project_files(source):
        rel = path.relative_to(source).as_posix()
        if rel in INSTRUCTOR_ONLY:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def grade_submission(submission: Path, source: Path, exercises,
                     limit: float | None = 60.0) -> list[ExerciseOutcome]:
    """Grade one student's project folder against the instructor's project
    ``source``, each exercise on its own, in a fresh copy of ``source``."""
    with tempfile.TemporaryDirectory(prefix="minblip-reference-") as tmp:
        reference = Path(tmp) / "project"
        copy_reference(source, reference)
        return run_worker(reference, exercises, submission=submission, limit=limit)


def find_submissions(folder: Path) -> list[tuple[str, Path]]:
    """(name, project folder) of every submission in ``folder``: each sub-folder is
    one student's (a folder holding exactly one project folder counts as it); a
    ``folder`` that is itself a project is one submission."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of submissions")
    if _is_project(folder):
        return [(folder.name, folder)]
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        inner = [p for p in sub.iterdir() if p.is_dir() and _is_project(p)]
        out.append((sub.name, inner[0] if not _is_project(sub) and len(inner) == 1 else sub))
    if not out:
        raise ValueError(f"{folder} holds no submission folders")
    return out


def _is_project(folder: Path) -> bool:
    return (folder / "minblip").is_dir() or (folder / "notebooks").is_dir()


CSV_COLUMNS = ["student", "exercise", "title", "points", "max_points", "status", "message"]


def first_failure_text(outcome: ExerciseOutcome) -> str:
    check = outcome.first_failure()
    if check is None:
        return ""
    text = f"{check.name}: {check.error}: {check.message}"
    if check.where:
        text += "\n" + "\n".join(check.where)
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + " [...]"


def csv_rows(student: str, outcomes) -> list[dict]:
    return [{"student": student, "exercise": o.id, "title": o.title, "points": o.points,
             "max_points": o.max_points, "status": o.status, "message": first_failure_text(o)}
            for o in outcomes]


def grade_all(submissions: Path, source: Path, exercises, *, limit: float | None = 60.0,
              jobs: int = 1, csv_path: Path | None = None, progress=None) -> dict:
    """Grade every submission of ``submissions`` (:func:`find_submissions`);
    returns {student: [ExerciseOutcome]} and writes the CSV (one row per student
    and exercise) when ``csv_path`` is given. ``progress(student, outcomes)`` is
    called as each submission is done. A submission that cannot be graded at all
    gets an error row per exercise, and grading goes on."""
    found = find_submissions(submissions)
    exercises = list(exercises)

    def one(item):
        name, path = item
        try:
            outcomes = grade_submission(path, source, exercises, limit)
        except Exception as err:  # noqa: BLE001 - one bad submission must not stop the class
            failure = CheckOutcome("", ERROR, type(err).__name__, f"could not grade: {err}")
            outcomes = [_every_check(e, failure) for e in exercises]
        if progress:
            progress(name, outcomes)
        return name, outcomes

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        graded = dict(pool.map(one, found))
    if csv_path is not None:
        write_text_atomic(csv_path, _csv_text([row for name, _ in found
                                               for row in csv_rows(name, graded[name])]))
    return graded


def _csv_text(rows) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
