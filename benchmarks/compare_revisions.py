"""Before and after: the same workloads timed on two revisions of minblip.

    python benchmarks/compare_revisions.py BEFORE [AFTER] [--rounds 8] [--steps 12]
                                            [--keep-freed-memory] [--workloads ...]

BEFORE and AFTER are git revisions (AFTER defaults to the working tree, with
its uncommitted changes). Each revision's ``minblip/`` is exported into a
temporary folder with ``git archive``. Then, for ``--rounds`` rounds, one
fresh worker process per revision (one BLAS thread; the order alternates
from round to round) builds the workloads and times each ``--steps`` times
after two untimed runs. A round's ratio is before / after of the two workers'
median times; the speedup is the median of the rounds' ratios, with
quartiles.

Why one process per revision, when the other scripts here interleave variants
inside one process: a revision's speed depends on how it uses memory. glibc
returns large freed blocks to the operating system, and a NumPy temporary
that is allocated afresh is page-faulted in again, so code that makes fewer
temporaries gains twice. Two revisions in one process would share one heap
and blur that. ``--keep-freed-memory`` applies the ``mallopt`` setting of
``python -m minblip`` (which keeps freed memory for reuse) in both workers.

The workloads use only public API. Revisions since the training issue have
one of two training APIs, and the worker builds the workloads with whichever
its tree has: the one loop ``Trainer(task)`` with ``blip_trainer`` and
``minblip.train_blip2.Stage1Training``, or, before it, ``Trainer(cfg)`` and
``minblip.blip2.Stage1Trainer``. Both draw the same batches and compute the
same steps, so the two sides time the same work:

* ``blip_step``: one training step of the demo (``minblip.demo.demo_config()``
  model and batch, or ``TrainConfig()``'s in a revision before the demo had
  its own recipe) on one fixed batch;
* ``blip2_step``: one stage-1 training step (``Stage1Config()``) on one fixed
  batch of precomputed features of a frozen ViT of ``TrainConfig()``'s size;
* ``beam_captions``: 3-beam captions of 8 images, cached, each filling the
  demo decoder's 20 positions ([DEC] and 19 new tokens);
* ``greedy_captions``: the same with greedy decoding, for 32 images.

Like every script here it prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

WORKLOADS = ("blip_step", "blip2_step", "beam_captions", "greedy_captions")


def export(rev: str | None, dest: Path) -> Path:
    """Write revision ``rev`` (None: the working tree) of minblip/ into dest."""
    if rev is None:
        return common.ROOT
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(common.ROOT), "archive", rev, "minblip"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def keep_freed_memory() -> None:
    """What ``python -m minblip`` does at start-up (``__main__.keep_freed_memory``),
    restated here because older revisions do not have it."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _training(demo, data):
    """(BLIP trainer, stage-1 trainer on ``data``, tokenizer), each trainer's
    ``train_step`` repeating one fixed batch, with the training API of the
    minblip on sys.path. The stage-1 ViT has ``TrainConfig()``'s size."""
    import numpy as np
    from minblip.train import TrainConfig
    from minblip.vit import VisionTransformer

    try:
        from minblip.train import Trainer, blip_trainer
        from minblip.train_blip2 import Stage1Config, Stage1Training
    except ImportError:  # a revision before the one training loop
        from minblip.blip2 import Stage1Config, Stage1Trainer
        from minblip.train import Trainer

        trainer = Trainer(demo)
        vision = TrainConfig().model_config(trainer.tokenizer.vocab_size).vision
        vit = VisionTransformer(vision, np.random.default_rng([0, 1]))
        stage1 = Stage1Trainer(Stage1Config(), vit, data, tokenizer=trainer.tokenizer)
        for t in (trainer, stage1):
            batch = t.sample_batch()
            t.sample_batch = lambda batch=batch: batch
        return trainer, stage1, trainer.tokenizer

    trainer = blip_trainer(demo)
    tok = trainer.task.tokenizer
    vision = TrainConfig().model_config(tok.vocab_size).vision
    vit = VisionTransformer(vision, np.random.default_rng([0, 1]))
    stage1 = Trainer(Stage1Training(Stage1Config(), vit, data, tokenizer=tok))
    for t in (trainer, stage1):
        batch = t.task.sample_batch(t.data_rng)
        t.task.sample_batch = lambda rng, batch=batch: batch
    return trainer, stage1, tok


