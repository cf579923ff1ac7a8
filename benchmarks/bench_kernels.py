"""Candidate rewrites of minblip's hottest kernels, timed on the exact inputs
of one demo-size training step: what each optimisation would save.

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 9]

Nothing in minblip is changed. The worker runs one ``Trainer.train_step``
with recording wrappers around a few methods (attention, LayerNorm, GELU, the
embedding scatter, Linear backward, the patch embedding's backward, the
self-attention projections), keeping every input, upstream gradient and cache.
Then, for each kernel, it times the current method on all recorded calls of
the step (one round) against a candidate written here, alternating the two
for ``--repeats`` rounds, and reports the median milliseconds per step, the saving
and the largest difference between the two results relative to the largest
value (float32 rounding is about 1e-7). The optimiser, gradient clipping and
the patch embedding's unused pixel gradient are measured the same way. Last,
the candidates that saved time are swapped into minblip's classes (in this
process only) and whole steps alternate with and without them. The
candidates are prototypes for the optimisation list in README.md.
"""
from __future__ import annotations

import math
import sys

import common


# ---------------------------------------------------------------------------
# Candidates (float32, dropout off: the demo's setting)
# ---------------------------------------------------------------------------

def _row_sum(a2, np):
    """Sum along the last axis of a 2-d array as a BLAS matrix-vector product:
    NumPy's reductions along a short contiguous axis pay a per-row overhead."""
    return a2 @ np.ones(a2.shape[1], a2.dtype)


def _row_max(a2, np):
    """Max along the last axis as an element-wise maximum over the columns."""
    out = a2[:, 0].copy()
    for j in range(1, a2.shape[1]):
        np.maximum(out, a2[:, j], out=out)
    return out


def sdpa_forward(q, k, v, mask, np):
    s = q @ k.swapaxes(-1, -2)  # (B,H,Tq,dh) @ (B,H,dh,Tk): a fresh contiguous array
    s *= 1.0 / math.sqrt(q.shape[-1])
    if mask is not None:
        s += np.where(mask, np.float32(0.0), np.float32(-np.inf)).astype(s.dtype)[:, None]
    r = s.reshape(-1, s.shape[-1])
    m = _row_max(r, np)
    m[~np.isfinite(m)] = 0.0
    r -= m[:, None]
    np.exp(r, out=r)
    total = _row_sum(r, np)
    total[total == 0.0] = 1.0
    r /= total[:, None]
    return s @ v, (q, k, v, s)


def sdpa_backward(dout, cache, np):
    q, k, v, p = cache
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ v.swapaxes(-1, -2)
    Tk = p.shape[-1]
    dp2, p2 = dp.reshape(-1, Tk), p.reshape(-1, Tk)
    dp2 -= _row_sum(dp2 * p2, np)[:, None]
    dp2 *= p2
    dp2 *= 1.0 / math.sqrt(q.shape[-1])
    return dp @ k, dp.swapaxes(-1, -2) @ q, dv


def layernorm_forward(x, gamma, beta, eps, np):
    D = x.shape[-1]
    w = np.full(D, 1.0 / D, x.dtype)
    x2 = x.reshape(-1, D)
    xc = x2 - (x2 @ w)[:, None]
    var = (xc * xc) @ w
    var += eps
    np.sqrt(var, out=var)
    rstd = np.reciprocal(var)[:, None]
    xc *= rstd
    y = xc * gamma
    y += beta
    return y.reshape(x.shape), (xc, rstd, x.shape)


def layernorm_backward(dy, cache, gamma, np):
    xhat, rstd, shape = cache
    D = shape[-1]
    dy2 = dy.reshape(-1, D)
    ones = np.ones(dy2.shape[0], dy2.dtype)
    dgamma = ones @ (dy2 * xhat)
    dbeta = ones @ dy2
    dxhat = dy2 * gamma
    w = np.full(D, 1.0 / D, dy2.dtype)
    dx = dxhat - (dxhat @ w)[:, None]
    dx -= xhat * ((dxhat * xhat) @ w)[:, None]
    dx *= rstd
    return dx.reshape(shape), dgamma, dbeta


