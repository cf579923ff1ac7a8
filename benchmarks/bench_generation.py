"""Caption generation speed, with and without cached keys and values.

    python benchmarks/bench_generation.py [--threads 1 2] [--repeats 7]

``minblip.generation.generate(..., use_cache=True/False)`` on the demo-size
decoder (``TrainConfig()``'s model, with 32 text positions so that 30 tokens
fit after the [DEC] prompt). Every caption is exactly 30 generated tokens:
``min_length = max_length`` keeps [SEP] masked until the last step. The image
encoder runs once beforehand and is not timed. Two settings:

* greedy decoding of a batch of 32 images;
* beam search with 3 beams (BLIP's captioning default) over 4 images, which
  ``generate`` decodes as one batch of 4 x 3 rows.

Tokens per second = images x 30 / seconds. The cached and uncached runs
alternate in one process; the speedup is the median of per-round ratios
uncached time / cached time. Both must produce the same tokens (checked and
recorded). The weights are random: the amount of work does not depend on them.
"""
from __future__ import annotations

import sys

import common

NEW_TOKENS = 30
SETTINGS = {"greedy": {"method": "greedy", "images": 32},
            "beam3": {"method": "beam", "images": 4, "num_beams": 3}}


def worker(args) -> dict:
    (threads,) = args.threads
    common.check_worker_threads(threads)
    common.use_repo()
    import numpy as np
    from minblip import world
    from minblip.blip import BLIP
    from minblip.generation import generate
    from minblip.image import preprocess
    from minblip.train import TrainConfig, build_tokenizer

    repeats = args.repeats or 7
    tok = build_tokenizer()
    cfg = TrainConfig(max_text_len=NEW_TOKENS + 2)
    model = BLIP(cfg.model_config(tok.vocab_size), np.random.default_rng(0))
    data = world.make_dataset(64, 1, 1, seed=0, image_size=cfg.image_size)
    pixels = preprocess(data.train.images, cfg.image_size)
    prompt = np.array([tok.dec_id])
    length = prompt.size + NEW_TOKENS  # max_length and min_length count the prompt
    out = {"threads": threads, "load_average_start": common.load_average(),
           "new_tokens": NEW_TOKENS, "settings": {}}
    for name, s in SETTINGS.items():
        embeds, _ = model.encode_image(pixels[:s["images"]])
        kw = dict(sep_id=tok.sep_id, method=s["method"], max_length=length, min_length=length)
        if "num_beams" in s:
            kw["num_beams"] = s["num_beams"]
        results = {}

        def run(cache, _embeds=embeds, _kw=kw, _results=results):
            _results[cache] = generate(model.text_decoder, _embeds, prompt, use_cache=cache, **_kw)

        times = common.interleave({True: lambda: run(True), False: lambda: run(False)},
                                  repeats, warmup=1)
        lengths = {len(t) for g in results.values() for t in g.tokens}
        same = all(np.array_equal(a, b) for a, b in zip(results[True].tokens,
                                                        results[False].tokens))
        n_tokens = s["images"] * NEW_TOKENS
        med = {c: float(np.median(times[c])) for c in (True, False)}
        out["settings"][name] = {
            **s, "caption_lengths": sorted(lengths), "same_tokens": bool(same),
            "cached": {**common.summary_ms(times[True]),
                       "tokens_per_s": round(n_tokens / med[True], 1)},
            "uncached": {**common.summary_ms(times[False]),
                         "tokens_per_s": round(n_tokens / med[False], 1)},
            "speedup": common.paired_ratio(times[False], times[True])}
    out["load_average_end"] = common.load_average()
    return out


def measure(threads=common.THREADS, repeats=None) -> dict:
    per = {}
    for n in threads:
        print(f"-- caption generation, {NEW_TOKENS} tokens, {n} thread(s) --", flush=True)
        per[str(n)] = r = common.run_worker("bench_generation.py", n,
                                            ["--repeats", str(repeats)] if repeats else [])
        if "error" in r:
            print(f"   failed: {r['error']}")
            continue
        for name, s in r["settings"].items():
            print(f"   {name:<7} {s['images']:>2} images: cached {s['cached']['tokens_per_s']:>8.1f} "
                  f"tok/s, uncached {s['uncached']['tokens_per_s']:>8.1f} tok/s, speedup "
                  f"{s['speedup']['median']:.2f}; lengths {s['caption_lengths']}, "
                  f"same tokens: {s['same_tokens']}")
        print(f"   load {r['load_average_start']} -> {r['load_average_end']}")
    return {"per_threads": per}


def headline(result: dict, threads: str = "1", setting: str = "greedy"):
    r, why = common.measured(result, threads)
    return (None, why) if r is None else (r["settings"][setting]["speedup"]["median"], None)


def main(argv=None) -> int:
    args = common.worker_args().parse_args(argv)
    return common.run_script(args, worker, lambda: measure(args.threads, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
