"""The architecture pictures follow the objects they are drawn from."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minblip import diagrams  # noqa: E402
from minblip.blip import BLIP  # noqa: E402
from minblip.blip2_stage1 import Blip2Config, Blip2Stage1  # noqa: E402
from minblip.blip2_stage2 import Blip2Stage2  # noqa: E402
from minblip.capfilt import CapFiltConfig  # noqa: E402
from minblip.lm import LanguageModel, LMConfig  # noqa: E402
from minblip.qformer import QFormer, QFormerConfig  # noqa: E402
from minblip.text import TextConfig, build_med  # noqa: E402
from minblip.train import TrainConfig, build_tokenizer  # noqa: E402
from minblip.vit import ViTConfig  # noqa: E402

TEXT = TextConfig(vocab_size=30, width=8, depth=2, heads=2, mlp_dim=16, max_positions=12,
                  encoder_width=8)


def gids(fig):
    """The gid of every patch the picture drew, in drawing order."""
    return [p.get_gid() for ax in fig.axes for p in ax.patches if p.get_gid()]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_med_colours_follow_the_sharing_mode():
    counts = {}
    for mode in ("all_but_self_attention", "all", "none"):
        enc, dec = build_med(TEXT, np.random.default_rng(0), mode)
        found = gids(diagrams.draw_med(enc, dec))
        counts[mode] = found.count("med:shared")
        blocks = diagrams.med_parts(enc, dec)
        assert counts[mode] == sum(b.role == "shared" and b.runs for b in blocks)
        decoder_self = [b.role for b in blocks if b.column == 2 and "self-attention" in b.label]
        assert decoder_self == {"all_but_self_attention": ["decoder"] * 2,
                                "all": ["shared"] * 2, "none": ["decoder"] * 2}[mode]
    assert counts["none"] == 0
    assert counts["none"] < counts["all_but_self_attention"] < counts["all"]
    # BLIP's mode: embeddings + per layer cross-attention and FFN, in each of the 3 columns,
    # minus the cross-attention the text-mode column skips
    assert counts["all_but_self_attention"] == 3 * (1 + 2 * 2) - 2


def test_med_reads_identity_not_names():
    enc, dec = build_med(TEXT, np.random.default_rng(0))
    before = [b.role for b in diagrams.med_parts(enc, dec)]
    dec.bert.layers[1].ffn = enc.layers[1].ffn.__class__(8, 16, np.random.default_rng(1))
    after = [b.role for b in diagrams.med_parts(enc, dec)]
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    # layer 1's FFN box in both encoder columns and in the decoder: its LayerNorm is still shared
    assert changed == [("shared", "partly")] * 3
    dec.bert.layers[1].ffn_ln = enc.layers[1].ffn_ln.__class__(8)
    after = [b.role for b in diagrams.med_parts(enc, dec)]
    assert sorted(b for a, b in zip(before, after) if a != b) == ["decoder", "encoder", "encoder"]


def test_the_traced_step_has_four_text_calls_in_blips_order():
    tok = build_tokenizer()
    cfg = TrainConfig(width=8, depth=1, heads=2, image_size=16, patch_size=8, steps=2,
                      warmup_steps=0)
    model = BLIP(cfg.model_config(tok.vocab_size), np.random.default_rng(0))
    ids, mask = tok.encode(["a red circle", "a blue square on the left", "a big green cross"],
                           max_length=10)
    images = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    calls = diagrams.trace_pretraining_step(model, tok, images, ids, mask,
                                            np.random.default_rng(2))
    text = [c for c in calls if c.module != "visual_encoder"]
    assert [(c.module, c.rows, c.first_token, c.with_image, c.objective) for c in text] == [
        ("text_encoder", 3, "[CLS]", False, "ITC"), ("text_encoder", 3, "[ENC]", True, "ITM"),
        ("text_encoder", 6, "[ENC]", True, "ITM"), ("text_decoder", 3, "[DEC]", True, "LM")]
    assert [c.backward_order for c in text] == [3, 2, 1, 0]  # consumers first, in reverse
    [vit] = [c for c in calls if c.module == "visual_encoder"]
    assert vit.backward_order == 4
    assert "forward" not in vars(model.text_encoder)  # the recorders are gone again
    assert gids(diagrams.draw_pretraining_step(calls, 3)).count("step:text_encoder") == 3


def test_the_trace_does_not_count_the_decoder_body_twice_when_it_is_the_encoder():
    tok = build_tokenizer()
    cfg = TrainConfig(width=8, depth=1, heads=2, image_size=16, patch_size=8, steps=2,
                      warmup_steps=0, sharing="all")
    model = BLIP(cfg.model_config(tok.vocab_size), np.random.default_rng(0))
    ids, mask = tok.encode(["a red circle", "a blue square"], max_length=8)
    images = np.zeros((2, 3, 16, 16), np.float32)
    calls = diagrams.trace_pretraining_step(model, tok, images, ids, mask,
                                            np.random.default_rng(2))
    assert [c.module for c in calls].count("text_encoder") == 3


def _qformer(**kw):
    cfg = dict(vocab_size=30, width=8, depth=4, heads=2, mlp_dim=16, num_queries=3,
               encoder_width=8)
    return QFormer(QFormerConfig(**{**cfg, **kw}), np.random.default_rng(0))


def test_qformer_picture_follows_cross_attention_frequency_and_stripped_text():
    every_other = gids(diagrams.draw_qformer(_qformer()))
    every = gids(diagrams.draw_qformer(_qformer(cross_attention_freq=1)))
    assert every_other.count("qformer:cross_attn") == 2 and every.count("qformer:cross_attn") == 4
    assert every_other.count("qformer:self_attn") == 4
    assert every_other.count("qformer:ffn_query") == every_other.count("qformer:ffn_text") == 4
    q = _qformer()
    q.layers[0].ffn = q.layers[0].ffn_query  # one object for both: drawn once, across both
    found = gids(diagrams.draw_qformer(q))
    assert found.count("qformer:ffn_shared") == 1 and found.count("qformer:ffn_text") == 3
    parts = diagrams.qformer_parts(_qformer(num_queries=5))
    assert parts["num_queries"] == 5 and parts["text"]


def _stages():
    q = QFormerConfig(vocab_size=30, width=8, depth=2, heads=2, mlp_dim=16, num_queries=3,
                      encoder_width=8)
    vit = ViTConfig(image_size=16, patch_size=8, width=8, depth=1, heads=2, mlp_dim=16)
    stage1 = Blip2Stage1(Blip2Config(qformer=q, vision=vit), np.random.default_rng(0))
    lm = LanguageModel(LMConfig(vocab_size=20, width=8, depth=1, heads=2, mlp_dim=16),
                       np.random.default_rng(1))
    return stage1, Blip2Stage2.from_stage1(stage1, lm, np.random.default_rng(2))


def test_blip2_stages_show_what_is_frozen():
    stage1, stage2 = _stages()
    parts1, parts2 = diagrams.blip2_stage_parts(stage1, stage2)
    assert [p.status for p in parts1] == ["frozen"] + ["trainable"] * 5
    assert [p.status for p in parts2] == ["frozen", "trainable", "trainable", "trainable",
                                          "frozen"]
    assert [p.same_as_stage1 for p in parts2] == [True, False, False, False, False]
    assert parts2[4].total == stage2.language_model.param_count(include_frozen=True)
    assert parts1[2].trainable == stage1.qformer.param_count()
    assert gids(diagrams.draw_blip2_stages(stage1, stage2)).count("blip2:frozen") == 3
    stage1.visual_encoder.unfreeze()  # the same object in both stages
    stage2.language_model.layers[0].unfreeze()
    parts1, parts2 = diagrams.blip2_stage_parts(stage1, stage2)
    assert parts1[0].status == parts2[0].status == "trainable" and parts2[4].status == "partly"
    assert gids(diagrams.draw_blip2_stages(stage1, stage2)).count("blip2:frozen") == 0


def test_capfilt_picture_reads_the_config_and_the_weights():
    cfg = CapFiltConfig(threshold=0.7, n_clean=40, n_web=100, batch_size=8)
    parts = dict(diagrams.capfilt_parts(cfg))
    assert "p(match) > 0.7" in parts["judge"] and "200 human captions" in parts["pretrain"]
    assert parts["captioner"].endswith("LM") and parts["filter"].endswith("ITC + ITM")
    swapped = dict(diagrams.capfilt_parts(cfg, captioner_weights=(1, 1, 0)))
    assert swapped["captioner"].endswith("ITC + ITM")
    assert len([g for g in gids(diagrams.draw_capfilt(cfg)) if g.startswith("capfilt:")]) == 6


def test_bad_objects_are_refused_by_name():
    with pytest.raises(TypeError, match="TextTransformer and a TextDecoder"):
        diagrams.med_parts(object(), object())
    with pytest.raises(TypeError, match="expected a QFormer"):
        diagrams.qformer_parts(object())
