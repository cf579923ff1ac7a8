"""How much of a training step is spent inside matrix products.

    python benchmarks/bench_matmul_share.py [--threads 1 2] [--repeats 10] [--top 25]

Method. ``a @ b`` is an operator, so neither a profiler nor a monkeypatched
``np.matmul`` sees it. The worker therefore imports minblip through an import
hook that parses each module's source and rewrites, in the abstract syntax
tree only (no file is changed, no bytecode is cached), every ``a @ b`` into
``__bench_matmul__(a, b)`` and every ``np.matmul`` / ``np.einsum`` /
``np.dot`` / ``np.tensordot`` call into a timed wrapper. Each wrapper adds the
``time.perf_counter`` difference around the product to a running total. The
figures, for the demo-size ``Trainer.train_step`` on a fixed batch:

* **share** (the headline): matrix-product seconds / step seconds, per step,
  median over the steps. The wrapper's own call costs about 0.2 us (measured
  and reported as ``overhead_share``), well below the noise. A product with a
  vector operand is not counted here but as ``reduction_share``: minblip sums
  and averages short rows as ``x @ ones`` (``core.row_sum``, ``row_mean``),
  which is a reduction done by BLAS, not a layer's product.
* **cProfile share**: the same steps under cProfile, the wrappers' cumulative
  time over the total (reductions included). cProfile slows Python-heavy code more than BLAS, so
  this reads lower; it is a cross-check, and its table of the functions with
  the most own time is where the optimisation list comes from.
* **replay share**: every product of one step (shapes and dtype recorded) run
  again on fresh C-contiguous arrays, over the median step time: what the
  products would cost with ideal memory layout and warm caches. The gap to
  the share is what strided operands (head splits, transposes) cost.
* **the largest element-wise layers**: the seconds inside ``GELU`` and
  ``LayerNorm`` (forward and backward, timed like the products, per step,
  median), and ``share_if_free``: what the share would be if those two layers
  took no time at all, products / (step - their time). It bounds what any
  rewrite of them could bring.
"""
from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import sys
import time

import common

WRAPPED_FUNCS = ("matmul", "einsum", "dot", "tensordot")


class Stats:
    """Running totals of the timed products (one instance per worker)."""

    def __init__(self):
        self.seconds = 0.0  # products of two matrices (or stacks of them)
        self.reduction_seconds = 0.0  # products with a vector: row sums and means, norms
        self.calls = 0
        self.record = None  # a list while one step's shapes are being recorded
        self.layer_seconds = {}  # class name -> seconds inside its forward and backward


STATS = Stats()


def timed_matmul(a, b):
    start = time.perf_counter()
    out = a @ b
    elapsed = time.perf_counter() - start
    # x @ ones is how minblip sums short rows (core.row_sum): a reduction, not a layer's product
    reduction = min(a.ndim, b.ndim) == 1
    if reduction:
        STATS.reduction_seconds += elapsed
    else:
        STATS.seconds += elapsed
    STATS.calls += 1
    if STATS.record is not None:
        STATS.record.append(("matvec" if reduction else "matmul", (a.shape, b.shape), out.dtype))
    return out


def _timed(name):
    import numpy as np
    fn = getattr(np, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        STATS.seconds += time.perf_counter() - start
        STATS.calls += 1
        if STATS.record is not None:
            STATS.record.append((name, args, kwargs))
        return out
    wrapper.__name__ = f"timed_{name}"
    return wrapper


class _Rewriter(ast.NodeTransformer):
    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.MatMult):
            call = ast.Call(func=ast.Name("__bench_matmul__", ast.Load()),
                            args=[node.left, node.right], keywords=[])
            return ast.copy_location(call, node)
        return node

    def visit_AugAssign(self, node):
        if isinstance(node.op, ast.MatMult):
            raise NotImplementedError("'@=' is not instrumented; extend bench_matmul_share.py")
        return self.generic_visit(node)

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                and f.value.id == "np" and f.attr in WRAPPED_FUNCS):
            node.func = ast.copy_location(
                ast.Subscript(value=ast.Name("__bench_funcs__", ast.Load()),
                              slice=ast.Constant(f.attr), ctx=ast.Load()), f)
        return node


