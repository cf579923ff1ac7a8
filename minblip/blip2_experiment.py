"""BLIP-2's ablations on the built-in world, over seeds: ``python -m minblip blip2
--ablation``.

Three questions of the paper (Li et al. 2023), each measured on every seed with
the pieces of :mod:`minblip.blip2_pipeline` (one world, one frozen ViT and one
pair of frozen language models per seed, shared by every variant of that seed):

1. **Does stage 1 matter for stage 2?** (section 4.5, Figure 5: without the
   representation-learning stage, zero-shot VQA drops sharply for both LLM
   types, and the OPT model suffers catastrophic forgetting as training goes on.)
   Stage 2 from the stage-1 Q-Former (BLIP-2's recipe), from a fresh Q-Former,
   and from stage 1 with the language model trained too ("unfrozen", freezing
   nothing the LM holds), for each language-model type, as curves of caption
   attribute accuracy and zero-shot answer accuracy against stage-2 steps.
2. **ITG's effect on stage-1 retrieval** (Table 6: ITC + ITM with and without
   ITG).
3. **The number of learned queries** (the paper uses 32): 1, 4, 8 and 32,
   against retrieval and the CPU time of a stage-1 step.

Two more stage-1 variants measure what limits stage 1 on this world: a weaker
frozen ViT (the short ITC-only BLIP minblip froze before, ``weak_vision``) and
other learning rates (``stage1_lrs``); every stage-1 run also records its
recall@1 curve against steps.

:func:`run_ablation` schedules every training of every seed as a task (in
``jobs`` worker processes, or here with ``jobs=1``; the numbers are the same),
:func:`summarize` averages the seeds (mean, sample std, min, max, per-seed
values, and the paired differences within a seed), :func:`format_ablation_tables`
writes the tables in markdown and :func:`write_report` the report folder.
docs/blip2_results.md reports a run of the default command.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import world
from .blip2_pipeline import (STAGE2_INITS, Blip2RunConfig, blip_itc_recall,
                             checkpoint_world, pretrain_language_models,
                             train_and_evaluate_stage2, vision_and_stage1)
from .files import write_json_atomic, write_text_atomic
from .report import new_figure, save_figure
from .train_blip2 import pretrained_vision

INIT_LABELS = {"stage1": "from stage 1 (BLIP-2)", "fresh": "fresh Q-Former (no stage 1)",
               "unfrozen": "from stage 1, LM unfrozen"}


@dataclass
class AblationConfig:
    """The three ablations: the base run, the seeds, the variants, and how often
    the stage-2 curves are measured (greedy captions, to keep the many
    evaluations cheap; the main run's figures use beam search)."""

    run: Blip2RunConfig = field(default_factory=Blip2RunConfig)
    seeds: tuple = (0, 1, 2)
    stage2_inits: tuple = STAGE2_INITS
    queries: tuple = (1, 4, 8, 32)
    stage1_lrs: tuple = ()  # learning rates besides the run's own (e.g. (1e-3, 4e-3))
    # the frozen ViT minblip used before: a short, narrow ITC-only BLIP (empty: no such variant)
    weak_vision: dict = field(default_factory=lambda: dict(
        vision_steps=1500, vision_width=32, vision_depth=1, vision_heads=2, vision_lr=3e-3,
        vision_warmup=20, vision_init_std=0.1))
    stage1_points: int = 5        # curve points per stage-1 run, evenly spaced
    stage2_points: int = 5        # curve points per stage-2 run, evenly spaced

    def __post_init__(self):
        if not isinstance(self.run, Blip2RunConfig):
            raise TypeError(f"AblationConfig.run: expected a Blip2RunConfig, got "
                            f"{type(self.run).__name__}")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.stage2_inits, self.queries = tuple(self.stage2_inits), tuple(self.queries)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"AblationConfig.seeds: expected distinct seeds, got {self.seeds}")
        if any(i not in STAGE2_INITS for i in self.stage2_inits) or not self.stage2_inits:
            raise ValueError(f"AblationConfig.stage2_inits: expected some of {STAGE2_INITS}, "
                             f"got {self.stage2_inits}")
        if not self.queries or any(isinstance(q, bool) or not isinstance(q, int) or q < 1
                                   for q in self.queries):
            raise ValueError(f"AblationConfig.queries: expected positive ints, got "
                             f"{self.queries}")
        self.stage1_lrs = tuple(float(lr) for lr in self.stage1_lrs)
        if any(not lr > 0 for lr in self.stage1_lrs):
            raise ValueError(f"AblationConfig.stage1_lrs: expected positive numbers, got "
                             f"{self.stage1_lrs}")
        self.seed_run(0, **self.weak_vision)  # the weak ViT's fields must make a valid run
        for name, steps in (("stage1_points", self.run.stage1_steps),
                            ("stage2_points", self.run.stage2_steps)):
            points = getattr(self, name)
            world.check_int(name, points, 1)
            if steps % points:
                raise ValueError(f"AblationConfig: {name} ({points}) must divide the "
                                 f"{name[:6]} steps ({steps})")

    def seed_run(self, seed: int, **changes) -> Blip2RunConfig:
        return dataclasses.replace(self.run, seed=seed, **changes)

    def stage1_variants(self) -> dict:
        """name -> (the frozen ViT it reads, "default" or "weak"; changes of the run
        config): the base, without ITG, each query count, each learning rate, and
        the base on the weak ViT."""
        base = self.run
        out = {"base": ("default", {}),
               "no_itg": ("default", {"stage1_weights": base.stage1_weights[:2] + (0.0,)})}
        for q in self.queries:
            if q != base.num_queries:
                out[f"queries_{q}"] = ("default", {"num_queries": q})
        for lr in self.stage1_lrs:
            if lr != base.stage1_lr:
                out[f"lr_{lr:g}"] = ("default", {"stage1_lr": lr})
        if self.weak_vision:
            out["weak_vision"] = ("weak", {})
        return out

    def to_dict(self) -> dict:
        return {"run": self.run.to_dict(), "seeds": list(self.seeds),
                "stage2_inits": list(self.stage2_inits), "queries": list(self.queries),
                "stage1_lrs": list(self.stage1_lrs), "weak_vision": dict(self.weak_vision),
                "stage1_points": self.stage1_points, "stage2_points": self.stage2_points}


