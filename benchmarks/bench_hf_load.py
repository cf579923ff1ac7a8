"""Full-size Hugging Face checkpoints: load time, peak memory and caption time,
minblip against transformers, in one run.

    python benchmarks/bench_hf_load.py --model blip-base [--workdir DIR]
    python benchmarks/bench_hf_load.py --model blip-base-float16
    python benchmarks/bench_hf_load.py --model blip2-opt-2.7b [--workdir DIR]

Run it with the reference environment (reference/README.md): transformers
builds the checkpoints and is the other side of every figure. Each model is
random-initialised at the real shapes and saved once in ``--workdir`` (kept
for the next run):

* ``blip-base``: ``BlipForConditionalGeneration(BlipConfig())`` (ViT-B/16 at
  384 px, BERT-base decoder), one ``model.safetensors`` in float32;
  ``blip-base-float16``: the same saved in float16, so that loading converts
  every tensor (a float32 file is used in place, as its memory map).
* ``blip2-opt-2.7b``: ``Blip2ForConditionalGeneration`` with BLIP-2 OPT-2.7b's
  sizes (ViT-g 39 layers, 32 queries, OPT 2560 wide x 32 layers), saved
  sharded in float16 as the hub has it (about 3.9 billion parameters: 7.7 GB
  on disk, 15.5 GB as float32). Each side then holds the float32 model, one
  after the other: run it alone on a machine with about 17 GB free.

Then, each in a fresh process with one thread (the order minblip, HF), a
worker loads the folder in float32, captions the committed photograph greedily
and with beam search (BLIP: 20 / 5 tokens, 3 beams; BLIP-2: 20 new tokens, 5
beams) and reports: wall and CPU seconds of the load and of each caption, and
the peak resident memory of the load above what the process held before it
(the peak resident size, counted afresh from just before loading, minus the
resident size then; likewise for the whole run). The targets are
checked and stored, never asserted: minblip's peak at most 1.2 x the weights'
float32 size, its load time at most 2 x transformers'.

The figures go to ``benchmarks/hf_load_results.json`` (one entry per model) and
the README's full-size section between ``<!-- full-size table -->`` and
``<!-- end of full-size table -->`` is rewritten from that file (``--no-readme``
leaves it alone; ``--readme-only`` rewrites it without measuring). ``--layers N``
shrinks every sub-model to N layers, to try the script quickly; such runs are
stored under their own key and never shown in the README.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import readme_table

RESULTS = common.ROOT / "benchmarks" / "hf_load_results.json"
PHOTO = common.ROOT / "data_samples" / "photos" / "grace_hopper.jpg"
BEGIN, END = "<!-- full-size table -->", "<!-- end of full-size table -->"
MODELS = ("blip-base", "blip-base-float16", "blip2-opt-2.7b")
PEAK_TARGET, LOAD_TARGET = 1.2, 2.0
# decoding: BLIP's demo settings for beams; greedy as a plain generate() does it
BLIP_DECODING = {"greedy": dict(method="greedy", num_beams=1, max_length=20, min_length=0),
                 "beam": dict(method="beam", num_beams=3, max_length=20, min_length=5)}
BLIP2_NEW_TOKENS = 20
BLIP2_DECODING = {"greedy": dict(method="greedy", num_beams=1),
                  "beam": dict(method="beam", num_beams=5)}


# ---------------------------------------------------------------------------------------
# Checkpoints (transformers)
# ---------------------------------------------------------------------------------------

def blip2_opt_27b_config(layers: int | None = None) -> dict:
    """Salesforce/blip2-opt-2.7b's config (its published sizes), optionally shrunk."""
    text = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32,
                ffn_dim=10240, num_attention_heads=32, max_position_embeddings=2048,
                word_embed_proj_dim=2560, bos_token_id=2, eos_token_id=2, pad_token_id=1,
                activation_function="relu", do_layer_norm_before=True)
    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                  num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6,
                  qkv_bias=True, initializer_range=0.02)
    qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, cross_attention_frequency=2,
                   encoder_hidden_size=1408)
    if layers:
        for sub in (text, vision, qformer):
            sub["num_hidden_layers"] = layers
    return dict(vision_config=vision, qformer_config=qformer, text_config=text,
                num_query_tokens=32, image_token_index=50265)


def make_checkpoint(model: str, folder: Path, layers: int | None) -> None:
    """Random-initialised model of the real shapes, saved as the hub stores it."""
    import torch
    import transformers
    torch.manual_seed(0)
    if model.startswith("blip-base"):
        config = transformers.BlipConfig()
        if layers:
            config.vision_config.num_hidden_layers = layers
            config.text_config.num_hidden_layers = layers
        hf_model = transformers.BlipForConditionalGeneration(config)
        if model.endswith("float16"):
            hf_model = hf_model.half()
        hf_model.save_pretrained(folder)
    else:
        config = transformers.Blip2Config(**blip2_opt_27b_config(layers))
        torch.set_default_dtype(torch.float16)  # built in half precision: 7.7 GB, not 15.5
        try:
            hf_model = transformers.Blip2ForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(torch.float32)
        hf_model.save_pretrained(folder, max_shard_size="2GB")
    del hf_model


