"""CapFilt over several seeds: BLIP's Table 1, measured (``python -m minblip capfilt``).

:func:`run_seeds` runs :func:`minblip.capfilt.run_capfilt` for each seed, in this
process or in worker processes (the numbers are the same); :func:`summarize`
averages the seeds; :func:`format_capfilt_table`, :func:`format_difference_table`
and :func:`format_filter_table` give the tables in markdown, the ``plot_``
functions the figures, and :func:`write_report` writes the report folder.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from . import world
from .capfilt import (SETTING_LABELS, SETTING_PARTS, SETTINGS, TABLE_METRICS, CapFiltConfig,
                      CapFiltRun, bootstrap, check_settings, make_data, pair_count, run_capfilt,
                      threshold_curve, total_steps, train_setting)
from .files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from .report import new_figure, save_figure, wrap_text

# ---------------------------------------------------------------------------------------
# Several seeds, optionally in worker processes
# ---------------------------------------------------------------------------------------

_PROGRESS = None  # a worker process's queue of progress messages


class _QueueBar:
    """Stands in for a tqdm bar inside a worker: sends step counts (every 10
    steps) and stage names to the parent's bar."""

    def __init__(self):
        self.pending = 0

    def update(self, n: int = 1) -> None:
        self.pending += n
        if self.pending >= 10:
            self.flush()

    def set_postfix_str(self, text: str) -> None:
        self.flush()
        _PROGRESS.put(("stage", (os.getpid(), text)))

    def flush(self) -> None:
        if self.pending:
            _PROGRESS.put(("steps", self.pending))
            self.pending = 0


def _init_worker(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue


def _bootstrap_task(cfg: CapFiltConfig) -> CapFiltRun:
    bar = _QueueBar() if _PROGRESS is not None else None
    run = bootstrap(cfg, bar)
    run.models = {}  # weights stay in the worker: only numbers and texts go back
    if bar is not None:
        bar.flush()
    return run


def _setting_task(cfg: CapFiltConfig, name: str, captions) -> tuple[dict, float]:
    bar = _QueueBar() if _PROGRESS is not None else None
    clock = time.perf_counter()
    _, metrics = train_setting(cfg, make_data(cfg), name, captions, bar)
    if bar is not None:
        bar.flush()
    return metrics, time.perf_counter() - clock


def default_jobs() -> int:
    """Worker processes to use by default: one per core, at most two (the
    pipeline's tasks come in pairs of roughly equal length)."""
    return max(1, min(2, os.cpu_count() or 1))


def run_seeds(cfg: CapFiltConfig, seeds, settings=SETTINGS, jobs: int = 1,
              progress: bool = True) -> list[CapFiltRun]:
    """:func:`run_capfilt` for each seed (``cfg`` with its seed replaced).

    With ``jobs`` > 1 the trainings run in that many worker processes (each
    seed's bootstrap first, then its settings' pretrainings as separate
    tasks); every number is the same as with ``jobs=1``, only the models are
    not returned. ``progress`` shows one bar over all optimiser steps.
    """
    settings = check_settings(settings)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    world.check_int("jobs", jobs, 1)
    cfgs = [CapFiltConfig.from_dict({**cfg.to_dict(), "seed": s}) for s in seeds]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(total_steps(c, settings) for c in cfgs), unit="step",
                   desc="CapFilt", dynamic_ncols=True)
    try:
        if jobs == 1:
            return [run_capfilt(c, settings, bar) for c in cfgs]
        return _run_parallel(cfgs, settings, jobs, bar)
    finally:
        if bar is not None:
            bar.close()


