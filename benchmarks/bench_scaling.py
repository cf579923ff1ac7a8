"""How the cost of a BLIP training step grows: minblip and its PyTorch twin
against the work done, with the machine's matrix-product rate as the ceiling.

    python benchmarks/bench_scaling.py [--repeats 8] [--axes width depth batch text]
                                       [--threads 1] [--json PATH] [--figure PATH]

One axis at a time moves away from the demo-size step (width 64, depth 2,
batch 32, texts of 16 tokens; 4 heads, MLP 4 x width, 32x32 images of 8x8
patches): width 64, 128, 256, 512; depth 2, 4, 8; batch 8, 32, 128; text
length 16, 32, 64 tokens. For each point two fresh worker processes run (one
BLAS thread unless ``--threads``):

* a timing worker alternates ``Trainer.train_step`` on one fixed batch with
  the PyTorch twin's step on the same weights, batch and negatives (as
  ``bench_train_step.py`` does; ``steps.py``) and keeps the median of each and
  the median of the per-round ratios;
* a counting worker imports minblip through ``bench_matmul_share.py``'s
  instrumenting hook, records the shapes of every matrix product of one step
  and adds up their floating-point operations (2 x M x K x N per product, batch
  axes included; products with a vector, the row sums, are left out). The
  same worker gives the share of the step spent inside those products. The
  twin does the same products except the pixels' gradient (one product of
  the patch embedding's backward), so the count stands for both.

The texts of a point are ``[CLS]``, random words and ``[SEP]``, exactly that
many tokens with no padding, so the text length is what the point says.

The ceiling is the best rate of float32 products of square matrices (256 to
2048) measured on the same machine and thread count: no step can run faster
than its products at that rate. The figure plots time per step against the
step's matrix-product work for both implementations, with the ceiling as a
line. Nothing here asserts a time; ``benchmarks/README.md`` reads the figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common

BASE = {"width": 64, "depth": 2, "batch": 32, "text": 16}
AXES = {"width": (64, 128, 256, 512), "depth": (2, 4, 8), "batch": (8, 32, 128),
        "text": (16, 32, 64)}
HERE = Path(__file__).resolve().parent


def points(axes) -> list[dict]:
    """The settings measured: the base, then each axis's other values."""
    out = [dict(BASE, axis="base")]
    for axis in axes:
        out += [dict(BASE, **{axis: v}, axis=axis) for v in AXES[axis] if v != BASE[axis]]
    return out


def build_step(point: dict):
    """``steps.MinblipStep`` for one point, on texts of exactly ``point["text"]`` tokens."""
    import numpy as np
    from minblip.train import TrainConfig
    from steps import MinblipStep

    B, T = point["batch"], point["text"]
    cfg = TrainConfig(n_train=max(256, B), n_val=8, n_test=8, width=point["width"],
                      depth=point["depth"], heads=4, batch_size=B, max_text_len=T)
    first = MinblipStep(cfg)  # the task's images, tokenizer and model
    tok = first.trainer.task.tokenizer
    rng = np.random.default_rng(0)
    ids = rng.integers(len(tok.SPECIAL_TOKENS), tok.vocab_size, size=(B, T))
    ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
    return MinblipStep(cfg, batch=(first.batch[0], ids, np.ones_like(ids)))


def time_worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    common.use_repo()
    from steps import TorchStep

    point = json.loads(args.point)
    mine = build_step(point)
    fns = {"minblip": mine}
    torch_ok, reason = common.torch_available()
    if torch_ok:
        fns["torch"] = TorchStep(mine, threads)
    for fn in fns.values():  # warm-up, and the time of one step to size the run
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = time.perf_counter() - start
    repeats = max(3, min(args.repeats or 8, int(args.seconds / max(round_s, 1e-9))))
    times = common.interleave(fns, repeats, warmup=1)
    out = {"point": point, "threads": threads, "repeats": repeats,
           "params": mine.trainer.model.param_count(), "load_average": common.load_average()}
    return common.record_times(out, times, torch_ok, reason)


def product_flops(record) -> int:
    """Floating-point operations of the recorded matrix products (2 M K N each,
    times the broadcast batch); products with a vector operand are left out."""
    import numpy as np
    total = 0
    for kind, shapes, _ in record:
        if kind != "matmul":
            continue
        (a, b) = shapes
        batch = np.broadcast_shapes(a[:-2], b[:-2])
        total += 2 * int(np.prod(batch, dtype=np.int64)) * a[-2] * a[-1] * b[-1]
    return total


def count_worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    common.use_repo()
    import bench_matmul_share as share
    share.install_hook()
    import numpy as np

    point = json.loads(args.point)
    step = build_step(point)
    step()
    stats = share.STATS
    stats.record = []
    step()
    record, stats.record = stats.record, None
    fractions = []
    for _ in range(3):
        stats.seconds = 0.0
        start = time.perf_counter()
        step()
        fractions.append(stats.seconds / (time.perf_counter() - start))
    return {"point": point, "flops": product_flops(record),
            "products": sum(kind == "matmul" for kind, *_ in record),
            "matmul_share": round(float(np.median(fractions)), 4)}


