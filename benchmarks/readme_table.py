"""Write the performance table of README.md from benchmarks/results.json.

    python benchmarks/readme_table.py [--results PATH] [--readme PATH] [--check]

``run_all.py`` calls this after it writes results.json, so one command
measures and updates the README. The table goes between the two marker
comments ``<!-- performance table -->`` and ``<!-- end of performance table -->``;
everything else in README.md is left as it is. ``--check`` only says whether
the README's table is the one results.json gives (exit status 1 if not).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common

BEGIN = "<!-- performance table -->"
END = "<!-- end of performance table -->"

# (results key, what it is, target text, test of the target or None, how to print)
ROWS = (
    ("train_step_ratio_vs_torch", "BLIP training step, minblip time / PyTorch time",
     "at most 1.5 (aim 1.2)", lambda v: v <= 1.5, "{:.2f}"),
    ("blip2_step_ratio_vs_torch", "BLIP-2 stage-1 step, minblip time / PyTorch time",
     "at most 1.5", lambda v: v <= 1.5, "{:.2f}"),
    ("generation_cache_speedup", "30-token greedy captions: uncached time / cached time",
     "at least 5", lambda v: v >= 5, "{:.1f}"),
    ("matmul_share", "share of a training step inside matrix products", "-", None, "{:.0%}"),
    ("demo_seconds", "`python -m minblip demo`, wall time", "under 5 min",
     lambda v: v < 300, "{:.0f} s"),
    ("demo_peak_memory_mb", "`python -m minblip demo`, peak memory", "under 1 GB",
     lambda v: v < 1024, "{:.0f} MB"),
    ("test_command_seconds", "the README's test command, wall time", "under 10 min",
     lambda v: v < 600, "{:.0f} s"),
)


def _cell(value, fmt: str) -> str:
    return "not measured" if value is None else fmt.format(value)


def render(results: dict) -> str:
    """The markdown between the markers, from a results.json dict."""
    by_threads = results.get("by_threads", {})
    lines = ["| figure | target | 1 BLAS thread | 2 BLAS threads | target met |",
             "|---|---|---|---|---|"]
    for key, what, target, meets, fmt in ROWS:
        per = by_threads.get(key, {})
        one = per.get("1", results.get(key))
        two = per.get("2")
        if meets is None:
            verdict = "-"
        else:
            # the target is for the setting minblip uses (1 thread); the 2-thread ratio
            # is held to it too where the issue asks (the training step)
            measured = [v for v in (one, two) if v is not None]
            verdict = ("not measured" if not measured
                       else "yes" if all(meets(v) for v in measured) else "**no**")
        lines.append(f"| {what} | {target} | {_cell(one, fmt)} | "
                     f"{_cell(two, fmt) if key in by_threads else '-'} | {verdict} |")
    env = results.get("environment", {})
    load = results.get("load_average_start"), results.get("load_average_end")
    lines += ["",
              f"Measured {results.get('date', '?')[:10]} by `{results.get('command', '?')}` "
              f"on {env.get('cpus', '?')} cores (NumPy {env.get('numpy', '?')}, PyTorch "
              f"{env.get('torch') or 'absent'}), load average {load[0]} at the start and "
              f"{load[1]} at the end. The demo and the test command run with one BLAS thread, "
              f"minblip's default. Figures not measured are explained under `reasons` in "
              f"[benchmarks/results.json](benchmarks/results.json)."]
    return "\n".join(lines)


def replace_between_markers(text: str, table: str, where: str, begin: str = BEGIN,
                            end: str = END) -> str:
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{where}: expected one '{begin}' followed by one '{end}'")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def update_readme(results_path: Path, readme_path: Path, check: bool = False) -> bool:
    """Rewrite the table (or, with ``check``, compare). True if the README is current."""
    results = json.loads(results_path.read_text())
    old = readme_path.read_text()
    new = replace_between_markers(old, render(results), str(readme_path))
    if check or new == old:
        return new == old
    common.use_repo()  # minblip from this checkout, imported only to write
    from minblip.files import write_text_atomic
    write_text_atomic(readme_path, new)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(common.ROOT / "benchmarks" / "results.json"))
    p.add_argument("--readme", default=str(common.ROOT / "README.md"))
    p.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = p.parse_args(argv)
    current = update_readme(Path(args.results), Path(args.readme), check=args.check)
    if args.check:
        print("README table is current" if current else "README table differs from results.json")
        return 0 if current else 1
    print(f"wrote the performance table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
