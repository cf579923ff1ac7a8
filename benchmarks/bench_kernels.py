"""Candidate rewrites of minblip's kernels that are not (or not yet) in the
package, timed on the exact inputs of one demo-size training step: what each
would save.

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 9]

Nothing in minblip is changed. The worker runs one ``Trainer.train_step``
with recording wrappers around the patch embedding's backward and the
self-attention projections, keeping every input, upstream
gradient and cache. Then, for each kernel, it times the current method on all
recorded calls of the step (one round) against a candidate written here,
alternating the two for ``--repeats`` rounds, and reports the median
milliseconds per step, the saving and the largest difference between the two
results relative to the largest value (float32 rounding is about 1e-7). The
AdamW step is measured the same way.

The candidates that were worth it (attention's softmax reductions, LayerNorm,
GELU, the embedding scatter, the clipping norm, the bias gradient as a
vector-matrix product) are now minblip's own code;
their before-and-after figures come from ``compare_revisions.py`` and are in
README.md.
"""
from __future__ import annotations

import math
import sys

import common


# ---------------------------------------------------------------------------
# Candidates (float32, dropout off: the demo's setting)
# ---------------------------------------------------------------------------

def fused_qkv(x, mha, dq, dk, dv, np):
    """Self-attention q, k, v as one (D, 3D) product, forward and backward."""
    W = np.concatenate([mha.query.W.data, mha.key.W.data, mha.value.W.data], axis=1)
    b = np.concatenate([mha.query.b.data, mha.key.b.data, mha.value.b.data])
    y = x @ W
    y += b
    D = x.shape[-1]
    d = np.concatenate([dq, dk, dv], axis=-1).reshape(-1, 3 * D)
    x2 = x.reshape(-1, D)
    dW = x2.T @ d
    db = np.ones(d.shape[0], d.dtype) @ d
    dx = (d @ W.T).reshape(x.shape)
    return y, dW, db, dx


# ---------------------------------------------------------------------------
# Recording one step
# ---------------------------------------------------------------------------

def record_step(step):
    from minblip.attention import MultiHeadAttention
    from minblip.vit import PatchEmbed

    rec = {"qkv": [], "patch": []}
    by_cache = {}
    restore = []

    def wrap_forward(cls, kernel, keep=lambda self, args, kw: True):
        orig = cls.forward

        def forward(self, *args, **kw):
            out, cache = orig(self, *args, **kw)
            if keep(self, args, kw):
                entry = {"module": self, "args": args, "kw": kw, "cache": cache, "dout": None}
                rec[kernel].append(entry)
                by_cache[id(cache)] = entry
            return out, cache
        cls.forward = forward
        restore.append((cls, "forward", orig))

    def wrap_backward(cls, kernel=None):
        orig = cls.backward

        def backward(self, dout, cache):
            if kernel is not None:
                rec[kernel].append({"module": self, "dout": dout, "cache": cache})
            elif id(cache) in by_cache:
                by_cache[id(cache)]["dout"] = dout
            return orig(self, dout, cache)
        cls.backward = backward
        restore.append((cls, "backward", orig))

    wrap_forward(MultiHeadAttention, "qkv",
                 keep=lambda self, args, kw: (len(args) < 2 or args[1] is None)
                 and kw.get("context") is None and kw.get("past_kv") is None)
    wrap_backward(MultiHeadAttention)
    wrap_backward(PatchEmbed, "patch")
    try:
        step()
    finally:
        for cls, name, orig in restore:
            setattr(cls, name, orig)
    rec["qkv"] = [e for e in rec["qkv"] if e["dout"] is not None]
    return rec


