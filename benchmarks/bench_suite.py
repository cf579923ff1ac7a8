"""Wall time and peak memory of the two README commands (slow: minutes).

    python benchmarks/bench_suite.py [--python PY] [--threads 1] [--only tests|demo]

* the test command, ``python -m pytest --nbmake tests notebooks``, from the
  repository root (``--python`` picks the interpreter: its environment needs
  pytest and nbmake);
* the demo, ``python -m minblip demo --out TMP --quiet``, into a temporary
  folder that is deleted afterwards; its quality figures (``DEMO_QUALITY``)
  are kept from the metrics.json it wrote.

Each command runs under a small measuring process that starts it, waits, and
reads ``resource.getrusage(RUSAGE_CHILDREN)``: wall time, CPU time and the
peak resident set size (``ru_maxrss``). That peak is the largest single
process among the command and its descendants (a notebook kernel counts on
its own), not their sum. ``OPENBLAS_NUM_THREADS`` (and the OpenMP/MKL
equivalents) are set to ``--threads`` explicitly (default 1, what the tests
use). The exit status is recorded; a failing command still has its time.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common

# The demo's figures that issue 18 set targets for, kept from its metrics.json
# (test split; the compositional split's under "compositional").
DEMO_QUALITY = ("i2t_recall@1", "t2i_recall@1", "itm_hard_negative_accuracy",
                "caption_attribute_accuracy", "caption_position_accuracy")

MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:], cwd=sys.argv[1], stdout=sys.stderr)
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"exit_code": code, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "max_rss_mb": ru.ru_maxrss / 1024}))
"""


def run_measured(cmd: list[str], threads: int, timeout: float) -> dict:
    """Run ``cmd`` under the measuring process; its output goes to our stderr."""
    try:
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(common.ROOT)] + cmd,
                              env=common.thread_env(threads), stdout=subprocess.PIPE,
                              stderr=sys.stderr, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        return {"error": f"measuring process failed (exit {proc.returncode})"}
    result["command"] = " ".join(["python"] + cmd[1:])  # no interpreter path in the JSON
    result["threads"] = threads
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def demo_quality(metrics: dict) -> dict:
    """The figures of DEMO_QUALITY from a demo's metrics.json, both splits, and its steps."""
    out = {key: metrics[key] for key in DEMO_QUALITY}
    out["compositional"] = {key: metrics["compositional"][key] for key in DEMO_QUALITY}
    out["steps"] = metrics["steps"]
    out["train_seconds"] = round(metrics["train_seconds"], 2)
    return out


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def measure(python: str | None = None, threads: int = 1, only: str | None = None,
            timeout: float = 3600) -> dict:
    python = python or sys.executable
    out = {"load_average_start": common.load_average()}
    if only in (None, "tests"):
        print("-- test command: python -m pytest --nbmake tests notebooks --", flush=True)
        if not has_module(python, "nbmake"):
            out["tests"] = {"error": "this interpreter has no nbmake; pass --python (or "
                                     "run_all.py --test-python) with the project's default "
                                     "environment"}
        else:
            out["tests"] = run_measured([python, "-m", "pytest", "--nbmake", "tests",
                                         "notebooks"], threads, timeout)
        print(f"   {out['tests']}", flush=True)
    if only in (None, "demo"):
        print("-- demo: python -m minblip demo --out TMP --quiet --", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out["demo"] = run_measured([python, "-m", "minblip", "demo", "--out", tmp, "--quiet"],
                                       threads, timeout)
            out["demo"]["command"] = "python -m minblip demo --out TMP --quiet"
            metrics = Path(tmp) / "metrics.json"
            if metrics.exists():
                out["demo"]["metrics"] = demo_quality(json.loads(metrics.read_text()))
        print(f"   {out['demo']}", flush=True)
    out["load_average_end"] = common.load_average()
    return out


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", help="interpreter for both commands (default: this one)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--only", choices=["tests", "demo"], help="run one of the two")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    args = p.parse_args(argv)
    common.write_result(args.json, measure(args.python, args.threads, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