class _Loader(importlib.machinery.SourceFileLoader):
    """Compiles the rewritten tree; never reads or writes cached bytecode."""

    funcs: dict = {}

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        tree = _Rewriter().visit(ast.parse(self.get_data(path), path))
        return compile(ast.fix_missing_locations(tree), path, "exec", dont_inherit=True)

    def exec_module(self, module):
        module.__dict__["__bench_matmul__"] = timed_matmul
        module.__dict__["__bench_funcs__"] = self.funcs
        super().exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "minblip" and not name.startswith("minblip."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _Loader(spec.loader.name, spec.loader.path)
        return spec


def install_hook() -> None:
    if any(m.startswith("minblip") for m in sys.modules):
        raise RuntimeError("minblip was imported before the matmul hook was installed")
    _Loader.funcs = {name: _timed(name) for name in WRAPPED_FUNCS}
    sys.meta_path.insert(0, _Finder())


TIMED_LAYERS = ("GELU", "LayerNorm")


def time_layers() -> None:
    """Wrap the forward and backward of each class in :data:`TIMED_LAYERS` so that
    their seconds add up in ``STATS.layer_seconds`` (products inside them, if any,
    still count as products too)."""
    import minblip.layers
    for name in TIMED_LAYERS:
        cls = getattr(minblip.layers, name)
        for method in ("forward", "backward"):
            fn = getattr(cls, method)

            def timed(self, *args, _fn=fn, _name=name, **kwargs):
                start = time.perf_counter()
                out = _fn(self, *args, **kwargs)
                STATS.layer_seconds[_name] = (STATS.layer_seconds.get(_name, 0.0)
                                              + time.perf_counter() - start)
                return out
            setattr(cls, method, timed)


def wrapper_overhead_s() -> float:
    """Seconds a wrapped 2x2 product costs beyond a direct one."""
    import numpy as np
    a = np.ones((2, 2), np.float32)
    n = 20000
    best = {}
    for name, fn in (("direct", lambda: a @ a), ("wrapped", lambda: timed_matmul(a, a))):
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - start) / n)
        best[name] = min(runs)
    return max(best["wrapped"] - best["direct"], 0.0)