def _run_parallel(cfgs, settings, jobs: int, bar) -> list[CapFiltRun]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    # Each worker is one process on one core: a second BLAS thread per worker
    # would only compete with the other workers (spawned workers read this at import).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # spawn: a fresh interpreter per worker, safe with any BLAS threading
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue() if bar is not None else None
    runs, stages = {}, {}  # stages: what each worker process is doing
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(queue,))
    try:
        pending = {pool.submit(_bootstrap_task, c): ("bootstrap", i, None)
                   for i, c in enumerate(cfgs)}
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            while queue is not None:
                try:
                    kind, value = queue.get_nowait()
                except Empty:
                    break
                if kind == "steps":
                    bar.update(value)
                else:
                    stages[value[0]] = value[1]
                    bar.set_postfix_str(" | ".join(stages.values()))
            for future in done:
                kind, i, name = pending.pop(future)
                if kind == "bootstrap":
                    run = runs[i] = future.result()
                    for s in settings:
                        if s != "no_capfilt":
                            task = pool.submit(_setting_task, cfgs[i], s, run.setting_captions(s))
                            pending[task] = ("setting", i, s)
                else:
                    runs[i].settings[name], runs[i].seconds[name] = future.result()
                    runs[i].train_pairs[name] = pair_count(runs[i].data,
                                                            runs[i].setting_captions(name))
    except BaseException:
        # a failed task or Ctrl-C: drop the queued tasks instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    out = []
    for i in range(len(cfgs)):
        run = runs[i]
        order = [s for s in SETTINGS if s in settings]
        if "no_capfilt" not in settings:
            del run.settings["no_capfilt"], run.train_pairs["no_capfilt"]
        run.settings = {s: run.settings[s] for s in order}
        run.train_pairs = {s: run.train_pairs[s] for s in order}
        out.append(run)
    return out


# ---------------------------------------------------------------------------------------
# Averaging over seeds, the table, the report folder
# ---------------------------------------------------------------------------------------

def _spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.mean(v)),
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": float(np.min(v)), "max": float(np.max(v)), "values": v.tolist()}