# ---------------------------------------------------------------------------------------
# The tasks: plain functions of picklable arguments, run here or in a worker
# ---------------------------------------------------------------------------------------

def _vision_task(cfg: Blip2RunConfig, vision_checkpoint) -> dict:
    cpu0 = time.process_time()
    if vision_checkpoint is not None:
        vision = pretrained_vision(vision_checkpoint)
        data = checkpoint_world(vision.train_config, cfg.n_train, cfg.n_test)
    else:
        data = world.make_dataset(cfg.n_train, 0, cfg.n_test, seed=cfg.seed,
                                  image_size=cfg.image_size)
        vision = pretrained_vision(dataset=data, **cfg.vision_overrides())
    vision.history = None  # the curves stay here: only the model travels
    return {"vision": vision, "data": data, "blip_recall": blip_itc_recall(vision, data),
            "cpu": time.process_time() - cpu0}


def _stage1_task(cfg: Blip2RunConfig, data, vision, points: int) -> dict:
    part = vision_and_stage1(cfg, data, vision, eval_every=cfg.stage1_steps // points)
    return {"model": part["stage1"].model, "recall": part["recall"], "curve": part["curve"],
            "cpu_per_step": part["stage1_cpu_per_step"], "cpu": part["cpu"]}


def _lm_task(cfg: Blip2RunConfig) -> dict:
    out = pretrain_language_models(cfg)
    return {**{k: {"lm": out[k]["lm"], "final_loss": float(np.mean(out[k]["losses"][-50:]))}
               for k in cfg.language_models}, "cpu": out["cpu"]}


def _stage2_task(cfg: Blip2RunConfig, kind: str, init: str, lm, stage1_model, vit, data,
                 points: int) -> dict:
    # a copy: "unfrozen" trains the LM, and with jobs=1 the next run gets the same object
    out = train_and_evaluate_stage2(cfg, kind, copy.deepcopy(lm), stage1_model, vit, data,
                                    init=init, eval_every=cfg.stage2_steps // points,
                                    eval_method="greedy")
    keep = ("stage2_caption_attribute_accuracy", "zero_shot_answer_accuracy",
            "zero_shot_blind_accuracy", "zero_shot_chance_accuracy", "trainable_parameters",
            "total_parameters", "stage2_final_loss")
    return {"metrics": {k: out["metrics"][k] for k in keep}, "curve": out["curve"],
            "cpu": out["cpu"]}


class _Scheduler:
    """Runs tasks with dependencies: ``jobs`` worker processes (spawned, one BLAS
    thread each), or this process when ``jobs=1``. ``add(key, fn, args_fn, needs)``
    queues a task that starts once every key in ``needs`` has a result;
    ``args_fn(results)`` builds its arguments from them."""

    def __init__(self, jobs: int, log):
        self.jobs, self.log = jobs, log
        self.waiting, self.results = {}, {}

    def add(self, key, fn, args_fn, needs=()):
        self.waiting[key] = (fn, args_fn, tuple(needs))

    def _ready(self):
        return [k for k, (_, _, needs) in self.waiting.items()
                if all(n in self.results for n in needs)]

    def run(self) -> dict:
        if self.jobs == 1:
            while self.waiting:
                key = self._ready()[0]
                fn, args_fn, _ = self.waiting.pop(key)
                self._done(key, fn(*args_fn(self.results)))
            return self.results
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read by each worker at import
        pool = ProcessPoolExecutor(max_workers=self.jobs,
                                   mp_context=multiprocessing.get_context("spawn"))
        running = {}
        try:
            while self.waiting or running:
                for key in self._ready():
                    fn, args_fn, _ = self.waiting.pop(key)
                    running[pool.submit(fn, *args_fn(self.results))] = key
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    self._done(running.pop(future), future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return self.results

    def _done(self, key, value):
        self.results[key] = value
        self.log(f"  done: {' '.join(str(k) for k in key)} ({value['cpu']:.0f} s CPU)")


def run_seeds(cfg: AblationConfig, vision_checkpoint=None, jobs: int = 1, log=None) -> dict:
    """Every training of every seed; returns {task key: result}. Keys:
    (seed, "vision", "default" | "weak"), (seed, "stage1", variant), (seed, "lms"),
    (seed, "stage2", lm, init). The weak ViT trains on the same world (with a
    vision checkpoint there is no weak variant: the checkpoint is the ViT)."""
    log = log if log is not None else (lambda line: None)
    sched = _Scheduler(jobs, log)
    variants = cfg.stage1_variants()
    if vision_checkpoint is not None:
        variants.pop("weak_vision", None)
    for seed in cfg.seeds:
        run = cfg.seed_run(seed)
        vision = (seed, "vision", "default")
        sched.add(vision, _vision_task, lambda r, run=run: (run, vision_checkpoint))
        if "weak_vision" in variants:
            sched.add((seed, "vision", "weak"), _vision_task,
                      lambda r, s=seed: (cfg.seed_run(s, **cfg.weak_vision), None))
        for name, (which, changes) in variants.items():
            variant = cfg.seed_run(seed, **changes)
            key = (seed, "vision", which)
            sched.add((seed, "stage1", name), _stage1_task,
                      lambda r, v=variant, k=key: (v, r[k]["data"], r[k]["vision"],
                                                   cfg.stage1_points),
                      needs=[key])
        sched.add((seed, "lms"), _lm_task, lambda r, run=run: (run,))
        for kind in run.language_models:
            for init in cfg.stage2_inits:
                sched.add((seed, "stage2", kind, init), _stage2_task,
                          lambda r, run=run, s=seed, k=kind, i=init: (
                              run, k, i, r[(s, "lms")][k]["lm"],
                              r[(s, "stage1", "base")]["model"],
                              r[(s, "vision", "default")]["vision"].encoder,
                              r[(s, "vision", "default")]["data"], cfg.stage2_points),
                          needs=[(seed, "lms"), (seed, "stage1", "base"),
                                 (seed, "vision", "default")])
    return sched.run()


# ---------------------------------------------------------------------------------------
# Averaging over seeds
# ---------------------------------------------------------------------------------------

def _spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": float(np.min(v)), "max": float(np.max(v)), "values": v.tolist()}


def summarize(cfg: AblationConfig, results: dict) -> dict:
    """Mean and spread over the seeds of every measured number (see the module
    docstring), with the paired differences of each seed."""
    seeds, run = cfg.seeds, cfg.run
    out = {"config": cfg.to_dict(), "seeds": list(seeds)}

    def stage1(name, key):
        return [results[(s, "stage1", name)]["recall"][key] for s in seeds]

    def stage1_entry(name):
        return {**{f"{d}_recall@{k}": _spread(stage1(name, f"itc_{d}_recall@{k}"))
                   for d in ("i2t", "t2i") for k in (1, 5)},
                "ms_per_step": _spread([1e3 * results[(s, "stage1", name)]["cpu_per_step"]
                                        for s in seeds]),
                "curve": {key: _spread_rows([[p[key] for p in results[(s, "stage1", name)][
                    "curve"]] for s in seeds]) for key in ("step", "i2t_recall@1",
                                                           "t2i_recall@1", "train_cpu_seconds")}}

    out["stage1_variants"] = {name: stage1_entry(name) for name in
                              sorted({k[2] for k in results if k[1] == "stage1"})}
    # what the frozen ViT offers (its BLIP's own ITC) next to what stage 1 makes of it
    out["vision"] = {}
    for which, name in (("default", "base"), ("weak", "weak_vision")):
        if (seeds[0], "vision", which) in results:
            out["vision"][which] = {
                **{f"blip_{d}_recall@1": _spread([results[(s, "vision", which)]["blip_recall"][
                    f"{d}_recall@1"] for s in seeds]) for d in ("i2t", "t2i")},
                **{f"stage1_{d}_recall@1": _spread(stage1(name, f"itc_{d}_recall@1"))
                   for d in ("i2t", "t2i")}}

    # the three stage-1 questions name the variants that answer them
    out["queries"] = {str(q): "base" if q == run.num_queries else f"queries_{q}"
                      for q in cfg.queries}
    out["learning_rates"] = {f"{run.stage1_lr:g}": "base",
                             **{f"{lr:g}": f"lr_{lr:g}" for lr in cfg.stage1_lrs
                                if f"lr_{lr:g}" in out["stage1_variants"]}}
    out["itg"] = {"with_itg": "base", "without_itg": "no_itg",
                  "difference": {f"{d}_recall@1": _spread(np.subtract(
                      stage1("base", f"itc_{d}_recall@1"), stage1("no_itg", f"itc_{d}_recall@1")))
                      for d in ("i2t", "t2i")}}
    out["stage2"] = {}
    for kind in run.language_models:
        out["stage2"][kind] = {}
        for init in cfg.stage2_inits:
            res = [results[(s, "stage2", kind, init)] for s in seeds]
            entry = {k: _spread([r["metrics"][k] for r in res]) for k in res[0]["metrics"]}
            entry["curve"] = {k: _spread_rows([[p[k] for p in r["curve"]] for r in res])
                              for k in ("step", "caption_attribute_accuracy",
                                        "zero_shot_answer_accuracy")}
            out["stage2"][kind][init] = entry
        if "stage1" in cfg.stage2_inits:
            out["stage2"][kind]["differences_vs_stage1"] = {
                init: {k: _spread([results[(s, "stage2", kind, init)]["metrics"][k]
                                   - results[(s, "stage2", kind, "stage1")]["metrics"][k]
                                   for s in seeds])
                       for k in ("stage2_caption_attribute_accuracy",
                                 "zero_shot_answer_accuracy")}
                for init in cfg.stage2_inits if init != "stage1"}
    out["lm_final_loss"] = {k: _spread([results[(s, "lms")][k]["final_loss"] for s in seeds])
                            for k in run.language_models}
    out["cpu_seconds"] = float(sum(r["cpu"] for r in results.values()))
    return out


def _spread_rows(rows) -> dict:
    """Per-point spread of equally long curves (one row per seed)."""
    a = np.asarray(rows, dtype=np.float64)
    return {"mean": a.mean(axis=0).tolist(),
            "std": (a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])).tolist(),
            "values": a.tolist()}