# ---------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------

def rss_mb() -> float:
    """The resident size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Start the peak resident size (VmHWM) afresh at the current size, so a peak
    from before (imports, image decoding) cannot hide in it (Linux's clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    """The peak resident size since :func:`reset_peak` (or since the start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def worker(side: str, model: str, folder: str) -> dict:
    common.use_repo()
    from minblip.image import preprocess
    blip = model.startswith("blip-base")
    size = 384 if blip else 224
    pixels = preprocess(str(PHOTO), size)
    out = {"side": side, "threads": 1}
    if side == "minblip":
        from minblip import hf, hf_blip2
        load = hf.load_blip_captioning if blip else hf_blip2.load_blip2
        reset_peak()
        before = rss_mb()
        net, out["load_seconds"], out["load_cpu_seconds"] = timed(lambda: load(folder))
        out["load_peak_mb"] = peak_mb() - before
        out["parameters"] = net.param_count(include_frozen=True)

        def caption(decoding):
            if blip:
                return hf.caption_generate(net, pixels, None, **decoding)[0].tolist()
            # BOS, then 1 to BLIP2_NEW_TOKENS new tokens (HF: min/max_new_tokens)
            return hf_blip2.blip2_generate(net, pixels, None, max_length=1 + BLIP2_NEW_TOKENS,
                                           min_length=2, **decoding)[0].tolist()
    else:
        import torch
        import transformers
        torch.set_num_threads(1)
        cls = (transformers.BlipForConditionalGeneration if blip
               else transformers.Blip2ForConditionalGeneration)
        reset_peak()
        before = rss_mb()
        net, out["load_seconds"], out["load_cpu_seconds"] = timed(
            lambda: cls.from_pretrained(folder, dtype=torch.float32).eval())
        out["load_peak_mb"] = peak_mb() - before
        out["parameters"] = sum(p.numel() for p in net.parameters())
        px = torch.from_numpy(pixels)

        def caption(decoding):
            kw = dict(do_sample=False, num_beams=decoding["num_beams"])
            if blip:
                kw.update(max_length=decoding["max_length"], min_length=decoding["min_length"])
            else:
                kw.update(max_new_tokens=BLIP2_NEW_TOKENS, min_new_tokens=1)
            with torch.no_grad():
                ids = net.generate(pixel_values=px, **kw)[0].tolist()
            if not blip:
                ids = ids[net.config.num_query_tokens:]  # after the image placeholders
            return ids
    settings = BLIP_DECODING if blip else BLIP2_DECODING
    for name, decoding in settings.items():
        ids, wall, cpu = timed(lambda d=decoding: caption(d))
        out[f"{name}_seconds"], out[f"{name}_cpu_seconds"], out[f"{name}_ids"] = wall, cpu, ids
    out["peak_mb"] = peak_mb() - before
    out["weights_float32_mb"] = out["parameters"] * 4 / 2**20
    return out


def run_worker(side: str, model: str, folder: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--folder",
               str(folder), "--result", str(result)]
        proc = subprocess.run(cmd, env=common.thread_env(1), stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not result.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
            return {"error": f"{side} worker exited with {proc.returncode}: {tail}"}
        return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------
# The run, the results file and the README
# ---------------------------------------------------------------------------------------

def measure(model: str, workdir: Path, layers: int | None) -> dict:
    folder = workdir / (model + (f"-{layers}-layers" if layers else ""))
    if not (folder / "config.json").is_file():
        print(f"building {folder} (random weights, real shapes) ...")
        folder.mkdir(parents=True, exist_ok=True)
        make_checkpoint(model, folder, layers)
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    entry = {"model": model, "layers": layers, "date": datetime.datetime.now().isoformat(),
             "command": " ".join(["python benchmarks/bench_hf_load.py"] + sys.argv[1:]),
             "environment": common.environment(), "checkpoint_gb": round(disk / 1e9, 3),
             "load_average_start": common.load_average()}
    for side in ("minblip", "hf"):
        print(f"{model}: {side} ...", flush=True)
        entry[side] = run_worker(side, model, folder)
        print(json.dumps({k: v for k, v in entry[side].items() if not k.endswith("_ids")}))
    entry["load_average_end"] = common.load_average()
    mine, theirs = entry["minblip"], entry["hf"]
    if "error" not in mine and "error" not in theirs:
        weights = mine["weights_float32_mb"]
        entry["peak_over_weights"] = mine["load_peak_mb"] / weights
        entry["load_time_ratio"] = mine["load_seconds"] / theirs["load_seconds"]
        entry["load_cpu_ratio"] = mine["load_cpu_seconds"] / theirs["load_cpu_seconds"]
        entry["peak_target_met"] = entry["peak_over_weights"] <= PEAK_TARGET
        entry["load_target_met"] = entry["load_time_ratio"] <= LOAD_TARGET
        entry["same_greedy_ids"] = mine["greedy_ids"] == theirs["greedy_ids"]
    return entry


def _row(what, mine, theirs, fmt):
    """A table row: both figures and their ratio ("-" for a missing one)."""
    def cell(v):
        return "-" if v is None else fmt.format(v)
    ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else "-"
    return f"| {what} | {cell(mine)} | {cell(theirs)} | {ratio} |"


def render(results: dict) -> str:
    """The README's full-size section from the results file."""
    out = []
    names = {"blip-base": "BLIP base captioning (`BlipConfig()`, ViT-B/16 at 384 px, BERT-base)",
             "blip-base-float16": "The same saved in float16 (converted once to float32 on "
                                  "loading)",
             "blip2-opt-2.7b": "BLIP-2 OPT-2.7b (ViT-g, 32 queries, OPT-2.7b; sharded float16 "
                               "on disk)"}
    for model in MODELS:
        e = results.get(model)
        out.append(f"**{names[model]}**")
        out.append("")
        if e is None:
            alone = (" (alone on the machine; it needs about 17 GB free)"
                     if model.startswith("blip2") else "")
            out += [f"Not measured yet: `python benchmarks/bench_hf_load.py --model {model}`"
                    f"{alone}.", ""]
            continue
        if "error" in e["minblip"]:
            out += [f"The last run failed: {e['minblip']['error']}", ""]
            continue
        m, h = e["minblip"], ({} if "error" in e["hf"] else e["hf"])  # HF may fail alone
        rows = (("load, wall seconds", "load_seconds", "{:.2f}"),
                ("load, CPU seconds", "load_cpu_seconds", "{:.2f}"),
                ("load, peak memory above the process before it (MB)", "load_peak_mb", "{:.0f}"),
                ("load and both captions, peak memory above the process before loading (MB)",
                 "peak_mb", "{:.0f}"),
                ("greedy caption, wall seconds", "greedy_seconds", "{:.2f}"),
                ("greedy caption, CPU seconds", "greedy_cpu_seconds", "{:.2f}"),
                ("beam-search caption, wall seconds", "beam_seconds", "{:.2f}"),
                ("beam-search caption, CPU seconds", "beam_cpu_seconds", "{:.2f}"))
        out += ["| one process, one thread | minblip | transformers | minblip / HF |",
                "|---|---|---|---|",
                *(_row(what, m[key], h.get(key), fmt) for what, key, fmt in rows), ""]
        verdict = {True: "met", False: "**not met**"}
        weights = m["weights_float32_mb"]
        mapped = ("A float32 file is used in place, as a memory map (by both): its pages "
                  "are read, and counted, when a caption first uses them. "
                  if m["load_peak_mb"] < weights / 2 else "")
        peak = m["load_peak_mb"] / weights
        text = (f"{m['parameters'] / 1e6:.0f}M parameters, {weights:.0f} MB as float32 "
                f"({e['checkpoint_gb']:.2f} GB on disk). {mapped}Targets: minblip's load peak "
                f"at most {PEAK_TARGET} x the float32 weights: {peak:.2f}, "
                f"{verdict[peak <= PEAK_TARGET]}; ")
        if h:
            text += (f"its load time at most {LOAD_TARGET:.0f} x transformers': "
                     f"{e['load_time_ratio']:.2f} ({e['load_cpu_ratio']:.2f} in CPU time), "
                     f"{verdict[e['load_target_met']]}. Greedy captions "
                     f"{'identical' if e['same_greedy_ids'] else 'differ'} token for token. ")
        else:
            text += f"transformers' side failed: {e['hf']['error']}. "
        out.append(text + f"Measured {e['date'][:10]} by `{e['command']}`, load average "
                   f"{e['load_average_start']} at the start and {e['load_average_end']} at "
                   f"the end.")
        out.append("")
    return "\n".join(out).rstrip()


def update_readme(results_path: Path, readme_path: Path, check: bool = False) -> bool:
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    old = readme_path.read_text()
    new = readme_table.replace_between_markers(old, render(results), str(readme_path),
                                               BEGIN, END)
    if check or new == old:
        return new == old
    common.use_repo()
    from minblip.files import write_text_atomic
    write_text_atomic(readme_path, new)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="blip-base")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "minblip-hf-bench"),
                   help="where the checkpoints are built and kept (default %(default)s)")
    p.add_argument("--layers", type=int, default=None,
                   help="shrink every sub-model to this many layers (a quick trial)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--readme", default=str(common.ROOT / "README.md"))
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--readme-only", action="store_true")
    p.add_argument("--worker", choices=["minblip", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args.model, args.folder)))
        return 0
    out = Path(args.out)
    if not args.readme_only:
        ok, why = common.torch_available()
        if not ok:
            print(why)
            return 1
        entry = measure(args.model, Path(args.workdir), args.layers)
        results = json.loads(out.read_text()) if out.exists() else {}
        results[args.model + (f"-{args.layers}-layers" if args.layers else "")] = entry
        common.use_repo()
        from minblip.files import write_json_atomic
        write_json_atomic(out, results)
        print(f"wrote {out}")
    if not args.no_readme:
        update_readme(out, Path(args.readme))
        print(f"wrote the full-size section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
