"""Run every benchmark and write benchmarks/results.json.

    python benchmarks/run_all.py [--skip-slow] [--repeats N] [--test-python PY]

Runs, in this order: the training step against the PyTorch twin, the BLIP-2
stage-1 step against its twin, caption generation with and without the cache,
the matrix-product share, the candidate kernels and (unless ``--skip-slow``)
the test command, the demo (its time, memory and quality figures) and the
largest model whose demo recipe fits in 10 minutes (``largest_model.py``).
Each prints its figures as it goes. Last, the performance table of README.md
is rewritten from the new results
(``readme_table.py``; ``--no-readme`` leaves it alone). The headline
figures are taken at one BLAS thread (the setting the tests and notebooks
use); every script also measures two threads, and results.json keeps both
under ``details``. A figure that cannot be measured is null, with the reason
under ``reasons``. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import bench_blip2_step
import bench_generation
import bench_kernels
import bench_matmul_share
import bench_suite
import bench_train_step
import common
import largest_model
import readme_table

RESULTS = common.ROOT / "benchmarks" / "results.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-slow", action="store_true",
                   help="skip the test command and the demo (minutes); their figures are null")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per variant in every script (default: each script's own)")
    p.add_argument("--test-python", default=None,
                   help="interpreter for the test command and the demo (needs pytest and "
                        "nbmake; default: this one)")
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    p.add_argument("--no-readme", action="store_true",
                   help="do not rewrite the performance table of README.md")
    args = p.parse_args(argv)

    started = time.perf_counter()
    env = common.environment()
    details = {}
    reasons = {}
    headline = {}

    def record(key, value_reason):
        value, reason = value_reason
        headline[key] = value
        if value is None:
            reasons[key] = reason

    details["train_step"] = bench_train_step.measure(common.THREADS, args.repeats)
    record("train_step_ratio_vs_torch", bench_train_step.headline(details["train_step"]))
    details["blip2_step"] = bench_blip2_step.measure(common.THREADS, args.repeats)
    record("blip2_step_ratio_vs_torch", bench_blip2_step.headline(details["blip2_step"]))
    details["generation"] = bench_generation.measure(common.THREADS, args.repeats)
    record("generation_cache_speedup", bench_generation.headline(details["generation"]))
    details["matmul_share"] = bench_matmul_share.measure(common.THREADS, args.repeats)
    record("matmul_share", bench_matmul_share.headline(details["matmul_share"]))
    details["kernels"] = bench_kernels.measure((1,), args.repeats)

    quality_keys = [f"demo_{key}" for key in bench_suite.DEMO_QUALITY]
    if args.skip_slow:
        for key in ("demo_peak_memory_mb", "demo_seconds", "test_command_seconds",
                    *quality_keys, "largest_model"):
            record(key, (None, "skipped (run_all.py --skip-slow)"))
    else:
        slow = details["suite"] = bench_suite.measure(args.test_python, threads=1)
        for key, part, field in (("demo_peak_memory_mb", "demo", "max_rss_mb"),
                                 ("demo_seconds", "demo", "wall_s"),
                                 ("test_command_seconds", "tests", "wall_s")):
            r = slow[part]
            record(key, (r[field], None) if "error" not in r else (None, r["error"]))
        demo = slow["demo"]
        for key in bench_suite.DEMO_QUALITY:
            record(f"demo_{key}", (demo["metrics"][key], None) if "metrics" in demo
                   else (None, demo.get("error", "the demo wrote no metrics.json")))
        largest = details["largest_model"] = largest_model.measure(10.0, quick=False)
        record("largest_model", (largest_model.summary(largest), None) if "error" not in largest
               else (None, largest["error"]))

    by_threads = {}
    for key, name, fn in (("train_step_ratio_vs_torch", "train_step", bench_train_step.headline),
                          ("blip2_step_ratio_vs_torch", "blip2_step", bench_blip2_step.headline),
                          ("generation_cache_speedup", "generation", bench_generation.headline),
                          ("matmul_share", "matmul_share", bench_matmul_share.headline)):
        by_threads[key] = {str(n): fn(details[name], str(n))[0] for n in common.THREADS}

    result = {
        **headline,
        "reasons": reasons,
        "by_threads": by_threads,
        "headline_threads": 1,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/run_all.py" + (" --skip-slow" if args.skip_slow else ""),
        "environment": env,
        "load_average_start": env["load_average"],
        "load_average_end": common.load_average(),
        "seconds": round(time.perf_counter() - started, 1),
        "details": details,
    }
    common.use_repo()
    from minblip.files import write_text_atomic
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print("\n== headline (1 BLAS thread; both thread counts under by_threads) ==")
    for key, value in headline.items():
        print(f"   {key:<28} {value}" + (f"   ({reasons[key]})" if key in reasons else ""))
    print(f"   load average {result['load_average_start']} -> {result['load_average_end']}; "
          f"wrote {args.out}")
    if not args.no_readme:
        readme = common.ROOT / "README.md"
        readme_table.update_readme(Path(args.out), readme)
        print(f"   rewrote the performance table of {readme.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
