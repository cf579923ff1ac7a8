"""Training, resumption, evaluation and the command line, on tiny settings."""
import json

import numpy as np
import pytest

from minblip import world
from minblip.__main__ import main
from minblip.evaluate import caption_metrics, recall_at_k
from minblip.checkpoint import read_config
from minblip.train import BlipPretraining, TrainConfig, blip_trainer, load_model, resume_blip

TINY = dict(n_train=64, n_val=8, n_test=12, width=16, depth=1, heads=2, embed_dim=8,
            batch_size=8, steps=40, warmup_steps=4, lr=3e-3, checkpoint_every=10)


def test_a_short_run_reduces_each_loss():
    trainer = blip_trainer(TrainConfig(**{**TINY, "steps": 150, "n_train": 32}))
    trainer.run(progress=False)
    h = trainer.history
    assert h.names() == ["step", "itc", "itm", "lm", "lr", "grad_norm"] and len(h) == 150
    for name in ("itc", "itm", "lm"):
        curve = np.array(h[name])
        assert curve[-20:].mean() < curve[:20].mean(), name


def test_resuming_equals_not_stopping(tmp_path):
    cfg = TrainConfig(**TINY)
    straight = blip_trainer(cfg)
    straight.run(progress=False)
    first = blip_trainer(cfg)
    first.run(until=17, progress=False, checkpoint_path=tmp_path / "ckpt.npz")
    resumed = resume_blip(tmp_path / "ckpt.npz")
    assert resumed.step == 17
    resumed.run(progress=False)
    for (name, a), (_, b) in zip(straight.model.named_params(), resumed.model.named_params()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    assert straight.history.to_dict() == resumed.history.to_dict()


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    trainer = blip_trainer(TrainConfig(**{**TINY, "steps": 2, "warmup_steps": 0}))
    trainer.run(progress=False, checkpoint_path=tmp_path / "a.npz")
    other = TrainConfig(**{**TINY, "steps": 2, "warmup_steps": 0, "width": 24})
    with pytest.raises(ValueError, match="width"):
        resume_blip(tmp_path / "a.npz", other)
    assert read_config(tmp_path / "a.npz")["width"] == 16
    model, tok, cfg = load_model(tmp_path / "a.npz")
    assert cfg.width == 16 and model.param_count() == trainer.model.param_count()
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        load_model(tmp_path / "junk.npz")


def test_a_checkpoint_older_than_a_config_field_still_loads(tmp_path, monkeypatch):
    """A field added to TrainConfig after a run was saved (pos_embed_std) takes its
    default, which is what that run did; a value the run cannot have had is refused."""
    cfg = TrainConfig(**{**TINY, "steps": 2, "warmup_steps": 0})
    trainer = blip_trainer(cfg)
    to_dict = TrainConfig.to_dict
    monkeypatch.setattr(TrainConfig, "to_dict", lambda self: {
        k: v for k, v in to_dict(self).items() if k != "pos_embed_std"})
    trainer.run(progress=False, checkpoint_path=tmp_path / "old.npz")
    monkeypatch.undo()
    assert "pos_embed_std" not in read_config(tmp_path / "old.npz")
    model, _, loaded = load_model(tmp_path / "old.npz")
    assert loaded.pos_embed_std == TrainConfig().pos_embed_std
    np.testing.assert_array_equal(model.visual_encoder.pos_embed.data,
                                  trainer.model.visual_encoder.pos_embed.data)
    assert resume_blip(tmp_path / "old.npz").step == 2
    with pytest.raises(ValueError, match="pos_embed_std"):
        blip_trainer(TrainConfig(**{**TINY, "steps": 2, "warmup_steps": 0,
                                    "pos_embed_std": 1.0})).restore(tmp_path / "old.npz")


def test_the_position_table_follows_init_std_unless_set():
    assert TrainConfig(init_std=0.02).model_config(10).vision.pos_embed_std is None
    assert TrainConfig(pos_embed_std=1.0).model_config(10).vision.pos_embed_std == 1.0
    for bad in (-0.5, float("nan"), "big"):
        with pytest.raises(ValueError, match="TrainConfig.pos_embed_std"):
            TrainConfig(pos_embed_std=bad)


def test_position_at_output_reaches_the_vit():
    assert TrainConfig().model_config(10).vision.pos_embed_at_output is False
    assert TrainConfig(pos_embed_at_output=True).model_config(10).vision.pos_embed_at_output
    with pytest.raises(ValueError, match="TrainConfig.pos_embed_at_output"):
        TrainConfig(pos_embed_at_output=1)


def test_recall_at_k():
    scores = np.array([[0.9, 0.1, 0.0],
                       [0.8, 0.5, 0.1],
                       [0.1, 0.2, 0.3]])
    r = recall_at_k(scores, (1, 2))
    assert r == {1: pytest.approx(2 / 3), 2: 1.0}


def test_caption_metrics_per_attribute():
    scene = world.Scene((world.Object("red", "circle", "large", 1, 0),))
    right = world.canonical_caption(scene)
    wrong_colour = right.replace("red", "blue")
    m = caption_metrics([scene, scene], [right, wrong_colour])
    assert m["caption_colour_accuracy"] == 0.5
    assert m["caption_shape_accuracy"] == 1.0
    assert m["caption_exact_match"] == 0.5


def test_bad_training_options():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(n_train=4, batch_size=8)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"stepz": 3})


