"""Before and after: the same workloads timed on two revisions of minblip.

    python benchmarks/compare_revisions.py BEFORE [AFTER] [--steps 25]

BEFORE and AFTER are git revisions (AFTER defaults to the working tree, with
its uncommitted changes). Each revision's ``minblip/`` is exported into a
temporary folder with ``git archive``, and one worker process (one BLAS
thread) imports both, under the names ``minblip_before`` and
``minblip_after`` (the package imports itself only relatively, so two copies
live side by side). Each workload is built once per revision from the same
seeds, and runs of the two alternate, one of each per round, the order rotated
every round, after two untimed rounds. The speedup is the median over rounds
of before-time / after-time within a round (neighbours in time see the same
machine load), quartiles beside it.

The workloads use only the public API that every revision since the training
issue has, so older trees run them unchanged:

* ``blip_step``: ``Trainer.train_step`` of the demo (``TrainConfig()`` model
  and batch) on one fixed batch;
* ``blip2_step``: ``Stage1Trainer.train_step`` (``Stage1Config()``) on one fixed
  batch of precomputed frozen-encoder features;
* ``beam_captions``: 3-beam captions of 8 images, cached, each filling the
  demo decoder's 20 positions ([DEC] and 19 new tokens);
* ``greedy_captions``: the same with greedy decoding, for 32 images.

Like every script here it prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
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


def load_package(tree: Path, name: str):
    """Import ``tree/minblip`` as the top-level package ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, tree / "minblip" / "__init__.py", submodule_search_locations=[str(tree / "minblip")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def build_workloads(name: str) -> dict:
    """{workload: callable} on fixed inputs, from the package imported as ``name``."""
    import numpy as np

    def mod(sub):
        return importlib.import_module(f"{name}.{sub}")
    world = mod("world")
    Stage1Config, Stage1Trainer = mod("blip2").Stage1Config, mod("blip2").Stage1Trainer
    generate, preprocess = mod("generation").generate, mod("image").preprocess
    Trainer, TrainConfig = mod("train").Trainer, mod("train").TrainConfig
    VisionTransformer = mod("vit").VisionTransformer

    trainer = Trainer(TrainConfig(n_train=256, n_val=8, n_test=8))
    batch = trainer.sample_batch()
    trainer.sample_batch = lambda: batch

    demo = trainer.cfg
    vit = VisionTransformer(trainer.model.cfg.vision, np.random.default_rng([0, 1]))
    data = world.make_dataset(64, 1, 1, seed=0, image_size=demo.image_size)
    stage1 = Stage1Trainer(Stage1Config(), vit, data, tokenizer=trainer.tokenizer)
    stage1_batch = stage1.sample_batch()
    stage1.sample_batch = lambda: stage1_batch

    tok = trainer.tokenizer
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
    import numpy as np
    fns = {}
    for side, tree in zip(("before", "after"), args.trees):
        load_package(Path(tree), f"minblip_{side}")
        fns[side] = build_workloads(f"minblip_{side}")
    out = {"load_average_start": common.load_average(), "workloads": {}}
    for name in args.workloads:
        times = common.interleave({side: fns[side][name] for side in fns}, args.steps)
        out["workloads"][name] = {
            "before_ms": round(1e3 * float(np.median(times["before"])), 2),
            "after_ms": round(1e3 * float(np.median(times["after"])), 2),
            "speedup": common.paired_ratio(times["before"], times["after"])}
    out["load_average_end"] = common.load_average()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", nargs="?", help="git revision measured first")
    p.add_argument("after", nargs="?", default=None,
                   help="git revision measured second (default: the working tree)")
    p.add_argument("--steps", type=int, default=25, help="timed rounds per workload")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, nargs="+", default=[1], help=argparse.SUPPRESS)
    p.add_argument("--trees", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0
    if args.before is None:
        p.error("give the revision to compare against, e.g. HEAD")

    with tempfile.TemporaryDirectory() as tmp:
        trees = [export(rev, Path(tmp) / side)
                 for rev, side in ((args.before, "before"), (args.after, "after"))]
        r = common.run_worker("compare_revisions.py", 1,
                              ["--trees", *map(str, trees), "--steps", str(args.steps),
                               "--workloads", *args.workloads])
    if "error" in r:
        print(f"failed: {r['error']}")
        return 1
    result = {"before": args.before, "after": args.after or "working tree",
              "steps": args.steps, "threads": 1, **r}
    print(f"{'workload':<16} {'before ms':>10} {'after ms':>10} {'speedup':>8}  quartiles")
    for name, w in r["workloads"].items():
        print(f"{name:<16} {w['before_ms']:>10.1f} {w['after_ms']:>10.1f} "
              f"{w['speedup']['median']:>8.2f}  {w['speedup']['quartiles']}")
    print(f"load average {r['load_average_start']} -> {r['load_average_end']}")
    common.write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