def _rel(a, b, np) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def kernels(rec, step, np):
    """name -> (current round, candidate round, check) callables."""
    out = {}

    qkv_calls = rec["qkv"]
    rng = np.random.default_rng(0)
    for e in qkv_calls:
        x = e["args"][0]
        e["dqkv"] = [rng.standard_normal(x.shape[:-1] + (e["module"].query.d_out,))
                     .astype(x.dtype) for _ in range(3)]

    def cur_qkv():
        for e in qkv_calls:
            m, x = e["module"], e["args"][0]
            for lin, d in zip((m.query, m.key, m.value), e["dqkv"]):
                lin.backward(d, lin.forward(x)[1])

    def new_qkv():
        for e in qkv_calls:
            fused_qkv(e["args"][0], e["module"], *e["dqkv"], np)

    def check_qkv():
        worst = 0.0
        for e in qkv_calls:
            m, x = e["module"], e["args"][0]
            y, dW, db, dx = fused_qkv(x, m, *e["dqkv"], np)
            ys = [lin.forward(x)[0] for lin in (m.query, m.key, m.value)]
            dxs = [lin.backward(d, x) for lin, d in zip((m.query, m.key, m.value), e["dqkv"])]
            worst = max(worst, _rel(y, np.concatenate(ys, -1), np), _rel(dx, sum(dxs), np))
        return worst
    out["self-attention q/k/v as one product"] = (cur_qkv, new_qkv, check_qkv, len(qkv_calls))

    patch_calls = rec["patch"]

    def cur_patch():
        for e in patch_calls:
            e["module"].backward(e["dout"], e["cache"])

    def new_patch():
        for e in patch_calls:
            lin = e["module"].proj
            x2 = e["cache"].reshape(-1, lin.d_in)
            dy2 = e["dout"].reshape(-1, lin.d_out)
            lin.W.grad += x2.T @ dy2
            lin.b.grad += dy2.sum(axis=0)
    out["PatchEmbed backward without the pixel gradient"] = (cur_patch, new_patch,
                                                            lambda: None, len(patch_calls))

    opt = step.trainer.optimizer
    params = opt.params

    saved = [(p.data.copy(), m.copy(), v.copy()) for p, m, v in zip(params, opt.m, opt.v)]
    flat = {name: np.concatenate([a.reshape(-1) for a in arrays]) for name, arrays in (
        ("p", [p.data for p in params]), ("g", [p.grad for p in params]),
        ("m", opt.m), ("v", opt.v))}
    decay = np.concatenate([np.full(p.size, d, bool) for p, d in zip(params, opt.decay)])

    def cur_adamw():
        opt.step(lr=1e-3)

    def new_adamw():
        b1, b2 = opt.betas
        t = opt.step_count + 1
        p, g, m, v = flat["p"], flat["g"], flat["m"], flat["v"]
        p[decay] *= 1.0 - 1e-3 * opt.weight_decay
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = np.sqrt(v)
        denom /= math.sqrt(1.0 - b2 ** t)
        denom += opt.eps
        p -= (1e-3 / (1.0 - b1 ** t)) * (m / denom)

    def restore_adamw():
        for (d, m, v), p, om, ov in zip(saved, params, opt.m, opt.v):
            p.data[...], om[...], ov[...] = d, m, v
    out["AdamW step over one flat buffer"] = (cur_adamw, new_adamw, restore_adamw, 1)
    return out


def worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    import numpy as np
    from steps import MinblipStep
    repeats = args.repeats or 9
    step = MinblipStep()
    times = common.interleave({"step": step}, 7, warmup=2)["step"]
    step_ms = 1e3 * float(np.median(times))
    rec = record_step(step)
    out = {"threads": threads, "load_average_start": common.load_average(),
           "step_ms": round(step_ms, 2), "kernels": {}}
    for name, (cur, new, check, n_calls) in kernels(rec, step, np).items():
        t = common.interleave({"current": cur, "candidate": new}, repeats, warmup=1)
        diff = check()
        c, n = (1e3 * float(np.median(t[k])) for k in ("current", "candidate"))
        out["kernels"][name] = {
            "calls_per_step": n_calls, "current_ms": round(c, 3), "candidate_ms": round(n, 3),
            "saving_ms": round(c - n, 3), "saving_share_of_step": round((c - n) / step_ms, 4),
            "speedup": round(c / n, 2) if n > 0 else None,
            "max_rel_diff": None if diff is None else float(f"{diff:.2e}")}
    out["load_average_end"] = common.load_average()
    return out


def measure(threads=(1,), repeats=None) -> dict:
    per = {}
    for n in threads:
        print(f"-- candidate kernels on one training step's inputs, {n} thread(s) --", flush=True)
        per[str(n)] = r = common.run_worker("bench_kernels.py", n,
                                            ["--repeats", str(repeats)] if repeats else [])
        if "error" in r:
            print(f"   failed: {r['error']}")
            continue
        print(f"   step {r['step_ms']:.1f} ms (median of 7, this process)")
        print(f"   {'kernel':<48} {'calls':>5} {'now ms':>8} {'cand ms':>8} {'saves':>7} "
              f"{'x':>5} {'max rel diff':>12}")
        for name, k in r["kernels"].items():
            diff = "-" if k["max_rel_diff"] is None else f"{k['max_rel_diff']:.1e}"
            print(f"   {name:<48} {k['calls_per_step']:>5} {k['current_ms']:>8.2f} "
                  f"{k['candidate_ms']:>8.2f} {k['saving_share_of_step']:>7.1%} "
                  f"{k['speedup']:>5.1f} {diff:>12}")
        print(f"   load {r['load_average_start']} -> {r['load_average_end']}")
    return {"per_threads": per}


def main(argv=None) -> int:
    p = common.worker_args()
    p.set_defaults(threads=[1])
    args = p.parse_args(argv)
    return common.run_script(args, worker, lambda: measure(args.threads, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