def test_demo_command_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--steps", "12", "--n-train", "40", "--n-test", "10",
                 "--width", "16", "--depth", "1", "--batch-size", "8", "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("i2t_recall@1", "t2i_recall@1", "itm_accuracy", "caption_attribute_accuracy",
                "train_seconds"):
        assert 0.0 <= metrics[key] <= max(1.0, metrics["train_seconds"])
        assert key in metrics["compositional"] or key == "train_seconds"
    for name in ("loss_curves.png", "similarity_matrix.png", "retrieval_examples.png",
                 "captions.png", "itm_heatmap.png", "checkpoint.npz", "captions.jsonl"):
        assert (out / name).exists(), name
    assert "recall@1" in capsys.readouterr().out
    assert main(["caption", str(out / "captions.png"), "--checkpoint",
                 str(out / "checkpoint.npz")]) == 0
    assert main(["eval", "--checkpoint", str(out / "missing.npz")]) == 2


def test_training_on_given_captions_draws_only_captioned_images():
    cfg = TrainConfig(**{**TINY, "steps": 3, "warmup_steps": 0})
    data = world.make_dataset(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed,
                              image_size=cfg.image_size, max_objects=cfg.max_objects)
    captions = [[c] if i % 2 == 0 else [] for i, c in enumerate(data.train.captions)]
    trainer = blip_trainer(cfg, dataset=data, train_images=data.train.images,
                           train_captions=captions)
    for _ in range(5):
        pixels, ids, mask = trainer.task.sample_batch(trainer.data_rng)
        got = set(trainer.task.tokenizer.batch_decode(ids))
        assert got <= {c[0] for c in captions if c}
    trainer.run(progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BlipPretraining(cfg, dataset=data, train_images=data.train.images,
                        train_captions=[[] for _ in captions])
    with pytest.raises(ValueError, match="one list per image"):
        BlipPretraining(cfg, dataset=data, train_images=data.train.images,
                        train_captions=captions[:3])


# ---------------------------------------------------------------------------------------
# One loop for every task: exact resumption of BLIP-2's stages and the LM
# ---------------------------------------------------------------------------------------

def _blip2_tasks():
    """Factories of tiny BLIP-2 tasks, each building a fresh task the same way."""
    from minblip.blip2_stage2 import build_stage2
    from minblip.lm import LanguageModel, LMConfig
    from minblip.qformer import QFormerConfig
    from minblip.questions import build_lm_tokenizer
    from minblip.train_blip2 import (LMPretrainConfig, LMPretraining, Stage1Config,
                                     Stage1Training, Stage2Config, Stage2Training)
    from minblip.vit import ViTConfig, VisionTransformer

    data = world.make_dataset(12, 0, 4, seed=1)
    lm_tok = build_lm_tokenizer()

    def vit():
        return VisionTransformer(ViTConfig(width=8, depth=1, heads=2, mlp_dim=16),
                                 np.random.default_rng(0))

    def lm():
        return LanguageModel(LMConfig(vocab_size=lm_tok.vocab_size, width=8, depth=1, heads=2,
                                      mlp_dim=16, max_positions=48), np.random.default_rng(1))

    def stage1():
        return Stage1Training(Stage1Config(width=8, depth=1, heads=2, mlp_dim=16, num_queries=2,
                                           embed_dim=4, steps=6, warmup_steps=1, batch_size=4,
                                           dropout=0.1), vit(), data)

    def stage2():
        q = QFormerConfig(vocab_size=10, width=8, depth=1, heads=2, mlp_dim=16, num_queries=2,
                          encoder_width=8)
        model = build_stage2(lm(), np.random.default_rng(2), visual_encoder=vit(), qformer_cfg=q)
        return Stage2Training(model, lm_tok, data.train,
                              Stage2Config(steps=6, warmup_steps=1, batch_size=4))

    def lm_pretraining():
        return LMPretraining(lm(), lm_tok, LMPretrainConfig(steps=6, warmup_steps=1,
                                                            batch_size=4, corpus_size=16))

    return {"stage 1": stage1, "stage 2": stage2, "LM pretraining": lm_pretraining}


@pytest.mark.parametrize("name", ["stage 1", "stage 2", "LM pretraining"])
def test_every_task_resumes_exactly_in_the_one_loop(tmp_path, name):
    from minblip.train import Trainer
    make = _blip2_tasks()[name]
    straight = Trainer(make())
    assert straight.task.name == name
    straight.run(progress=False)
    first = Trainer(make())
    first.run(until=3, progress=False, checkpoint_path=tmp_path / "ckpt.npz")
    resumed = Trainer(make()).restore(tmp_path / "ckpt.npz")
    assert resumed.step == 3
    resumed.run(progress=False)
    for (n, a), (_, b) in zip(straight.model.named_params(include_frozen=True),
                              resumed.model.named_params(include_frozen=True)):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
    assert straight.history.to_dict() == resumed.history.to_dict()
    assert {"step", "lr", "grad_norm"} < set(straight.history.names())