_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu_forward(x, np):
    """Exact GELU with A&S 7.1.26 like minblip's float32 erf, in place where
    possible, keeping exp(-x^2/2) (the erf's own exponential) for the backward."""
    f32 = np.float32
    az = np.abs(x)
    az *= f32(1.0 / math.sqrt(2.0))
    np.minimum(az, f32(6.0), out=az)
    t = az * f32(_AS_P)
    t += f32(1.0)
    np.reciprocal(t, out=t)
    poly = t * f32(_AS_A[4])
    for a in _AS_A[3::-1]:
        poly += f32(a)
        poly *= t
    e = az
    np.square(e, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)  # exp(-x^2/2) while |x| < 6 sqrt(2); beyond, both ends are 0 or 1
    poly *= e
    np.negative(poly, out=poly)
    poly += f32(1.0)  # erf(|x|/sqrt 2)
    np.copysign(poly, x, out=poly)
    poly += f32(1.0)
    poly *= f32(0.5)  # cdf
    return x * poly, (x, poly, e)


def gelu_backward(dy, cache, np):
    x, cdf, e = cache
    g = x * e
    g *= np.float32(1.0 / math.sqrt(2.0 * math.pi))
    g += cdf
    g *= dy
    return g


def embedding_backward(grad, ids, dout, np):
    """Sort the ids once, sum each id's rows with reduceat, add once per id."""
    ids = ids.reshape(-1)
    d = dout.reshape(ids.size, -1)
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    grad[s[starts]] += np.add.reduceat(d[order], starts, axis=0)


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
# All candidates at once: minblip's classes get the candidate methods for the
# duration of one step (in this process only), to measure the combined gain
# ---------------------------------------------------------------------------

def candidate_methods(np):
    """{(class, method name): replacement} with the contract's signatures;
    each falls back to the original outside the demo's setting. The bias
    gradient and the fused q/k/v are left out: alone they saved nothing."""
    from minblip.attention import ScaledDotProductAttention
    from minblip.layers import GELU, Embedding, LayerNorm
    orig = {(cls, name): getattr(cls, name) for cls, name in (
        (ScaledDotProductAttention, "forward"), (ScaledDotProductAttention, "backward"),
        (GELU, "forward"), (GELU, "backward"))}

    def sdpa_fwd(self, q, k, v, mask=None, rng=None):
        if rng is not None and self.dropout.p:
            return orig[ScaledDotProductAttention, "forward"](self, q, k, v, mask, rng)
        out, cache = sdpa_forward(q, k, v, mask, np)
        return out, ("candidate",) + cache

    def sdpa_bwd(self, dout, cache):
        if cache[0] != "candidate":
            return orig[ScaledDotProductAttention, "backward"](self, dout, cache)
        return sdpa_backward(dout, cache[1:], np)

    def ln_fwd(self, x):
        return layernorm_forward(x, self.gamma.data, self.beta.data, self.eps, np)

    def ln_bwd(self, dy, cache):
        dx, dgamma, dbeta = layernorm_backward(dy, cache, self.gamma.data, np)
        self.gamma.grad += dgamma
        self.beta.grad += dbeta
        return dx

    def gelu_fwd(self, x):
        if x.dtype != np.float32 or self.approximate != "none":
            return orig[GELU, "forward"](self, x)
        out, cache = gelu_forward(x, np)
        return out, ("candidate",) + cache

    def gelu_bwd(self, dy, cache):
        if cache[0] != "candidate":
            return orig[GELU, "backward"](self, dy, cache)
        return gelu_backward(dy, cache[1:], np)

    def emb_bwd(self, dout, cache):
        embedding_backward(self.weight.grad, cache, dout, np)

    return {(ScaledDotProductAttention, "forward"): sdpa_fwd,
            (ScaledDotProductAttention, "backward"): sdpa_bwd,
            (LayerNorm, "forward"): ln_fwd, (LayerNorm, "backward"): ln_bwd,
            (GELU, "forward"): gelu_fwd, (GELU, "backward"): gelu_bwd,
            (Embedding, "backward"): emb_bwd}


def patched(fn, methods):
    """``fn`` run with ``methods`` swapped in, the originals restored after."""
    def run():
        saved = {key: getattr(*key) for key in methods}
        for (cls, name), new in methods.items():
            setattr(cls, name, new)
        try:
            return fn()
        finally:
            for (cls, name), old in saved.items():
                setattr(cls, name, old)
    return run


# ---------------------------------------------------------------------------
# Recording one step
# ---------------------------------------------------------------------------

