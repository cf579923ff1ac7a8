"""Build the tiny Hugging Face checkpoints the tests load, with the reference outputs
of transformers, and commit them under tests/fixtures/hf/.

    venv-ref/bin/python reference/make_hf_fixtures.py

Needs torch, transformers and tokenizers (the optional reference environment of
reference/README.md); the tests that read the result need none of them.
Nothing is downloaded: every model is built from a config with random weights
(``HF_HUB_OFFLINE=1``), the tokenizer trained here on a fixed text. Running it
again rewrites the same files (seeded; the bytes can differ with another
version of torch or tokenizers).

What it writes (``tests/fixtures/hf/``):

* ``bpe/``: a byte-level BPE tokenizer (trained on :data:`CORPUS`) laid out as an OPT
  hub folder
  (``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` with
  ``add_bos_token`` and the ``<image>`` token BLIP-2's processor adds);
  ``bpe_json/``: the same tokenizer as transformers 5 saves it
  (``tokenizer.json`` and ``tokenizer_config.json`` only);
  ``reference/bpe.json``: ids and decodes of odd strings by transformers'
  ``GPT2Tokenizer``.
* ``blip2_opt_q1/``, ``blip2_opt_q8/``, ``blip2_opt_q32/``:
  ``Blip2ForConditionalGeneration`` with an OPT, odd head counts (3, 5, 7)
  and 1, 8 and 32 queries; q8 saved in shards, q32 in bfloat16; each with the
  tokenizer. ``reference/<name>.npz`` and ``.json``: the pixels of the
  committed photograph as ``Blip2Processor`` makes them, the prompt's ids,
  the projected queries and the logits in float64, and the ids of greedy and
  beam-search generations.
* ``opt_project/``: an ``OPTForCausalLM`` whose token embeddings are narrower
  than the model (project in and out) and without a final LayerNorm, with its
  float64 logits.
* ``blip_vqa/``: ``BlipForQuestionAnswering`` with a WordPiece ``vocab.txt``;
  ``reference/blip_vqa.npz`` and ``.json``: pixels, question ids, answer
  logits and the answers of ``generate``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (AutoTokenizer, BertTokenizer, Blip2Config,  # noqa: E402
                          Blip2ForConditionalGeneration, BlipConfig, BlipForQuestionAnswering,
                          OPTConfig, OPTForCausalLM)
from transformers.models.blip.image_processing_pil_blip import \
    BlipImageProcessorPil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "data_samples" / "photos" / "grace_hopper.jpg"
IMAGE_SIZE, PATCH = 16, 8
QUESTION = "Question: what is in the picture? Answer:"
LOGIT_POSITIONS = 4  # stored for the last few positions of the question
BPE_VOCAB, IMAGE_TOKEN, OPT_VOCAB = 400, 400, 404  # <image> right after the trained vocabulary

# Odd strings for the tokenizer: bytes of every length, emoji (with joiners and
# modifiers), CJK, combining marks, whitespace runs of every kind, contractions,
# digits, punctuation runs and the special tokens written in the text.
ODD_STRINGS = [
    "", " ", "  ", "\n", "\t", "a", "Hello world", " Hello world", "Hello  world",
    "hello   world  ", "don't stop", "I'M HERE, you're 'll 'd 've 's",
    "'s'ss''", "x\n\ny", "line one\r\nline two", "tab\there\tand\t\tthere",
    " \t \n mixed whitespace \u3000 ideographic", "trailing spaces   ",
    "numbers 12345 and 3.14159, -42", "2024-11-29T12:00:00Z", "a1b2c3", "½ ² ٣ 〇",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "cafe\u0301 (combining acute)",
    "\u0130stanbul ΣΑΣ σας", "Ελληνικά κείμενα", "Русский текст", "עברית", "العربية", "हिन्दी",
    "你好，世界", "日本語のテキスト", "한국어 텍스트", "𠀀𠀁 (astral CJK)",
    "😀", "👩‍👩‍👧‍👦 family", "👍🏽 thumbs", "🇫🇷 flag", "emoji😀in😀words", "♥♦♣♠",
    "zero\u200bwidth", "soft\u00adhyphen", "nbsp\u00a0space", "em\u2003space",
    "ctrl\x01\x02\x7f",
    "nul\x00byte", "bell\x07", "\x1c\x1d\x1e\x1f separators", "!!!???...", "((([[[{{{}}}]]])))",
    "a.b,c;d:e!f?g", "<s>not special</s>", "</s></s>", "<pad> padded", "<image><image> question",
    "Question: what is in the picture? Answer:", "a photo of", "\\ backslash / slash",
    "quotes \"double\" 'single' `back`", "~tilde ^caret |pipe", "mañana über straße",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "   leading", "\u2028line sep\u2029para sep", "\x85next line",
]


# The text the tokenizer is trained on: fixed here, so that the merges never change
CORPUS = """\
minblip is BLIP and BLIP-2 rebuilt from scratch in plain NumPy: every forward and every
backward pass is written by hand, every concept has a notebook, and every gradient is
checked against finite differences in float64. It reads the checkpoints of the reference
models, captions a photograph, answers a question about it, and ranks images for a text.
The image encoder is a vision transformer; the text side is a transformer that encodes,
matches and decodes; BLIP-2 puts a small querying transformer between a frozen image
encoder and a frozen language model, whose soft prompts are the projected queries.
What is in the picture? A woman in a navy uniform. What colour is the flag? Red, white
and blue. How many people are there? Two. Where is the hat? On the table, left of the cup.
Questions and answers, captions and prompts, numbers like 12, 345 and 2024, and words
such as don't, it's, we're, they've, I'm, you'll and she'd.
"""


def randomize(model, seed, scale=0.3):
    """Weights far from HF's init, so every output depends visibly on every tensor
    (LayerNorm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            is_norm = name.endswith("weight") and ("norm" in name.lower())
            p.copy_(1.0 + 0.2 * noise if is_norm else scale * noise)


def image_processor(size=IMAGE_SIZE):
    return BlipImageProcessorPil(size={"height": size, "width": size})


def pixels(size=IMAGE_SIZE):
    """The committed photograph as the HF image processor makes it (1, 3, size, size)."""
    with Image.open(PHOTO) as im:
        return image_processor(size)(im.convert("RGB"), return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------
# The BPE tokenizer
# ---------------------------------------------------------------------------------------

def make_bpe(out: Path):
    """Train a small byte-level BPE, write it as an OPT hub folder and as transformers 5
    saves it, and record transformers' ids and decodes of the odd strings."""
    from tokenizers import ByteLevelBPETokenizer
    corpus = [CORPUS * 4, " ".join(ODD_STRINGS) * 3,
              (QUESTION + " a photo of a woman in a navy uniform\n") * 5]
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(corpus, vocab_size=BPE_VOCAB, min_frequency=2,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                show_progress=False)
    folder = out / "bpe"
    folder.mkdir(parents=True, exist_ok=True)
    trained.save_model(str(folder))
    assert len(json.loads((folder / "vocab.json").read_text())) == BPE_VOCAB
    special = {"content": "<image>", "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False, "special": True}
    config = {"add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>",
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>",
              "errors": "replace", "tokenizer_class": "GPT2Tokenizer",
              "model_max_length": 1000000000000000019884624838656,
              "added_tokens_decoder": {str(IMAGE_TOKEN): special}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    tok.save_pretrained(str(out / "bpe_json"))  # transformers 5: tokenizer.json only
    again = AutoTokenizer.from_pretrained(str(out / "bpe_json"))
    cases = []
    for text in ODD_STRINGS:
        ids = tok(text).input_ids
        assert again(text).input_ids == ids, text
        cases.append({"text": text, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=True),
                      "decoded_with_special": tok.decode(ids, skip_special_tokens=False)})
    # ids that are not a tokenization: bytes cut inside a character, special tokens between
    rng = np.random.default_rng(0)
    for _ in range(10):
        ids = rng.integers(0, BPE_VOCAB + 1, size=int(rng.integers(1, 12))).tolist()
        cases.append({"text": None, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=True),
                      "decoded_with_special": tok.decode(ids, skip_special_tokens=False)})
    write_json(out / "reference" / "bpe.json", {"transformers": _versions(), "cases": cases})
    return tok


# ---------------------------------------------------------------------------------------
# BLIP-2 with OPT
# ---------------------------------------------------------------------------------------

BLIP2_VARIANTS = {
    # name: (queries, Q-Former cross-attention frequency, how it is saved, seed, early end)
    "blip2_opt_q1": (1, 1, "float32", 1, False),
    "blip2_opt_q8": (8, 2, "sharded", 8, True),
    "blip2_opt_q32": (32, 2, "bfloat16", 32, True),
}
WEIGHT_SCALE = 0.5  # large enough that the next token depends on the context


def blip2_config(queries: int, freq: int) -> Blip2Config:
    vision = dict(hidden_size=12, intermediate_size=20, num_hidden_layers=2,
                  num_attention_heads=3, image_size=IMAGE_SIZE, patch_size=PATCH,
                  layer_norm_eps=1e-6, initializer_range=0.02)
    qformer = dict(vocab_size=30, hidden_size=10, num_hidden_layers=2, num_attention_heads=5,
                   intermediate_size=14, max_position_embeddings=16,
                   cross_attention_frequency=freq)
    text = dict(vocab_size=OPT_VOCAB, hidden_size=14, num_hidden_layers=2, ffn_dim=22,
                num_attention_heads=7, max_position_embeddings=80, bos_token_id=2,
                eos_token_id=2, pad_token_id=1, word_embed_proj_dim=14, model_type="opt")
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=queries, image_token_index=IMAGE_TOKEN)


def hf_generate_blip2(model, px, prompt_ids, queries, eos, **kw):
    """HF ids after the placeholders, cut before the first end token after the prompt."""
    ids = torch.tensor([[IMAGE_TOKEN] * queries + prompt_ids])
    out = model.generate(pixel_values=px, input_ids=ids, eos_token_id=eos, pad_token_id=1,
                         **kw)[0, queries:].tolist()
    tail = out[len(prompt_ids):]
    return prompt_ids + (tail[:tail.index(eos)] if eos in tail else tail)


def early_end_token(model, px, prompt_ids, queries, step=3):
    """A token that greedy decoding writes at ``step`` and not before: made the end
    token, it ends some generations early and lets others run on (random weights
    never pick OPT's own </s>)."""
    out = hf_generate_blip2(model, px, prompt_ids, queries, 2, do_sample=False,
                            max_new_tokens=8, min_new_tokens=8)[len(prompt_ids):]
    for start in range(step, 0, -1):  # as late as the greedy path allows
        for k in range(start, len(out)):
            if out[k] not in out[:k] and out[k] not in (0, 1, 2, 3):
                return out[k]
    raise RuntimeError(f"no new token in {out}")


def make_blip2(out: Path, tok) -> None:
    px = pixels()
    question = tok(QUESTION).input_ids
    bos = [tok.bos_token_id]
    for name, (queries, freq, saved, seed, early) in BLIP2_VARIANTS.items():
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(blip2_config(queries, freq)).eval()
        randomize(model, seed, WEIGHT_SCALE)
        eos = 2
        if early:
            eos = early_end_token(model.to(torch.float64), px.double(), question, queries)
            model = model.to(torch.float32)
            model.config.text_config.eos_token_id = eos
            model.language_model.config.eos_token_id = eos
            model.language_model.generation_config.eos_token_id = eos
            model.generation_config.eos_token_id = eos
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        if saved == "bfloat16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(str(folder), max_shard_size="40KB" if saved == "sharded" else "1GB")
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(out / "bpe" / f, folder / f)
        model = model.to(torch.float64)  # the reference: the saved values, in float64
        with torch.no_grad():
            features = model.get_image_features(px.double()).pooler_output
            ids = torch.tensor([[IMAGE_TOKEN] * queries + question])
            logits = model(pixel_values=px.double(), input_ids=ids).logits[:, queries:]
        generations = []
        for prompt in (bos, question):
            P = len(prompt)
            for method, beams, max_len, min_len in (("greedy", 1, P + 7, 0),
                                                    ("greedy", 1, P + 6, P + 4),
                                                    ("beam", 3, P + 7, 0),
                                                    ("beam", 2, P + 6, P + 3),
                                                    ("beam", 5, P + 8, 0)):
                got = hf_generate_blip2(model, px.double(), prompt, queries, eos,
                                        do_sample=False, num_beams=beams,
                                        max_length=queries + max_len,
                                        min_length=queries + min_len)
                generations.append({"prompt": prompt, "method": method, "num_beams": beams,
                                    "max_length": max_len, "min_length": min_len, "ids": got,
                                    "text": tok.decode([IMAGE_TOKEN] * queries + got,
                                                       skip_special_tokens=True).strip()})
        # the logits of the last positions: each depends on every weight and every earlier
        # position (the whole table would be most of the fixture's size)
        np.savez_compressed(out / "reference" / f"{name}.npz", pixel_values=px.numpy(),
                            question_ids=np.array(question), image_features=features.numpy(),
                            logits=logits[:, -LOGIT_POSITIONS:].numpy())
        write_json(out / "reference" / f"{name}.json",
                   {"transformers": _versions(), "queries": queries, "saved": saved,
                    "eos_token_id": eos, "question": QUESTION, "generations": generations})
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"{[g['ids'][len(g['prompt']):] for g in generations]}")