def replay_seconds(record) -> float:
    """Time every recorded product again on fresh C-contiguous operands."""
    import numpy as np
    rng = np.random.default_rng(0)
    jobs = []
    for kind, shapes_or_args, extra in record:
        if kind in ("matmul", "matvec"):
            (sa, sb), dtype = shapes_or_args, extra
            a = rng.standard_normal(sa).astype(dtype)
            b = rng.standard_normal(sb).astype(dtype)
            jobs.append((np.matmul, (a, b), {}))
        else:
            args = tuple(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x
                         for x in shapes_or_args)
            jobs.append((getattr(np, kind), args, extra))
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for fn, args, kwargs in jobs:
            fn(*args, **kwargs)
        runs.append(time.perf_counter() - start)
    return sorted(runs)[len(runs) // 2]


def profile_table(step, n_steps: int, top: int) -> dict:
    """cProfile over ``n_steps`` steps: the wrappers' share and the functions
    with the most own time (per step)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())
    wrapper_names = {"timed_matmul"} | {f"timed_{n}" for n in WRAPPED_FUNCS}
    mm = sum(v[3] for (f, _, name), v in stats.items()
             if name in wrapper_names and f.endswith("bench_matmul_share.py"))
    rows = []
    for (file, line, name), (_, ncalls, tt, ct, _) in stats.items():
        if name in wrapper_names:
            continue
        short = file.split("/minblip/")[-1] if "/minblip/" in file else file.rsplit("/", 1)[-1]
        rows.append({"function": f"{short}:{line}({name})", "own_share": tt / total,
                     "cum_share": ct / total, "calls_per_step": ncalls / n_steps,
                     "own_ms_per_step": 1e3 * tt / n_steps})
    rows.sort(key=lambda r: -r["own_share"])
    for r in rows:
        for k in ("own_share", "cum_share"):
            r[k] = round(r[k], 4)
        r["own_ms_per_step"] = round(r["own_ms_per_step"], 3)
        r["calls_per_step"] = round(r["calls_per_step"], 1)
    return {"total_ms_per_step": round(1e3 * total / n_steps, 2),
            "matmul_share": round(mm / total, 4), "matmul_ms_per_step": round(1e3 * mm / n_steps, 2),
            "top_own_time": rows[:top]}


def worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    common.use_repo()
    install_hook()
    import numpy as np
    from steps import MinblipStep
    import minblip.layers
    if not isinstance(minblip.layers.__spec__.loader, _Loader):
        raise RuntimeError("minblip was not loaded through the instrumenting hook")
    repeats = args.repeats or 10
    time_layers()
    step = MinblipStep()
    for _ in range(3):
        step()
    shares, reduction_shares, step_s, mm_s, calls = [], [], [], [], []
    layer_shares = {name: [] for name in TIMED_LAYERS}
    free_shares = []
    for _ in range(repeats):
        STATS.seconds, STATS.reduction_seconds, STATS.calls = 0.0, 0.0, 0
        STATS.layer_seconds = {}
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        shares.append(STATS.seconds / elapsed)
        reduction_shares.append(STATS.reduction_seconds / elapsed)
        step_s.append(elapsed)
        mm_s.append(STATS.seconds)
        calls.append(STATS.calls)
        for name in TIMED_LAYERS:
            layer_shares[name].append(STATS.layer_seconds.get(name, 0.0) / elapsed)
        free_shares.append(STATS.seconds / (elapsed - sum(STATS.layer_seconds.values())))
    STATS.record = []
    step()
    record, STATS.record = STATS.record, None
    median_step = float(np.median(step_s))
    overhead = wrapper_overhead_s()
    replay = replay_seconds(record)
    by_kind = {}
    for kind, *_ in record:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    out = {"threads": threads, "load_average_start": common.load_average(),
           "share": round(float(np.median(shares)), 4),
           "share_quartiles": [round(float(q), 4) for q in np.percentile(shares, [25, 75])],
           "reduction_share": round(float(np.median(reduction_shares)), 4),
           "step_ms": common.summary_ms(step_s),
           "matmul_ms": common.summary_ms(mm_s),
           "products_per_step": int(np.median(calls)), "products_by_kind": by_kind,
           "wrapper_overhead_us": round(1e6 * overhead, 3),
           "overhead_share": round(overhead * float(np.median(calls)) / median_step, 4),
           "replay_ms": round(1e3 * replay, 3),
           "replay_share": round(replay / median_step, 4),
           "layer_shares": {name: round(float(np.median(v)), 4)
                            for name, v in layer_shares.items()},
           "share_if_free": round(float(np.median(free_shares)), 4),
           "cprofile": profile_table(step, max(3, repeats // 2), args.top)}
    out["load_average_end"] = common.load_average()
    return out


def measure(threads=common.THREADS, repeats=None, top: int = 25) -> dict:
    per = {}
    for n in threads:
        print(f"-- matrix-product share of a training step, {n} thread(s) --", flush=True)
        extra = ["--top", str(top)] + (["--repeats", str(repeats)] if repeats else [])
        per[str(n)] = r = common.run_worker("bench_matmul_share.py", n, extra)
        if "error" in r:
            print(f"   failed: {r['error']}")
            continue
        cp = r["cprofile"]
        print(f"   share {r['share']:.1%} (quartiles {r['share_quartiles'][0]:.1%}-"
              f"{r['share_quartiles'][1]:.1%}) of a {r['step_ms']['median_ms']:.1f} ms step, "
              f"{r['products_per_step']} products {r['products_by_kind']}")
        print(f"   row reductions done as matrix-vector products (not counted above): "
              f"{r['reduction_share']:.1%} of the step")
        print(f"   wrapper overhead {r['wrapper_overhead_us']:.2f} us/call = "
              f"{r['overhead_share']:.2%} of the step; replay on contiguous arrays "
              f"{r['replay_ms']:.1f} ms = {r['replay_share']:.1%}; cProfile share "
              f"{cp['matmul_share']:.1%}")
        layers = ", ".join(f"{name} {v:.1%}" for name, v in r["layer_shares"].items())
        print(f"   inside {layers} of the step; with those taking no time the share would be "
              f"{r['share_if_free']:.1%}")
        print(f"   functions with the most own time (cProfile, {cp['total_ms_per_step']:.0f} "
              f"ms/step profiled; {top} kept in the JSON):")
        for row in cp["top_own_time"][:min(top, 15)]:
            print(f"     {row['own_share']:6.1%} {row['own_ms_per_step']:8.2f} ms "
                  f"{row['calls_per_step']:8.0f} calls  {row['function']}")
        print(f"   load {r['load_average_start']} -> {r['load_average_end']}")
    return {"per_threads": per}


def headline(result: dict, threads: str = "1"):
    r, why = common.measured(result, threads)
    return (None, why) if r is None else (r["share"], None)


def main(argv=None) -> int:
    p = common.worker_args()
    p.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    args = p.parse_args(argv)
    return common.run_script(args, worker, lambda: measure(args.threads, args.repeats, args.top))


if __name__ == "__main__":
    sys.exit(main())