# ---------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------

def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _signed(s: dict) -> str:
    wins = sum(v > 0 for v in s["values"])
    return (f"{100 * s['mean']:+.1f} ± {100 * s['std']:.1f} "
            f"({wins}/{len(s['values'])})").replace("-", "−")


def format_ablation_tables(summary: dict) -> str:
    """The three ablations in markdown (percent, mean ± sample std over the seeds)."""
    n = len(summary["seeds"])
    lines = [f"### 1. Stage 2 with and without stage 1 (final step, greedy captions, {n} seeds)",
             "", "| language model | stage 2 starts | caption attribute accuracy | "
                 "zero-shot answers | blind | trainable / total parameters |",
             "|---|---|---:|---:|---:|---:|"]
    for kind, per_init in summary["stage2"].items():
        for init, e in per_init.items():
            if init == "differences_vs_stage1":
                continue
            lines.append(f"| {kind} | {INIT_LABELS[init]} | "
                         f"{_pm(e['stage2_caption_attribute_accuracy'])} | "
                         f"{_pm(e['zero_shot_answer_accuracy'])} | "
                         f"{_pm(e['zero_shot_blind_accuracy'])} | "
                         f"{e['trainable_parameters']['mean']:,.0f} / "
                         f"{e['total_parameters']['mean']:,.0f} |")
    lines += ["", "Paired differences against stage 2 from stage 1, per seed (percentage "
                  "points; in brackets the seeds where the variant scored higher):", "",
              "| language model | variant | caption attribute accuracy | zero-shot answers |",
              "|---|---|---:|---:|"]
    for kind, per_init in summary["stage2"].items():
        for init, d in per_init.get("differences_vs_stage1", {}).items():
            lines.append(f"| {kind} | {INIT_LABELS[init]} | "
                         f"{_signed(d['stage2_caption_attribute_accuracy'])} | "
                         f"{_signed(d['zero_shot_answer_accuracy'])} |")
    variants, itg = summary["stage1_variants"], summary["itg"]
    lines += ["", f"### 2. ITG's effect on stage-1 retrieval (ITC recall, {n} seeds)", "",
              "| stage-1 objectives | image→text R@1 | text→image R@1 | image→text R@5 | "
              "text→image R@5 | CPU ms per step |", "|---|---:|---:|---:|---:|---:|"]
    for label, name in (("ITC + ITM + ITG", itg["with_itg"]), ("ITC + ITM", itg["without_itg"])):
        e = variants[name]
        lines.append(f"| {label} | {_pm(e['i2t_recall@1'])} | {_pm(e['t2i_recall@1'])} | "
                     f"{_pm(e['i2t_recall@5'])} | {_pm(e['t2i_recall@5'])} | "
                     f"{e['ms_per_step']['mean']:.0f} |")
    d = itg["difference"]
    lines.append(f"| difference (with − without) | {_signed(d['i2t_recall@1'])} | "
                 f"{_signed(d['t2i_recall@1'])} | | | |")
    lines += ["", f"### 3. The number of queries (stage 1, ITC recall, {n} seeds)", "",
              "| queries | image→text R@1 | text→image R@1 | CPU ms per stage-1 step |",
              "|---:|---:|---:|---:|"]
    for q, name in sorted(summary["queries"].items(), key=lambda kv: int(kv[0])):
        e = variants[name]
        lines.append(f"| {q} | {_pm(e['i2t_recall@1'])} | {_pm(e['t2i_recall@1'])} | "
                     f"{_pm(e['ms_per_step'], 1.0, 0)} |")
    lines += ["", f"### What limits stage 1 (ITC recall@1, {n} seeds)", "",
              "| frozen ViT | its BLIP's own ITC R@1 (i2t / t2i) | stage 1 on it (i2t / t2i) |",
              "|---|---:|---:|"]
    for which, e in summary["vision"].items():
        lines.append(f"| {which} | {_pm(e['blip_i2t_recall@1'])} / "
                     f"{_pm(e['blip_t2i_recall@1'])} | {_pm(e['stage1_i2t_recall@1'])} / "
                     f"{_pm(e['stage1_t2i_recall@1'])} |")
    lines += ["", "| stage-1 learning rate | image→text R@1 | text→image R@1 |", "|---:|---:|---:|"]
    for lr, name in sorted(summary["learning_rates"].items(), key=lambda kv: float(kv[0])):
        e = variants[name]
        lines.append(f"| {lr} | {_pm(e['i2t_recall@1'])} | {_pm(e['t2i_recall@1'])} |")
    curve = variants["base"]["curve"]
    lines += ["", "| stage-1 step (default run) | "
              + " | ".join(f"{s:.0f}" for s in curve["step"]["mean"]) + " |",
              "|---|" + "---:|" * len(curve["step"]["mean"]),
              "| image→text R@1 | " + " | ".join(
                  f"{100 * m:.1f} ± {100 * sd:.1f}" for m, sd in
                  zip(curve["i2t_recall@1"]["mean"], curve["i2t_recall@1"]["std"])) + " |",
              "| text→image R@1 | " + " | ".join(
                  f"{100 * m:.1f} ± {100 * sd:.1f}" for m, sd in
                  zip(curve["t2i_recall@1"]["mean"], curve["t2i_recall@1"]["std"])) + " |"]
    return "\n".join(lines)