def build_workloads() -> dict:
    """{workload: callable} on fixed inputs, from the minblip on sys.path."""
    import numpy as np
    from minblip import world
    from minblip.generation import generate
    from minblip.image import preprocess
    from minblip.train import TrainConfig

    try:
        from minblip.demo import demo_config
    except ImportError:  # a revision whose demo ran on TrainConfig's defaults
        demo_config = TrainConfig
    demo = demo_config(n_train=256, n_val=8, n_test=8)
    data = world.make_dataset(64, 1, 1, seed=0, image_size=TrainConfig().image_size)
    trainer, stage1, tok = _training(demo, data)
    pixels = preprocess(data.train.images[:32], demo.image_size)
    embeds, _ = trainer.model.encode_image(pixels)
    prompt = np.array([tok.dec_id])
    length = demo.max_text_len  # max_length and min_length count the prompt

    def captions(method, n_images, **kw):
        return lambda: generate(trainer.model.text_decoder, embeds[:n_images], prompt,
                                sep_id=tok.sep_id, method=method, max_length=length,
                                min_length=length, **kw)

    return {"blip_step": trainer.train_step, "blip2_step": stage1.train_step,
            "beam_captions": captions("beam", 8, num_beams=3),
            "greedy_captions": captions("greedy", 32)}


def worker(args) -> dict:
    common.check_worker_threads(1)
    if args.keep_freed_memory:
        keep_freed_memory()
    import numpy as np
    fns = build_workloads()
    out = {}
    for name in args.workloads:
        for _ in range(2):
            fns[name]()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            fns[name]()
            times.append(time.perf_counter() - start)
        out[name] = float(np.median(times))
    return out


def run_tree(tree: Path, args) -> dict:
    """One worker process on ``tree``: {workload: median seconds}."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = common.thread_env(1)
        env["PYTHONPATH"] = str(tree)  # this tree's minblip, and no other
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--result",
               str(result), "--steps", str(args.steps), "--workloads", *args.workloads]
        if args.keep_freed_memory:
            cmd.append("--keep-freed-memory")
        subprocess.run(cmd, env=env, check=True, cwd=tmp)
        return common.read_result(result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", nargs="?", help="git revision measured first")
    p.add_argument("after", nargs="?", default=None,
                   help="git revision measured second (default: the working tree)")
    p.add_argument("--rounds", type=int, default=8, help="pairs of worker processes")
    p.add_argument("--steps", type=int, default=12, help="timed runs per workload and worker")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="apply python -m minblip's mallopt setting in every worker")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0
    if args.before is None:
        p.error("give the revision to compare against, e.g. HEAD")

    load_start = common.load_average()
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": export(args.before, Path(tmp) / "before"),
                 "after": export(args.after, Path(tmp) / "after")}
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[side].append(run_tree(trees[side], args))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    result = {"before": args.before, "after": args.after or "working tree",
              "rounds": args.rounds, "steps": args.steps, "threads": 1,
              "keep_freed_memory": args.keep_freed_memory,
              "load_average": [load_start, common.load_average()], "workloads": {}}
    print(f"\n{'workload':<16} {'before ms':>10} {'after ms':>10} {'speedup':>8}  quartiles")
    for name in args.workloads:
        before = [run[name] for run in runs["before"]]
        after = [run[name] for run in runs["after"]]
        ratio = common.paired_ratio(before, after)
        w = result["workloads"][name] = {
            "before_ms": round(1e3 * statistics.median(before), 2),
            "after_ms": round(1e3 * statistics.median(after), 2), "speedup": ratio}
        print(f"{name:<16} {w['before_ms']:>10.1f} {w['after_ms']:>10.1f} "
              f"{ratio['median']:>8.2f}  {ratio['quartiles']}")
    print(f"load average {result['load_average'][0]} -> {result['load_average'][1]}")
    common.write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
