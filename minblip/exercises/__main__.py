"""python -m minblip.exercises {list,student,check,grade} ...

    list                              the exercises: id, time, where, title
    student OUTDIR [--only IDS]       write the student version of the project to OUTDIR
    check IDS                         run the visible checks of exercises on this project
    grade SUBMISSIONS [--csv FILE]    grade every student folder of SUBMISSIONS (or one
                                      project folder) with the hidden checks

IDS is a comma-separated list such as 1.2,5.1, or "all".
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from . import EXERCISES, select
from .grading import check_project, find_submissions, first_failure_text, grade_all
from .runner import NOT_STARTED, PASSED
from .student import ExerciseError, generate

PROJECT = Path(__file__).resolve().parents[2]
WIDTH = 100


def _ids(text):
    if text is None or text.strip() == "all":
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _indent(text: str, prefix: str = "      ") -> str:
    lines = []
    for line in text.rstrip().split("\n"):
        wrapped = textwrap.wrap(line, WIDTH - len(prefix), break_long_words=False,
                                break_on_hyphens=False, subsequent_indent="  ") or [""]
        lines += [prefix + w for w in wrapped]
    return "\n".join(lines)


def render(outcome, *, passed_checks: bool = True) -> str:
    """An exercise's outcome as the student reads it: each failed check with its
    whole message, where it happened and what to look at."""
    head = (f"Exercise {outcome.id} · {outcome.title}: {outcome.points}/{outcome.max_points} "
            f"checks passed" + ("" if outcome.status == PASSED else f" ({outcome.status})"))
    lines = [head, _indent("graded: " + "; ".join(outcome.graded), "  ")]
    if outcome.note:
        lines.append(_indent("note: " + outcome.note, "  "))
    shown = None
    for check in outcome.checks:
        if check.status == PASSED:
            if passed_checks:
                lines.append(f"  ok    {check.name}")
            continue
        lines.append(f"  FAIL  {check.name}  [{check.status}]")
        if (check.message, check.where) == shown:
            lines.append(_indent("the same failure as the check above"))
            continue
        shown = (check.message, check.where)
        if check.status == NOT_STARTED:  # the stub's own message says nothing more
            lines.append(_indent(check.hint))
            continue
        lines.append(_indent(f"{check.error}: {check.message}" if check.error else check.message))
        for where in check.where:
            lines.append(_indent(where))
        if check.hint:
            lines.append(_indent("what to look at: " + check.hint))
        if check.output:
            lines.append(_indent("it printed, last lines:"))
            lines.append(_indent(check.output, "        "))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minblip.exercises",
                                     description="Classroom exercises for minblip.")
    parser.add_argument("--source", type=Path, default=PROJECT,
                        help="the project folder (default: the one this package is in)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the exercises")
    p = sub.add_parser("student", help="write the student version of the project")
    p.add_argument("outdir", type=Path)
    p.add_argument("--only", help="comma-separated exercise ids to hand out (default: all)")
    p = sub.add_parser("check", help="run the visible checks of some exercises on this project")
    p.add_argument("ids", help="comma-separated exercise ids, or 'all'")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per exercise (60)")
    p = sub.add_parser("grade", help="grade students' project folders with the hidden checks")
    p.add_argument("submissions", type=Path,
                   help="a folder with one project folder per student (or one project folder)")
    p.add_argument("--only", help="comma-separated exercise ids (default: all)")
    p.add_argument("--csv", type=Path, help="write points and first failure per student and "
                                            "exercise to this CSV file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per exercise (60)")
    p.add_argument("--jobs", type=int, default=1, help="submissions graded at once (1)")
    args = parser.parse_args(argv)

    try:
        if args.command == "list":
            for e in EXERCISES:
                where = "notebook" if e.in_notebook else ", ".join(
                    dict.fromkeys(r.split("::")[0] for r in e.regions))
                print(f"{e.id:>4}  {e.minutes:>3} min  {where:<28} {e.title}")
            return 0
        if args.command == "student":
            summary = generate(args.source, args.outdir, _ids(args.only))
            print(f"student version written to {args.outdir}: exercises "
                  f"{', '.join(summary['exercises'])}; {len(summary['changed'])} files changed, "
                  f"{len(summary['left_out'])} instructor files left out")
            return 0
        if args.command == "check":
            return _check(args)
        if args.command == "grade":
            return _grade(args)
    except (ExerciseError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


def _check(args) -> int:
    chosen = select(_ids(args.ids))
    print(f"Checking {', '.join(e.id for e in chosen)} in {args.source}: the package code of "
          f"this folder, and the notebook exercises as saved in the .ipynb files (not their "
          f"jupytext .py twins).\n")
    outcomes = check_project(args.source, chosen, limit=args.timeout)
    if outcomes and all(o.fatal for o in outcomes):
        check = outcomes[0].checks[0]
        print("No check could run: the project does not import.")
        print(_indent(f"{check.error}: {check.message}"))
        for where in check.where:
            print(_indent(where))
        print(_indent("what to look at: " + check.hint))
        return 1
    for outcome in outcomes:
        print(render(outcome))
        print()
    done = sum(o.status == PASSED for o in outcomes)
    print(f"{done} of {len(outcomes)} exercises pass their visible checks"
          + ("" if done == len(outcomes) else "; the instructor also grades with hidden checks"))
    return 0 if done == len(outcomes) else 1


def _grade(args) -> int:
    chosen = select(_ids(args.only))
    students = find_submissions(args.submissions)
    print(f"Grading {len(students)} submission(s) in {args.submissions} against {args.source}, "
          f"{len(chosen)} exercise(s), each alone, at most {args.timeout:g} s each. This runs "
          f"the students' code with your permissions: it is not a sandbox.")

    def progress(name, outcomes):
        points = sum(o.points for o in outcomes)
        total = sum(o.max_points for o in outcomes)
        by_status = {}
        for o in outcomes:
            if o.status != PASSED:
                by_status.setdefault(o.status, []).append(o.id)
        bad = [f"{status} {', '.join(ids) if len(ids) <= 6 else f'({len(ids)} exercises)'}"
               for status, ids in by_status.items()]
        print(f"{name}: {points}/{total} points" + (f"; {'; '.join(bad)}" if bad else ""),
              flush=True)

    graded = grade_all(args.submissions, args.source, chosen, limit=args.timeout,
                       jobs=args.jobs, csv_path=args.csv, progress=progress)
    if len(graded) == 1:  # one submission: show every failure in full
        for outcome in next(iter(graded.values())):
            if outcome.status != PASSED:
                print()
                print(render(outcome, passed_checks=False))
    elif args.csv is None:
        for name, outcomes in graded.items():
            for outcome in outcomes:
                if outcome.status != PASSED:
                    first = first_failure_text(outcome).split("\n")[0]
                    print(f"  {name} {outcome.id}: {first[:WIDTH]}")
    if args.csv is not None:
        print(f"points per student and exercise, with the first failure, written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