def plot_stage2_curves(summary: dict):
    """Caption accuracy and zero-shot answer accuracy against stage-2 steps, one
    row per language model, one line per start (mean over seeds, band: ± std)."""
    kinds = list(summary["stage2"])
    fig, axes = new_figure(len(kinds), 2, figsize=(11, 3.6 * len(kinds)), grid=True)
    for row, kind in zip(axes, kinds):
        per_init = summary["stage2"][kind]
        for init, e in per_init.items():
            if init == "differences_vs_stage1":
                continue
            steps = np.asarray(e["curve"]["step"]["mean"])
            for ax, key in zip(row, ("caption_attribute_accuracy", "zero_shot_answer_accuracy")):
                mean, std = (np.asarray(e["curve"][key][k]) for k in ("mean", "std"))
                ax.plot(steps, mean, marker="o", label=INIT_LABELS[init])
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        blind = per_init.get("stage1", next(iter(per_init.values())))["zero_shot_blind_accuracy"]
        row[1].axhline(blind["mean"], color="0.4", ls="--", lw=1, label="LM without the image")
        row[0].set_title(f"{kind}: caption attribute accuracy (greedy)")
        row[1].set_title(f"{kind}: zero-shot answer accuracy")
        for ax in row:
            ax.set_xlabel("stage-2 step")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_stage1_ablations(summary: dict):
    """Three panels (mean over seeds, ± std): recall@1 against stage-1 steps for the
    default run, the weak frozen ViT and each learning rate; recall@1 with and
    without ITG; recall@1 and CPU time per step against the number of queries."""
    variants = summary["stage1_variants"]
    fig, axes = new_figure(1, 3, figsize=(16, 4))
    labels = {"base": "default", "weak_vision": "weak frozen ViT"}
    labels.update({name: f"lr {lr}" for lr, name in summary["learning_rates"].items()
                   if name != "base"})
    for name, label in labels.items():
        if name in variants:
            c = variants[name]["curve"]
            steps = np.asarray(c["step"]["mean"])
            mean, std = np.asarray(c["i2t_recall@1"]["mean"]), np.asarray(c["i2t_recall@1"]["std"])
            axes[0].plot(steps, mean, marker="o", label=label)
            axes[0].fill_between(steps, mean - std, mean + std, alpha=0.2)
    axes[0].set_xlabel("stage-1 step")
    axes[0].set_ylabel("image→text recall@1 (ITC)")
    axes[0].set_title("stage 1: what limits it")
    axes[0].legend(fontsize=8)
    itg = summary["itg"]
    x = np.arange(2)
    for i, (label, name) in enumerate((("ITC + ITM + ITG", itg["with_itg"]),
                                       ("ITC + ITM", itg["without_itg"]))):
        e = variants[name]
        axes[1].bar(x + 0.38 * i, [e[f"{d}_recall@1"]["mean"] for d in ("i2t", "t2i")],
                    width=0.36, yerr=[e[f"{d}_recall@1"]["std"] for d in ("i2t", "t2i")],
                    capsize=3, label=label)
    axes[1].set_xticks(x + 0.19, ["image→text R@1", "text→image R@1"])
    axes[1].set_title("stage 1 with and without ITG")
    axes[1].legend(fontsize=8)
    ordered = sorted(summary["queries"].items(), key=lambda kv: int(kv[0]))
    qs = [int(q) for q, _ in ordered]
    for d, label in (("i2t", "image→text R@1"), ("t2i", "text→image R@1")):
        axes[2].errorbar(qs, [variants[n][f"{d}_recall@1"]["mean"] for _, n in ordered],
                         yerr=[variants[n][f"{d}_recall@1"]["std"] for _, n in ordered],
                         marker="o", capsize=3, label=label)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks(qs, [str(q) for q in qs])
    axes[2].set_xlabel("learned queries")
    axes[2].set_ylabel("recall@1")
    speed = axes[2].twinx()
    speed.plot(qs, [variants[n]["ms_per_step"]["mean"] for _, n in ordered], color="0.3",
               ls=":", marker="s", label="CPU ms per step")
    speed.set_ylabel("CPU ms per stage-1 step")
    axes[2].set_title("the number of queries")
    axes[2].legend(fontsize=8, loc="lower right")
    speed.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def write_report(out, summary: dict) -> None:
    """``metrics.json`` (the summary, every seed's numbers included), ``tables.md``,
    ``stage2_curves.png`` and ``stage1_ablations.png`` in folder ``out`` (:func:`run_ablation`
    has written ``tasks.json``, every task's own numbers, there first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", summary)
    write_text_atomic(out / "tables.md", "# BLIP-2 ablations, measured\n\n"
                      + format_ablation_tables(summary) + "\n")
    save_figure(plot_stage2_curves(summary), out / "stage2_curves.png")
    save_figure(plot_stage1_ablations(summary), out / "stage1_ablations.png")


def run_ablation(out, cfg: AblationConfig | None = None, *, vision_checkpoint=None,
                 jobs: int = 1, log=None) -> dict:
    """Run the three ablations over ``cfg.seeds`` and write the report folder ``out``
    (:func:`write_report`). Returns the summary. ``log`` is called with one line
    per finished task (e.g. ``print``)."""
    cfg = AblationConfig() if cfg is None else cfg
    if not isinstance(cfg, AblationConfig):
        raise TypeError(f"run_ablation: expected an AblationConfig, got {type(cfg).__name__}")
    if vision_checkpoint is not None and not Path(vision_checkpoint).is_file():
        raise FileNotFoundError(f"vision checkpoint: no file at '{vision_checkpoint}'")
    world.check_int("jobs", jobs, 1)
    say = log if log is not None else (lambda line: None)
    wall0 = time.perf_counter()
    results = run_seeds(cfg, vision_checkpoint, jobs, say)
    # every task's numbers, before anything else can fail (the models stay behind)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "tasks.json", [
        {"task": list(key), **{k: v for k, v in value.items() if k in ("recall", "curve",
                                                                       "cpu_per_step", "cpu",
                                                                       "metrics", "blip_recall")}}
        for key, value in results.items()])
    summary = summarize(cfg, results)
    summary["wall_seconds"] = time.perf_counter() - wall0
    summary["jobs"] = jobs
    write_report(out, summary)
    return summary

