"""python -m minblip.exercises {list,student,check,grade} ...

    list                        the exercises: id, time, where, title
    student OUTDIR [--only IDS] write the student version of the project to OUTDIR
    check IDS                   run the (visible) checks of exercises in this project
    grade SUBMISSION            grade a student's project folder with the hidden tests

IDS is a comma-separated list such as 1.2,5.1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import EXERCISES, select
from .grading import existing_tests, grade, run_pytest
from .student import ExerciseError, generate

PROJECT = Path(__file__).resolve().parents[2]


def _ids(text):
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minblip.exercises",
                                     description="Classroom exercises for minblip.")
    parser.add_argument("--source", type=Path, default=PROJECT,
                        help="the instructor's project folder (default: this one)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the exercises")
    p = sub.add_parser("student", help="write the student version of the project")
    p.add_argument("outdir", type=Path)
    p.add_argument("--only", help="comma-separated exercise ids to hand out (default: all)")
    p = sub.add_parser("check", help="run the visible checks of some exercises here")
    p.add_argument("ids", help="comma-separated exercise ids, or 'all'")
    p = sub.add_parser("grade", help="grade a student's project folder")
    p.add_argument("submission", type=Path)
    p.add_argument("--only", help="comma-separated exercise ids (default: all)")
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
            chosen = select(None if args.ids == "all" else _ids(args.ids))
            nodes = [n for e in chosen for n in existing_tests(args.source, e)]
            results = run_pytest(args.source, nodes)
            bad = 0
            for e in chosen:
                for n in existing_tests(args.source, e):
                    outcome, message = results.get(n, ("missing", ""))
                    bad += outcome != "passed"
                    first = message.strip().splitlines()[0] if message.strip() else ""
                    print(f"{e.id:>4}  {outcome:<7} {n.split('::')[1]}  {first[:90]}")
            return 1 if bad else 0
        if args.command == "grade":
            rows = grade(args.submission, args.source, select(_ids(args.only)))
            for r in rows:
                print(f"{r['id']:>4}  {r['passed']}/{r['total']}  {r['title']}")
            done = sum(r["passed"] == r["total"] for r in rows)
            print(f"{done} of {len(rows)} exercises fully passed")
            return 0
    except (ExerciseError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
