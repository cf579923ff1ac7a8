"""The largest BLIP a student can pretrain in 10 minutes on the project's CPU, and
what it reaches.

    python benchmarks/largest_model.py [--minutes 10] [--json PATH] [--quick]

"Can pretrain" means: the demo's whole recipe (``minblip.demo.demo_config()``:
its data, steps, batch, schedule; only the width and depth grow) finishes
within the budget, evaluation included. The candidates are the demo's model
made wider and deeper (widths 64, 96, 128, 192, 256 at depth 2; then 4 layers
at each width; 4 heads throughout). For each, a worker process times a few
training steps; the largest candidate (by parameters) whose steps fit in the
budget is then trained in full and evaluated on the test split, the way
``python -m minblip demo`` evaluates. Everything runs with one BLAS thread
(minblip's default; ``bench_scaling.py`` measures when a second one would
pay), and the budget is counted in CPU seconds of that thread, which is the
wall time on a free core whatever else the machine runs.

``--quick`` shrinks everything (a tenth of the steps and of the budget, 600
training images) to check that the script works; its figures mean nothing.
``run_all.py`` runs the full version with the slow part and puts the result
in ``results.json`` (``largest_model``), from which the README's table gets
its row. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import common

WIDTHS = (64, 96, 128, 192, 256)
DEPTHS = (2, 4)
PROBE_STEPS = 6
REPORTED = ("i2t_recall@1", "t2i_recall@1", "itm_hard_negative_accuracy",
            "caption_attribute_accuracy", "caption_position_accuracy")


def candidates() -> list[dict]:
    return [{"width": w, "depth": d} for d in DEPTHS for w in WIDTHS]


def config(candidate: dict, quick: bool):
    from minblip.demo import demo_config
    cfg = demo_config(width=candidate["width"], depth=candidate["depth"])
    if quick:
        import dataclasses
        steps = max(20, cfg.steps // 10)
        cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 10),
                                  n_train=600, n_test=50, n_val=10)
    return cfg


def probe_worker(args) -> dict:
    """CPU seconds of one candidate's parts: building the run (data, model), one
    training step (after two warm-up steps), and the evaluation, timed on the
    untrained model (whose captions run to full length: the most it can cost)."""
    common.check_worker_threads(1)
    common.use_repo()
    from minblip.evaluate import evaluate_split
    from minblip.train import blip_trainer
    candidate = json.loads(args.candidate)
    start = time.process_time()
    trainer = blip_trainer(config(candidate, args.quick))
    setup = time.process_time() - start
    trainer.run(until=2, progress=False)
    start = time.process_time()
    trainer.run(until=2 + PROBE_STEPS, progress=False)
    step = (time.process_time() - start) / PROBE_STEPS
    cfg, task = trainer.cfg, trainer.task
    start = time.process_time()
    evaluate_split(trainer.model, task.tokenizer, task.dataset.test, cfg.image_size, seed=cfg.seed)
    return {"params": trainer.model.param_count(), "steps": cfg.steps,
            "setup_cpu_s": setup, "step_cpu_s": step, "eval_cpu_s": time.process_time() - start}


def train_worker(args) -> dict:
    """The whole recipe for one candidate, evaluated on the test split."""
    common.check_worker_threads(1)
    common.use_repo()
    from minblip.evaluate import evaluate_split
    from minblip.train import blip_trainer
    candidate = json.loads(args.candidate)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer = blip_trainer(config(candidate, args.quick))
    trainer.run(progress=False)
    cfg, task = trainer.cfg, trainer.task
    metrics, _ = evaluate_split(trainer.model, task.tokenizer, task.dataset.test, cfg.image_size,
                                seed=cfg.seed)
    return {"params": trainer.model.param_count(), "steps": trainer.step,
            "cpu_s": round(time.process_time() - cpu, 1),
            "wall_s": round(time.perf_counter() - wall, 1),
            "load_average": common.load_average(),
            "metrics": {k: metrics[k] for k in REPORTED}}


def worker(args) -> dict:
    return {"probe": probe_worker, "train": train_worker}[args.mode](args)


def measure(minutes: float, quick: bool) -> dict:
    budget = 60.0 * minutes * (0.1 if quick else 1.0)
    flag = ["--quick"] if quick else []
    print(f"-- the largest model whose whole demo recipe fits in {budget:.0f} CPU seconds "
          f"(1 BLAS thread) --", flush=True)
    probes = []
    for cand in candidates():
        r = common.run_worker("largest_model.py", 1, ["--mode", "probe", "--candidate",
                                                      json.dumps(cand)] + flag)
        if "error" in r:
            print(f"   width {cand['width']} depth {cand['depth']}: probe failed: {r['error']}")
            continue
        r["predicted_cpu_s"] = round(r["setup_cpu_s"] + r["steps"] * r["step_cpu_s"]
                                     + r["eval_cpu_s"], 1)
        probes.append({**cand, **r})
        print(f"   width {cand['width']:>4} depth {cand['depth']}: {r['params']:>10,} parameters, "
              f"{1e3 * r['step_cpu_s']:7.1f} ms a step, the whole run about "
              f"{r['predicted_cpu_s']:6.0f} s", flush=True)
    fitting = [p for p in probes if p["predicted_cpu_s"] <= budget]
    if not fitting:
        return {"error": f"no candidate fits in {budget:.0f} CPU seconds", "probes": probes}
    largest = max(fitting, key=lambda p: p["params"])
    choice = {"width": largest["width"], "depth": largest["depth"]}
    run = common.run_worker("largest_model.py", 1, ["--mode", "train", "--candidate",
                                                    json.dumps(choice)] + flag, timeout=7200)
    if "error" in run:
        return {"error": run["error"], "probes": probes}
    m = run["metrics"]
    print(f"   largest that fits: width {choice['width']}, depth {choice['depth']}, "
          f"{run['params']:,} parameters; {run['steps']} steps, {run['cpu_s']:.0f} CPU s "
          f"({run['wall_s']:.0f} s wall); recall@1 {m['i2t_recall@1']:.3f} / "
          f"{m['t2i_recall@1']:.3f}, caption attributes {m['caption_attribute_accuracy']:.3f}",
          flush=True)
    return {"budget_cpu_s": budget, "quick": quick, "threads": 1, "probes": probes, **choice,
            "run": run}


def summary(result: dict) -> dict:
    """The figures the README's table shows, from :func:`measure`'s result."""
    run = result["run"]
    return {"width": result["width"], "depth": result["depth"], "params": run["params"],
            "steps": run["steps"], "cpu_s": run["cpu_s"], **run["metrics"]}


def main(argv=None) -> int:
    p = common.worker_args()
    p.set_defaults(threads=[1])
    p.add_argument("--minutes", type=float, default=10.0, help="the budget (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a tenth of the steps and of the budget: checks the script, nothing more")
    p.add_argument("--mode", choices=("probe", "train"), help=argparse.SUPPRESS)
    p.add_argument("--candidate", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return common.run_script(args, worker, lambda: measure(args.minutes, args.quick))


if __name__ == "__main__":
    sys.exit(main())
