"""Training, resumption, evaluation and the command line, on tiny settings."""
import json

import numpy as np
import pytest

from minblip import world
from minblip.__main__ import main
from minblip.evaluate import caption_metrics, recall_at_k
from minblip.train import TrainConfig, Trainer, load_model, peek_config

TINY = dict(n_train=64, n_val=8, n_test=12, width=16, depth=1, heads=2, embed_dim=8,
            batch_size=8, steps=40, warmup_steps=4, lr=3e-3, checkpoint_every=10)


def test_a_short_run_reduces_each_loss():
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 150, "n_train": 32}))
    trainer.run(progress=False)
    h = trainer.history
    for name in ("itc", "itm", "lm"):
        curve = np.array(getattr(h, name))
        assert curve[-20:].mean() < curve[:20].mean(), name


def test_resuming_equals_not_stopping(tmp_path):
    cfg = TrainConfig(**TINY)
    straight = Trainer(cfg)
    straight.run(progress=False)
    first = Trainer(cfg)
    first.run(until=17, progress=False, checkpoint_path=tmp_path / "ckpt.npz")
    resumed = Trainer.resume(tmp_path / "ckpt.npz")
    assert resumed.step == 17
    resumed.run(progress=False)
    for (name, a), (_, b) in zip(straight.model.named_params(), resumed.model.named_params()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    assert straight.history.itc == resumed.history.itc


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 2, "warmup_steps": 0}))
    trainer.run(progress=False, checkpoint_path=tmp_path / "a.npz")
    other = TrainConfig(**{**TINY, "steps": 2, "warmup_steps": 0, "width": 24})
    with pytest.raises(ValueError, match="width"):
        Trainer.resume(tmp_path / "a.npz", other)
    assert peek_config(tmp_path / "a.npz")["width"] == 16
    model, tok, cfg = load_model(tmp_path / "a.npz")
    assert cfg.width == 16 and model.param_count() == trainer.model.param_count()
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        load_model(tmp_path / "junk.npz")


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
    trainer = Trainer(cfg, dataset=data, train_images=data.train.images,
                      train_captions=captions)
    for _ in range(5):
        pixels, ids, mask = trainer.sample_batch()
        got = set(trainer.tokenizer.batch_decode(ids))
        assert got <= {c[0] for c in captions if c}
    trainer.run(progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Trainer(cfg, dataset=data, train_images=data.train.images,
                train_captions=[[] for _ in captions])
    with pytest.raises(ValueError, match="one list per image"):
        Trainer(cfg, dataset=data, train_images=data.train.images, train_captions=captions[:3])
