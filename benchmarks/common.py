"""Shared helpers of the benchmark scripts: thread control, worker processes,
interleaved timing and summaries.

Thread counts must be fixed before NumPy loads OpenBLAS, so every measurement
runs in a fresh worker process (the same script with ``--worker``) whose
environment sets ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS``; a worker that uses PyTorch also calls
``torch.set_num_threads``. The parent collects each worker's JSON.

Nothing here asserts a time: the machine may be shared, so the scripts report
medians and ratios of runs interleaved in one process, and the load average.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository being measured
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
THREADS = (1, 2)


def use_repo() -> None:
    """Import minblip (and reference/) from this checkout, whatever is installed."""
    for p in (str(ROOT / "reference"), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """Versions and machine facts to store beside the figures."""
    info = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "load_average": load_average()}
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        info["numpy"] = None
    torch_ok, reason = torch_available()
    if torch_ok:
        import torch
        import transformers
        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    else:
        info["torch"] = None
        info["torch_missing"] = reason
    return info


def torch_available() -> tuple[bool, str | None]:
    """(True, None) when torch and transformers import, else (False, why)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return False, (f"PyTorch reference not available in this environment ({err}); "
                       f"run with the reference environment described in reference/README.md")
    return True, None


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                        if env.get("PYTHONPATH") else []))
    return env


def check_worker_threads(threads: int) -> None:
    """Called by a worker before it imports NumPy: the environment must match."""
    if "numpy" in sys.modules:
        raise RuntimeError("the worker imported NumPy before its thread count was checked")
    for var in THREAD_VARS:
        if os.environ.get(var) != str(threads):
            raise RuntimeError(f"worker for {threads} thread(s) runs with {var}="
                               f"{os.environ.get(var)!r}")


def run_worker(script: str, threads: int, args: list[str] | None = None,
               timeout: float = 1800) -> dict:
    """Run ``script --worker --threads N [args]`` in a fresh process with N
    threads; its printed lines pass through, its figures come back as a dict.
    A failed worker gives {"error": ...} instead of raising."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / script), "--worker",
               "--threads", str(threads), "--result", str(out)] + list(args or [])
        try:
            proc = subprocess.run(cmd, env=thread_env(threads), timeout=timeout,
                                  stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"worker timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
            return {"error": f"worker exited with {proc.returncode}: {tail}"}
        if proc.stderr.strip():
            sys.stderr.write(proc.stderr)
        return read_result(out)


def read_result(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_result(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))


# The demo's recipe as BLIP would train it: the TrainConfig fields by which the demo's
# position changes (minblip.demo.DEMO_RECIPE) depart from BLIP, set as BLIP has them:
# the position table drawn like every weight, added once at the ViT's input, and the
# three losses weighed the same. The two learning studies start from it.
AS_BLIP: dict = {"pos_embed_std": None, "pos_embed_at_output": False,
                 "loss_weights": (1.0, 1.0, 1.0)}


def write_study(script: str, argv, started: float, runs: dict, path, **fields) -> None:
    """Write the runs of a learning study (``demo_recipe.py``, ``position_study.py``)
    atomically to the JSON file ``path``, with the command that made them, ``fields``,
    the machine and the wall time since ``started`` (a ``time.perf_counter()``)."""
    out = {"command": f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:]),
           **fields, "environment": environment(),
           "wall_seconds": round(time.perf_counter() - started, 1), "variants": runs}
    use_repo()
    from minblip.files import write_json_atomic
    write_json_atomic(path, out)
    print(f"wrote {path}")


def interleave(fns: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin: one run of each per
    round, the order rotated every round so none always runs first. Returns
    seconds per run by name. ``warmup`` untimed rounds come first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary_ms(seconds: list[float]) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3),
            "max_ms": round(max(ms), 3), "runs": len(ms)}


def record_times(out: dict, times: dict, torch_ok: bool, reason) -> dict:
    """Into ``out``: minblip's times, and PyTorch's with the paired ratio when the
    twin ran (``times`` from :func:`interleave`), else ``reason`` why it did not."""
    out["minblip"] = summary_ms(times["minblip"])
    if torch_ok:
        out["torch"] = summary_ms(times["torch"])
        out["ratio"] = paired_ratio(times["minblip"], times["torch"])
    else:
        out["torch"] = out["ratio"] = None
        out["reason"] = reason
    return out


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Ratios of the runs of one round (num[i] / den[i]): neighbours in time see
    the same load, so their ratio is steadier than a ratio of medians."""
    ratios = [a / b for a, b in zip(num, den)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), None,
                                                                      max(ratios)]
    return {"median": round(statistics.median(ratios), 3),
            "quartiles": [round(q[0], 3), round(q[2], 3)],
            "of_medians": round(statistics.median(num) / statistics.median(den), 3)}


def measured(result: dict, threads: str) -> tuple[dict | None, str | None]:
    """(a script's figures at this thread count, None), or (None, why there are none)."""
    r = result["per_threads"].get(threads)
    if r is None:
        return None, f"not measured with {threads} thread(s)"
    if "error" in r:
        return None, r["error"]
    return r, None


def ratio_headline(result: dict, threads: str = "1") -> tuple[float | None, str | None]:
    """The median minblip / PyTorch ratio of bench_train_step.py or bench_blip2_step.py."""
    r, why = measured(result, threads)
    if r is None:
        return None, why
    if r["ratio"] is None:
        return None, r["reason"]
    return r["ratio"]["median"], None


def run_script(args, worker, measure) -> int:
    """A script's main: ``--worker`` measures in this process, otherwise ``measure()``
    starts the workers; either way the figures go to the JSON file asked for."""
    if args.worker:
        write_result(args.result, worker(args))
    else:
        write_result(args.json, measure())
    return 0


def print_step_against_torch(r: dict) -> None:
    """The lines bench_train_step.py and bench_blip2_step.py print for one thread count."""
    print(f"   minblip {r['minblip']['median_ms']:.1f} ms (min {r['minblip']['min_ms']:.1f})")
    if r["ratio"] is None:
        print(f"   torch: not measured ({r['reason']})")
        return
    fl = r["first_loss"]
    print(f"   torch   {r['torch']['median_ms']:.1f} ms (min {r['torch']['min_ms']:.1f}); "
          f"first-step loss minblip {fl['minblip']:.6f} vs torch {fl['torch']:.6f}")
    print(f"   ratio minblip/torch: median {r['ratio']['median']:.2f} "
          f"(quartiles {r['ratio']['quartiles'][0]:.2f}-{r['ratio']['quartiles'][1]:.2f}); "
          f"load {r['load_average_start']} -> {r['load_average_end']}")


def worker_args(argv=None):
    """The options every script shares (parent and worker)."""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, nargs="+", default=list(THREADS),
                   help="thread counts to measure (default: 1 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    return p