def record_step(step):
    from minblip.attention import MultiHeadAttention, ScaledDotProductAttention
    from minblip.layers import GELU, Embedding, LayerNorm, Linear
    from minblip.vit import PatchEmbed

    rec = {"sdpa": [], "layernorm": [], "gelu": [], "embedding": [], "qkv": [], "patch": [],
           "linear": []}
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

    wrap_forward(ScaledDotProductAttention, "sdpa")
    wrap_forward(LayerNorm, "layernorm")
    wrap_forward(GELU, "gelu")
    wrap_forward(MultiHeadAttention, "qkv",
                 keep=lambda self, args, kw: (len(args) < 2 or args[1] is None)
                 and kw.get("context") is None and kw.get("past_kv") is None)
    for cls in (ScaledDotProductAttention, LayerNorm, GELU, MultiHeadAttention):
        wrap_backward(cls)
    wrap_backward(Embedding, "embedding")
    wrap_backward(PatchEmbed, "patch")
    wrap_backward(Linear, "linear")
    try:
        step()
    finally:
        for cls, name, orig in restore:
            setattr(cls, name, orig)
    for kernel in ("sdpa", "layernorm", "gelu", "qkv"):
        rec[kernel] = [e for e in rec[kernel] if e["dout"] is not None]
    return rec