def make_opt(out: Path) -> None:
    """A bare OPTForCausalLM with project_in/out (word_embed_proj_dim < hidden_size) and
    no final LayerNorm."""
    config = OPTConfig(vocab_size=40, hidden_size=10, num_hidden_layers=2, ffn_dim=18,
                       num_attention_heads=5, max_position_embeddings=24,
                       word_embed_proj_dim=6, _remove_final_layer_norm=True,
                       activation_function="relu", bos_token_id=2, eos_token_id=2,
                       pad_token_id=1)
    torch.manual_seed(3)
    model = OPTForCausalLM(config).eval()
    assert model.model.decoder.project_in is not None
    assert model.model.decoder.final_layer_norm is None
    randomize(model, 3, WEIGHT_SCALE)
    folder = out / "opt_project"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    model = model.to(torch.float64)
    ids = torch.tensor([[2, 5, 9, 33, 7, 7, 12, 39, 3], [2, 17, 1, 1, 20, 4, 8, 8, 30]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    np.savez_compressed(out / "reference" / "opt_project.npz", ids=ids.numpy(),
                        logits=logits.numpy())


# ---------------------------------------------------------------------------------------
# BLIP VQA
# ---------------------------------------------------------------------------------------

VQA_WORDS = ("a the is what in of picture photo woman man hat flag red blue white uniform "
             "navy officer yes no two one it there who wearing color ?").split()
VQA_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + VQA_WORDS + ["[DEC]", "[ENC]"]
VQA_QUESTION = "what is in the picture?"


def end_bias(margins, want: int, gap: float = 0.05) -> float:
    """The bias that makes the end token win first at step ``want`` of a greedy path
    whose end-token margins (best logit - end logit) are ``margins``; an earlier
    step when ``want`` cannot be first."""
    for t in range(want, -1, -1):
        if all(m > margins[t] + gap for m in margins[:t]):
            return margins[t] + gap / 2
    raise AssertionError("unreachable: step 0 always qualifies")


def tok_from(vocab_file):
    """BLIP's tokenizer over a vocab.txt: BERT's, with [DEC] (its BOS) and [ENC] special."""
    return BertTokenizer(str(vocab_file), bos_token="[DEC]",
                         additional_special_tokens=["[ENC]"])


def make_vqa(out: Path) -> None:
    V = len(VQA_VOCAB)
    dec, sep = VQA_VOCAB.index("[DEC]"), VQA_VOCAB.index("[SEP]")
    size = 32
    config = BlipConfig(
        vision_config=dict(hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=20, image_size=size, patch_size=8,
                           layer_norm_eps=1e-5, initializer_range=0.02),
        text_config=dict(vocab_size=V, hidden_size=12, num_hidden_layers=2,
                         num_attention_heads=3, intermediate_size=18,
                         max_position_embeddings=20, pad_token_id=0, bos_token_id=dec,
                         sep_token_id=sep, eos_token_id=sep, encoder_hidden_size=12),
        image_text_hidden_size=8)
    torch.manual_seed(5)
    model = BlipForQuestionAnswering(config).eval()
    randomize(model, 5, WEIGHT_SCALE)
    with torch.no_grad():  # answers made of words: the special tokens' output rows shrink
        table = model.text_decoder.get_input_embeddings().weight
        for token in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", "[DEC]", "[ENC]"):
            table[VQA_VOCAB.index(token)] *= 0.2
    px = pixels(size)
    folder = out / "blip_vqa"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in VQA_VOCAB))
    tok = tok_from(folder / "vocab.txt")
    q = tok(VQA_QUESTION, return_tensors="pt")
    # raise [SEP]'s bias until greedy decoding picks it at the third answer token
    steps = model.generate(input_ids=q.input_ids, pixel_values=px, max_length=6, min_length=6,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    margins = [float(s[0].max() - s[0, sep]) for s in steps.logits]
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[sep] += end_bias(margins, 2)
    model.save_pretrained(str(folder))
    model = model.to(torch.float64)
    px = px.double()
    answer_prefix = torch.tensor([[dec, VQA_VOCAB.index("a"), VQA_VOCAB.index("woman")]])
    with torch.no_grad():
        image = model.vision_model(pixel_values=px).last_hidden_state
        question = model.text_encoder(input_ids=q.input_ids, attention_mask=q.attention_mask,
                                      encoder_hidden_states=image).last_hidden_state
        logits = model.text_decoder(input_ids=answer_prefix, encoder_hidden_states=question,
                                    return_dict=True).logits
    answers = []
    for method, beams, max_len, min_len in (("greedy", 1, 10, 0), ("greedy", 1, 8, 5),
                                            ("beam", 3, 10, 1), ("beam", 2, 9, 4)):
        ids = model.generate(input_ids=q.input_ids, pixel_values=px, num_beams=beams,
                             max_length=max_len, min_length=min_len, do_sample=False)[0].tolist()
        ids = ids[:ids.index(sep)] if sep in ids else ids
        answers.append({"method": method, "num_beams": beams, "max_length": max_len,
                        "min_length": min_len, "ids": ids,
                        "text": tok.decode(ids, skip_special_tokens=True)})
    np.savez_compressed(out / "reference" / "blip_vqa.npz", pixel_values=px.float().numpy(),
                        question_ids=q.input_ids.numpy(), answer_prefix=answer_prefix.numpy(),
                        logits=logits.numpy())
    write_json(out / "reference" / "blip_vqa.json",
               {"transformers": _versions(), "question": VQA_QUESTION, "answers": answers})
    print("blip_vqa:", [a["ids"] for a in answers])


def _versions() -> dict:
    import transformers
    return {"transformers": transformers.__version__, "torch": torch.__version__}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "hf"))
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tok = make_bpe(out)
    make_blip2(out, tok)
    make_opt(out)
    make_vqa(out)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