def summarize(runs: list[CapFiltRun]) -> dict:
    """Average several seeds: every number becomes {mean, std (sample, ddof=1),
    min, max, values}. ``filter_precision`` / ``filter_recall`` are the means
    over seeds of the filter's precision and recall of "removed" on the web texts."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    names = list(runs[0].settings)
    out = {"config": {k: v for k, v in runs[0].cfg.to_dict().items() if k != "seed"},
           "seeds": [r.cfg.seed for r in runs], "settings": {}, "differences_vs_no_capfilt": {}}
    for name in names:
        keys = [k for k, v in runs[0].settings[name].items() if isinstance(v, float)]
        out["settings"][name] = {k: _spread([r.settings[name][k] for r in runs]) for k in keys}
        out["settings"][name]["train_pairs"] = _spread([r.train_pairs[name] for r in runs])
        if name != "no_capfilt" and "no_capfilt" in names:
            out["differences_vs_no_capfilt"][name] = {
                k: _spread([r.settings[name][k] - r.settings["no_capfilt"][k] for r in runs])
                for k in TABLE_METRICS}

    if {"capfilt", "filter_only"} <= set(names):
        # does the captioner add anything once the filter is there?
        out["capfilt_vs_filter_only"] = {
            k: _spread([r.settings["capfilt"][k] - r.settings["filter_only"][k] for r in runs])
            for k in TABLE_METRICS}

    def quality(which):
        qs = [getattr(r, which) for r in runs]
        q = {k: _spread([x[k] for x in qs]) for k in ("precision", "recall", "clean_removed")}
        if "by_kind" in qs[0]:
            q["by_kind"] = {kind: {k: _spread([x["by_kind"].get(kind, {}).get(k, np.nan)
                                               for x in qs])
                                   for k in ("precision", "recall", "n")}
                            for kind in sorted({k for x in qs for k in x["by_kind"]})}
        return q

    out["filter_web"] = quality("filter_web")
    out["filter_synthetic"] = quality("filter_synthetic")
    out["filter_precision"] = out["filter_web"]["precision"]["mean"]
    out["filter_recall"] = out["filter_web"]["recall"]["mean"]
    out["web_roc_auc"] = _spread([threshold_curve(r.p_web, r.data.web.is_noisy)["roc_auc"]
                                  for r in runs])
    out["kept_web_fraction"] = _spread([r.keep_web.mean() for r in runs])
    out["kept_synthetic_fraction"] = _spread([r.keep_synthetic.mean() for r in runs])
    out["synthetic_true_fraction"] = _spread([r.synthetic_true.mean() for r in runs])
    out["text_accuracy"] = {src: {k: _spread([r.text_accuracy[src][k] for r in runs])
                                  for k in runs[0].text_accuracy[src]}
                            for src in runs[0].text_accuracy}
    out["seconds_per_seed"] = _spread([sum(r.seconds.values()) for r in runs])
    return out


def _ordered(settings) -> list[str]:
    """Setting names in Table 1 order (a JSON file may have sorted them)."""
    return [s for s in SETTINGS if s in settings]


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def format_capfilt_table(summary: dict) -> str:
    """BLIP's Table 1, measured, in markdown: each setting's recall@1 and
    caption accuracy in percent, mean ± sample std over the seeds."""
    lines = ["| setting | C | F | text pairs | image→text R@1 | text→image R@1 "
             "| caption attribute accuracy |",
             "|---|:-:|:-:|---:|---:|---:|---:|"]
    for name in _ordered(summary["settings"]):
        metrics = summary["settings"][name]
        use_cap, use_filt = SETTING_PARTS[name]
        lines.append(f"| {SETTING_LABELS[name]} | {'✓' if use_cap else ''} | "
                     f"{'✓' if use_filt else ''} | {metrics['train_pairs']['mean']:.0f} | "
                     + " | ".join(_pm(metrics[k]) for k in TABLE_METRICS) + " |")
    seeds = summary["seeds"]
    lines += ["", f"Percent, mean ± sample standard deviation over {len(seeds)} seeds "
                  f"({', '.join(map(str, seeds))}); C = captioner, F = filter."]
    return "\n".join(lines)


def format_difference_table(summary: dict) -> str:
    """Each setting minus no CapFilt, and captioner + filter minus filter only,
    seed by seed (same data, same initialisation), in percentage points: mean
    ± sample std, and how many seeds improved."""
    rows = [(f"{SETTING_LABELS[name]} − no CapFilt", summary["differences_vs_no_capfilt"][name])
            for name in _ordered(summary["differences_vs_no_capfilt"])]
    if "capfilt_vs_filter_only" in summary:
        rows.append(("captioner + filter − filter only", summary["capfilt_vs_filter_only"]))
    lines = ["| difference | image→text R@1 | text→image R@1 | caption attribute accuracy |",
             "|---|---:|---:|---:|"]
    for label, diff in rows:
        cells = []
        for key in TABLE_METRICS:
            d = diff[key]
            better = sum(v > 0 for v in d["values"])
            cells.append(f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} "
                         f"({better}/{len(d['values'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Percentage points, mean ± sample std of the per-seed differences (same data "
                  "and initialisation within a seed); in brackets the seeds where the first "
                  "setting scored higher."]
    return "\n".join(lines)


def format_filter_table(summary: dict) -> str:
    """The filter's precision and recall of "removed" on the web texts, overall
    and per kind of corruption, and on the synthetic texts, in markdown."""
    web = summary["filter_web"]
    lines = ["| texts | count | removed (recall) | precision of removed | clean texts removed |",
             "|---|---:|---:|---:|---:|",
             f"| web, all corrupted | {summary['config']['noise']:.0%} of "
             f"{summary['config']['n_web']} | {_pm(web['recall'])} | {_pm(web['precision'])} "
             f"| {_pm(web['clean_removed'])} |"]
    for kind, q in web.get("by_kind", {}).items():
        lines.append(f"| web, {kind} | {q['n']['mean']:.0f} | {_pm(q['recall'])} "
                     f"| {_pm(q['precision'])} | |")
    syn = summary["filter_synthetic"]
    not_true = 1 - summary["synthetic_true_fraction"]["mean"]
    lines.append(f"| synthetic, not fully true | {not_true:.0%} of {summary['config']['n_web']} "
                 f"| {_pm(syn['recall'])} | {_pm(syn['precision'])} "
                 f"| {_pm(syn['clean_removed'])} |")
    lines += ["", "Percent, mean ± sample std over the seeds. A kind's precision counts the clean "
                  "web texts removed against that kind alone (the precision had it been the only "
                  "corruption). For synthetic texts \"corrupted\" means not fully true of the "
                  "image."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Plots. Drawn without pyplot, like minblip.report, so that writing a report never
# touches a notebook's figures; a notebook shows a returned figure with display(fig).
# ---------------------------------------------------------------------------------------

def plot_threshold_curves(runs: list[CapFiltRun], threshold: float | None = None):
    """Precision-recall and ROC curves of "removed" (p(match) <= t) on the web
    texts, one line per seed, the threshold in use marked. Returns the figure."""
    threshold = runs[0].cfg.threshold if threshold is None else threshold
    fig, (ax_pr, ax_roc) = new_figure(1, 2, figsize=(10, 4.2))
    for k, run in enumerate(runs):
        curve = threshold_curve(run.p_web, run.data.web.is_noisy, np.linspace(0, 1, 201))
        at = threshold_curve(run.p_web, run.data.web.is_noisy, [threshold])
        colour = f"C{k}"
        ax_pr.plot(curve["recall"], curve["precision"], color=colour, lw=1.2,
                   label=f"seed {run.cfg.seed}")
        ax_pr.plot(at["recall"], at["precision"], "o", color=colour)
        ax_roc.plot(curve["false_positive_rate"], curve["recall"], color=colour, lw=1.2,
                    label=f"seed {run.cfg.seed}: AUC {curve['roc_auc']:.3f}")
        ax_roc.plot(at["false_positive_rate"], at["recall"], "o", color=colour)
    noise = runs[0].data.web.is_noisy.mean()
    ax_pr.axhline(noise, color="0.6", ls=":", label=f"chance (noise {noise:.0%})")
    ax_pr.set_xlabel("recall: corrupted web texts removed")
    ax_pr.set_ylabel("precision: removed texts that were corrupted")
    ax_pr.set_title(f"precision-recall as the threshold varies\n(dots: threshold {threshold})")
    ax_roc.plot([0, 1], [0, 1], color="0.6", ls=":")
    ax_roc.set_xlabel("clean web texts removed")
    ax_roc.set_ylabel("corrupted web texts removed")
    ax_roc.set_title("ROC of the filter")
    for ax in (ax_pr, ax_roc):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, loc="lower left" if ax is ax_pr else "lower right")
    fig.tight_layout()
    return fig


def plot_match_histograms(run: CapFiltRun):
    """The filter's p(match) for clean web texts, each kind of corrupted web
    text, and true / not-true synthetic texts, with the threshold. Returns the figure."""
    web = run.data.web
    kinds = np.array([k or "clean" for k in web.noise_kind])
    groups = [(f"web: {k}", run.p_web[kinds == k]) for k in ("clean", *world.NOISE_KINDS)
              if np.any(kinds == k)]
    groups += [("synthetic: true", run.p_synthetic[run.synthetic_true]),
               ("synthetic: not true", run.p_synthetic[~run.synthetic_true])]
    fig, axes = new_figure(1, len(groups), figsize=(2.4 * len(groups), 2.8))
    bins = np.linspace(0, 1, 21)
    for ax, (name, p) in zip(axes, groups):
        ax.hist(p, bins=bins, color="C2" if name.endswith(("clean", ": true")) else "C3")
        ax.axvline(run.cfg.threshold, color="k", ls="--", lw=1)
        removed = np.mean(p <= run.cfg.threshold) if len(p) else float("nan")
        ax.set_title(f"{name}\n{len(p)} texts, {removed:.0%} removed", fontsize=9)
        ax.set_xlabel("p(match)")
    axes[0].set_ylabel("texts")
    fig.tight_layout()
    return fig


def pick_examples(run: CapFiltRun, per_group: int = 2) -> list[int]:
    """Web image indices that show each outcome: a clean text kept, a clean text
    removed, each kind of corruption removed and kept, a synthetic text kept
    and removed (where the run has one)."""
    web = run.data.web
    kinds = np.array([k or "clean" for k in web.noise_kind])
    groups = [(kinds == "clean") & run.keep_web, (kinds == "clean") & ~run.keep_web]
    for kind in world.NOISE_KINDS:
        groups += [(kinds == kind) & ~run.keep_web, (kinds == kind) & run.keep_web]
    groups += [run.synthetic_true & run.keep_synthetic, ~run.synthetic_true & ~run.keep_synthetic,
               ~run.synthetic_true & run.keep_synthetic]
    chosen = []
    for g in groups:
        chosen += [int(i) for i in np.flatnonzero(g & ~np.isin(np.arange(len(g)), chosen))
                   [:per_group]]
    return chosen


def plot_examples(run: CapFiltRun, indices, cols: int = 2):
    """Web images, each with its web text and its synthetic text to the right,
    marked kept (green) or removed (red) with p(match); the web text's kind of
    corruption and whether the synthetic text is true are named. Returns the figure."""
    from matplotlib.figure import Figure
    indices = list(indices)
    rows = (len(indices) + cols - 1) // cols
    fig = Figure(figsize=(6.2 * cols, 1.45 * rows))
    axes = fig.subplots(rows, 2 * cols, squeeze=False,
                        gridspec_kw={"width_ratios": [1, 3.2] * cols, "wspace": 0.05})
    web = run.data.web
    for ax in axes.ravel():
        ax.axis("off")
    for k, i in enumerate(indices):
        image_ax, text_ax = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        image_ax.axis("on")  # a frame: some backgrounds are white
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        image_ax.imshow(web.images[i], interpolation="nearest")
        kind = web.noise_kind[i] or "clean"
        lines = [(f"web [{kind}] p={run.p_web[i]:.2f}: {web.captions[i]}", run.keep_web[i]),
                 (f"synthetic [{'true' if run.synthetic_true[i] else 'not true'}] "
                  f"p={run.p_synthetic[i]:.2f}: {run.synthetic[i]}", run.keep_synthetic[i])]
        y = 0.95
        for text, kept in lines:
            wrapped = wrap_text(("KEPT " if kept else "REMOVED ") + text, 58)
            text_ax.text(0.03, y, "\n".join(wrapped), transform=text_ax.transAxes, va="top",
                         fontsize=8, color="darkgreen" if kept else "firebrick")
            y -= 0.16 * len(wrapped) + 0.1
    fig.subplots_adjust(left=0.01, right=0.99, top=0.98, bottom=0.02, hspace=0.15)
    return fig


def plot_table(summary: dict):
    """The measured Table 1 as bars with the seed spread (sample std). Returns the figure."""
    names = _ordered(summary["settings"])
    labels = {"i2t_recall@1": "image→text R@1", "t2i_recall@1": "text→image R@1",
              "caption_attribute_accuracy": "caption attribute accuracy"}
    fig, ax = new_figure(figsize=(9, 3.8))
    width = 0.8 / len(names)
    x = np.arange(len(TABLE_METRICS))
    for k, name in enumerate(names):
        m = summary["settings"][name]
        means = [m[key]["mean"] for key in TABLE_METRICS]
        stds = [m[key]["std"] for key in TABLE_METRICS]
        centre = x + (k - (len(names) - 1) / 2) * width
        ax.bar(centre, means, width, yerr=stds, capsize=3, label=SETTING_LABELS[name],
               color=f"C{k}", alpha=0.85)
        for j, key in enumerate(TABLE_METRICS):
            values = m[key]["values"]
            ax.plot(np.full(len(values), centre[j]), values, "k.", ms=4)
    ax.set_xticks(x, [labels[key] for key in TABLE_METRICS])
    ax.set_ylim(0, 1)
    ax.set_ylabel("on the clean test split")
    ax.set_title(f"BLIP Table 1, measured: web noise {summary['config']['noise']:.0%}, "
                 f"{len(summary['seeds'])} seeds (bars: mean ± std, dots: seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# The report folder
# ---------------------------------------------------------------------------------------

def _finite(value):
    """A copy of nested dicts/lists with NaN replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def write_report(out, runs: list[CapFiltRun], summary: dict) -> None:
    """Write ``metrics.json`` (the summary plus every seed's numbers),
    ``table.md``, ``texts.jsonl`` (every web image of the first seed with both
    texts, p(match) and the verdicts) and four plots into folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = [{"seed": r.cfg.seed, "settings": r.settings, "train_pairs": r.train_pairs,
                 "filter_web": r.filter_web, "filter_synthetic": r.filter_synthetic,
                 "text_accuracy": r.text_accuracy, "seconds": r.seconds,
                 "roc_auc": threshold_curve(r.p_web, r.data.web.is_noisy)["roc_auc"]}
                for r in runs]
    write_json_atomic(out / "metrics.json", _finite({**summary, "per_seed": per_seed}))
    write_text_atomic(
        out / "table.md",
        "# CapFilt, measured\n\n" + format_capfilt_table(summary) + "\n\n## Paired differences\n\n"
        + format_difference_table(summary) + "\n\n## The filter\n\n"
        + format_filter_table(summary) + "\n")
    run = runs[0]
    web = run.data.web
    write_jsonl_atomic(out / "texts.jsonl", [{
        "seed": run.cfg.seed, "index": i, "scene": web.scenes[i].to_dict(),
        "web_text": web.captions[i], "noise_kind": web.noise_kind[i],
        "p_web": float(run.p_web[i]), "web_kept": bool(run.keep_web[i]),
        "synthetic_text": run.synthetic[i],
        "synthetic_true": bool(run.synthetic_true[i]),
        "p_synthetic": float(run.p_synthetic[i]),
        "synthetic_kept": bool(run.keep_synthetic[i])} for i in range(len(web))])
    figures = {"threshold_curve.png": plot_threshold_curves(runs),
               "match_histograms.png": plot_match_histograms(run),
               "examples.png": plot_examples(run, pick_examples(run, per_group=1)),
               "table.png": plot_table(summary)}
    for name, fig in figures.items():
        save_figure(fig, out / name)