def gemm_worker(args) -> dict:
    """Best GFLOP/s of float32 square products at this thread count."""
    (threads,) = args.threads
    common.check_worker_threads(threads)
    import numpy as np
    rng = np.random.default_rng(0)
    rates = {}
    for n in (256, 512, 1024, 2048):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        a @ b
        reps = max(2, int(2e9 / (2 * n ** 3)))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, (time.perf_counter() - start) / reps)
        rates[str(n)] = round(2 * n ** 3 / best / 1e9, 2)
    return {"threads": threads, "gflops_by_size": rates, "gflops": max(rates.values())}


def worker(args) -> dict:
    return {"time": time_worker, "count": count_worker, "gemm": gemm_worker}[args.mode](args)


def label(point: dict) -> str:
    if point["axis"] == "base":
        return "base"
    return {"width": "w", "depth": "d", "batch": "b", "text": "T"}[point["axis"]] + str(
        point[point["axis"]])


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["points"] if "error" not in r]
    gflop = np.array([r["flops"] / 1e9 for r in rows])
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for key, colour, name in (("minblip_ms", "tab:blue", "minblip (NumPy)"),
                              ("torch_ms", "tab:orange", "PyTorch twin")):
        ms = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
        ax.scatter(gflop, ms, color=colour, label=name, zorder=3, s=22)
        if key == "minblip_ms":
            for x, y, r in zip(gflop, ms, rows):
                ax.annotate(label(r["point"]), (x, y), textcoords="offset points",
                            xytext=(4, -9), fontsize=7, color="tab:blue")
    rate = result["gemm"]["gflops"]
    xs = np.geomspace(gflop.min() / 1.5, gflop.max() * 1.5, 50)
    ax.plot(xs, 1e3 * xs / rate, color="k", ls="--", lw=1,
            label=f"ceiling: every product at {rate:.0f} GFLOP/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("matrix-product work of one step (GFLOP)")
    ax.set_ylabel("time of one training step (ms)")
    ax.set_title(f"BLIP training step, {result['threads']} BLAS thread(s): base = width 64, "
                 f"depth 2, batch 32, 16 tokens", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    from minblip.report import save_figure
    save_figure(fig, path)
    plt.close(fig)


def measure(axes, threads: int, repeats, seconds: float) -> dict:
    extra = ["--seconds", str(seconds)] + (["--repeats", str(repeats)] if repeats else [])
    gemm = common.run_worker("bench_scaling.py", threads, ["--mode", "gemm"])
    print(f"-- scaling of a training step, {threads} thread(s); ceiling "
          f"{gemm.get('gflops', float('nan')):.1f} GFLOP/s ({gemm.get('gflops_by_size')}) --",
          flush=True)
    print(f"   {'point':<8} {'params':>10} {'GFLOP':>8} {'minblip ms':>11} {'torch ms':>9} "
          f"{'ratio':>6} {'at ceiling ms':>13} {'in products':>11}")
    rows = []
    for point in points(axes):
        spec = ["--point", json.dumps(point)]
        timed = common.run_worker("bench_scaling.py", threads, ["--mode", "time"] + spec + extra)
        counted = common.run_worker("bench_scaling.py", threads, ["--mode", "count"] + spec)
        if "error" in timed or "error" in counted:
            rows.append({"point": point, "error": timed.get("error") or counted.get("error")})
            print(f"   {label(point):<8} failed: {rows[-1]['error']}")
            continue
        row = {"point": point, "params": timed["params"], "flops": counted["flops"],
               "products": counted["products"], "matmul_share": counted["matmul_share"],
               "minblip_ms": timed["minblip"]["median_ms"],
               "torch_ms": timed["torch"]["median_ms"] if timed["torch"] else None,
               "ratio": timed["ratio"]["median"] if timed["ratio"] else None,
               "ceiling_ms": round(1e3 * counted["flops"] / 1e9 / gemm["gflops"], 3),
               "repeats": timed["repeats"], "load_average": timed["load_average"]}
        rows.append(row)
        torch_ms = "-" if row["torch_ms"] is None else f"{row['torch_ms']:.1f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"   {label(point):<8} {row['params']:>10,} {row['flops'] / 1e9:>8.2f} "
              f"{row['minblip_ms']:>11.1f} {torch_ms:>9} {ratio:>6} {row['ceiling_ms']:>13.1f} "
              f"{row['matmul_share']:>11.0%}", flush=True)
    return {"threads": threads, "gemm": gemm, "points": rows,
            "environment": common.environment()}


def main(argv=None) -> int:
    p = common.worker_args()
    p.set_defaults(threads=[1])
    p.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    p.add_argument("--seconds", type=float, default=20.0,
                   help="time to spend on each point's timed rounds (default %(default)s)")
    p.add_argument("--figure", default=str(HERE / "scaling.png"), help="where to draw the figure")
    p.add_argument("--mode", choices=("time", "count", "gemm"), help=argparse.SUPPRESS)
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0
    if len(args.threads) != 1:
        p.error("give one thread count")
    result = measure(args.axes, args.threads[0], args.repeats, args.seconds)
    common.use_repo()
    plot(result, Path(args.figure))
    print(f"   figure: {args.figure}")
    common.write_result(args.json or str(HERE / "scaling.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