def _rel(a, b, np) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def kernels(rec, step, np):
    """name -> (current round, candidate round, check) callables."""
    from minblip.optim import clip_grad_norm
    out = {}

    sdpa_calls = rec["sdpa"]
    if all(e["module"].dropout.p == 0.0 for e in sdpa_calls):
        def cur_sdpa():
            for e in sdpa_calls:
                m = e["module"]
                m.backward(e["dout"], m.forward(*e["args"], **e["kw"])[1])

        def new_sdpa():
            for e in sdpa_calls:
                q, k, v, mask = (list(e["args"]) + [None])[:4]
                sdpa_backward(e["dout"], sdpa_forward(q, k, v, mask, np)[1], np)

        def check_sdpa():
            worst = 0.0
            for e in sdpa_calls:
                m = e["module"]
                q, k, v, mask = (list(e["args"]) + [None])[:4]
                o1, c1 = m.forward(*e["args"], **e["kw"])
                o2, c2 = sdpa_forward(q, k, v, mask, np)
                worst = max([worst, _rel(o2, o1, np)] + [_rel(b, a, np) for a, b in zip(
                    m.backward(e["dout"], c1), sdpa_backward(e["dout"], c2, np))])
            return worst
        out["attention softmax (SDPA fwd+bwd)"] = (cur_sdpa, new_sdpa, check_sdpa, len(sdpa_calls))

    layernorm_calls = rec["layernorm"]

    def cur_ln():
        for e in layernorm_calls:
            m = e["module"]
            m.backward(e["dout"], m.forward(*e["args"])[1])

    def new_ln():
        for e in layernorm_calls:
            m = e["module"]
            c = layernorm_forward(e["args"][0], m.gamma.data, m.beta.data, m.eps, np)[1]
            layernorm_backward(e["dout"], c, m.gamma.data, np)

    def check_ln():
        worst = 0.0
        for e in layernorm_calls:
            m = e["module"]
            y1, c1 = m.forward(*e["args"])
            g0, b0 = m.gamma.grad.copy(), m.beta.grad.copy()
            dx1 = m.backward(e["dout"], c1)
            dg1, db1 = m.gamma.grad - g0, m.beta.grad - b0
            y2, c2 = layernorm_forward(e["args"][0], m.gamma.data, m.beta.data, m.eps, np)
            dx2, dg2, db2 = layernorm_backward(e["dout"], c2, m.gamma.data, np)
            worst = max(worst, _rel(y2, y1, np), _rel(dx2, dx1, np), _rel(dg2, dg1, np),
                        _rel(db2, db1, np))
        return worst
    out["LayerNorm fwd+bwd"] = (cur_ln, new_ln, check_ln, len(layernorm_calls))

    gelu_calls = rec["gelu"]
    if all(e["args"][0].dtype == np.float32 and e["module"].approximate == "none"
           for e in gelu_calls):
        def cur_gelu():
            for e in gelu_calls:
                m = e["module"]
                m.backward(e["dout"], m.forward(e["args"][0])[1])

        def new_gelu():
            for e in gelu_calls:
                gelu_backward(e["dout"], gelu_forward(e["args"][0], np)[1], np)

        def check_gelu():
            worst = 0.0
            for e in gelu_calls:
                m = e["module"]
                y1, c1 = m.forward(e["args"][0])
                y2, c2 = gelu_forward(e["args"][0], np)
                worst = max(worst, _rel(y2, y1, np),
                            _rel(gelu_backward(e["dout"], c2, np), m.backward(e["dout"], c1), np))
            return worst
        out["GELU fwd+bwd (exact, float32)"] = (cur_gelu, new_gelu, check_gelu, len(gelu_calls))

    embedding_calls = rec["embedding"]
    scratch = {id(e["module"]): np.zeros_like(e["module"].weight.grad) for e in embedding_calls}

    def cur_emb():
        for e in embedding_calls:
            np.add.at(scratch[id(e["module"])], e["cache"].reshape(-1),
                      e["dout"].reshape(-1, e["module"].dim))

    def new_emb():
        for e in embedding_calls:
            embedding_backward(scratch[id(e["module"])], e["cache"], e["dout"], np)

    def check_emb():
        worst = 0.0
        for e in embedding_calls:
            a = np.zeros_like(e["module"].weight.grad)
            b = np.zeros_like(a)
            np.add.at(a, e["cache"].reshape(-1), e["dout"].reshape(-1, e["module"].dim))
            embedding_backward(b, e["cache"], e["dout"], np)
            worst = max(worst, _rel(b, a, np))
        return worst
    out["Embedding backward (np.add.at)"] = (cur_emb, new_emb, check_emb, len(embedding_calls))

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

    linear_calls = rec["linear"]
    bias_calls = [e for e in linear_calls if e["module"].b is not None]

    def cur_bias():
        for e in bias_calls:
            e["dout"].reshape(-1, e["module"].d_out).sum(axis=0)

    def new_bias():
        for e in bias_calls:
            d2 = e["dout"].reshape(-1, e["module"].d_out)
            np.ones(d2.shape[0], d2.dtype) @ d2

    def check_bias():
        worst = 0.0
        for e in bias_calls:
            d2 = e["dout"].reshape(-1, e["module"].d_out)
            # relative to the summed magnitudes: some sums (the key biases) are 0 exactly
            err = np.abs(np.ones(d2.shape[0], d2.dtype) @ d2 - d2.sum(axis=0)).max()
            worst = max(worst, float(err / max(np.abs(d2).sum(axis=0).max(), 1e-30)))
        return worst
    out["Linear bias gradient (sum over rows)"] = (cur_bias, new_bias, check_bias,
                                                   len(bias_calls))

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

    def cur_clip():
        clip_grad_norm(params, 1e30)

    def new_clip():
        total = 0.0
        for p in params:
            g = p.grad.reshape(-1).astype(np.float64)
            total += float(g @ g)
        return math.sqrt(total)

    def check_clip():
        a, b = clip_grad_norm(params, 1e30), new_clip()
        return abs(a - b) / a
    out["clip_grad_norm"] = (cur_clip, new_clip, check_clip, 1)

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
    # every candidate at once, against the current code, on the same trainer
    methods = candidate_methods(np)
    probe = MinblipStep()  # fresh weights: the first losses must agree
    loss_now = probe.first.loss
    loss_new = patched(lambda: MinblipStep().first.loss, methods)()
    t = common.interleave({"current": step, "candidates": patched(step, methods)},
                          max(repeats, 21), warmup=2)
    c, n = (1e3 * float(np.median(t[k])) for k in ("current", "candidates"))
    out["combined"] = {"current_ms": round(c, 2), "candidates_ms": round(n, 2),
                       "speedup": round(c / n, 3),
                       "paired_speedup": common.paired_ratio(t["current"], t["candidates"]),
                       "first_loss": [loss_now, loss_new],
                       "patched": sorted(f"{cls.__name__}.{name}" for cls, name in methods)}
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
        cb = r["combined"]
        print(f"   all candidates at once ({', '.join(cb['patched'])}):")
        print(f"   step {cb['current_ms']:.1f} -> {cb['candidates_ms']:.1f} ms, speedup "
              f"{cb['paired_speedup']['median']:.2f} (median of paired rounds); first-step "
              f"loss {cb['first_loss'][0]:.6f} vs {cb['first_loss'][1]:.6f}")
        print(f"   load {r['load_average_start']} -> {r['load_average_end']}")
    return {"per_threads": per}


def main(argv=None) -> int:
    p = common.worker_args()
    p.set_defaults(threads=[1])
    args = p.parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0
    common.write_result(args.json, measure(args.threads, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
