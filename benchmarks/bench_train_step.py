"""One training step of the demo-size BLIP: minblip against its PyTorch twin.

    python benchmarks/bench_train_step.py [--threads 1 2] [--repeats 15]

The step is ``minblip.train.Trainer.train_step`` with ``TrainConfig()``'s
model and batch (width 64, depth 2, 4 heads, batch 32, 32x32 images, 8x8
patches, float32): forward and backward of ITC + ITM + LM, gradient clipping
and AdamW. The twin (``reference/torch_twin.py``) runs the same step from
Hugging Face's BLIP modules with the same weights, batch and hard negatives,
then ``clip_grad_norm_`` and ``torch.optim.AdamW``. For each thread count, a
fresh process alternates the two steps (interleaved, so both see the same
machine load) and reports the median time of each and the median of the
per-round ratios minblip / torch (above 1: minblip is slower). Without
PyTorch the ratio is null and the reason is recorded.
"""
from __future__ import annotations

import sys

import common


def worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    import numpy as np  # noqa: F401  (after the thread check)
    from steps import MinblipStep, TorchStep
    repeats = args.repeats or 15
    mine = MinblipStep()
    cfg = mine.cfg
    out = {"threads": threads, "load_average_start": common.load_average(),
           "config": {"width": cfg.width, "depth": cfg.depth, "heads": cfg.heads,
                      "batch_size": cfg.batch_size, "image_size": cfg.image_size,
                      "patch_size": cfg.patch_size, "max_text_len": cfg.max_text_len,
                      "dtype": str(mine.trainer.model.dtype),
                      "params": mine.trainer.model.param_count()}}
    fns = {"minblip": mine}
    torch_ok, reason = common.torch_available()
    if torch_ok:
        twin = TorchStep(mine, threads)
        out["first_loss"] = {"minblip": mine.first.loss, "torch": twin.first_loss}
        fns["torch"] = twin
    times = common.interleave(fns, repeats, warmup=3)
    common.record_times(out, times, torch_ok, reason)
    out["load_average_end"] = common.load_average()
    return out


def measure(threads=common.THREADS, repeats=None) -> dict:
    """Run one worker per thread count; print and return the figures."""
    per = {}
    for n in threads:
        print(f"-- training step, {n} thread(s) --", flush=True)
        per[str(n)] = r = common.run_worker("bench_train_step.py", n,
                                            ["--repeats", str(repeats)] if repeats else [])
        if "error" in r:
            print(f"   failed: {r['error']}")
            continue
        common.print_step_against_torch(r)
    return {"per_threads": per}


headline = common.ratio_headline


def main(argv=None) -> int:
    args = common.worker_args().parse_args(argv)
    return common.run_script(args, worker, lambda: measure(args.threads, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
