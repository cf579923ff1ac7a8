"""The BLIP-2 pipeline (``python -m minblip blip2``) on tiny settings."""
import json

import pytest

from minblip.__main__ import main
from minblip.blip2_pipeline import Blip2RunConfig, checkpoint_world, run_blip2
from minblip.questions import QUESTION_KINDS
from minblip.train import TrainConfig, blip_trainer

TINY = dict(n_train=24, n_test=8, batch_size=8, vision_steps=3, vision_width=16,
            qformer_width=16, qformer_heads=2, num_queries=2, stage1_steps=3, lm_width=16,
            lm_depth=1, lm_heads=2, lm_steps=3, lm_corpus_size=64, stage2_steps=3,
            num_beams=2)

RATES = ["stage1_i2t_recall@1", "stage1_t2i_recall@1", "stage1_i2t_recall@5",
         "stage1_reranked_i2t_recall@1", "stage1_reranked_t2i_recall@1",
         "stage2_caption_attribute_accuracy", "stage2_caption_exact_match",
         "zero_shot_answer_accuracy", "zero_shot_blind_accuracy", "zero_shot_chance_accuracy"]
RATES += [f"stage2_caption_{a}_accuracy"
          for a in ("colour", "shape", "size", "position", "object_count")]
RATES += [f"zero_shot_{kind}_{which}_accuracy"
          for kind in QUESTION_KINDS for which in ("answer", "blind", "chance")]
TIMES = ["vision_seconds", "stage1_seconds", "lm_seconds", "stage2_seconds", "eval_seconds",
         "total_seconds", "cpu_seconds"]
FILES = ["metrics.json", "captions.jsonl", "answers.jsonl", "loss_curves.png", "captions.png"]


def test_tiny_run_writes_every_metric_and_file(tmp_path, capsys):
    out = tmp_path / "blip2"
    metrics = run_blip2(out, Blip2RunConfig(**TINY), progress=True, log=print)
    for key in RATES:
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in TIMES:
        assert metrics[key] >= 0.0, key
    assert metrics["total_seconds"] >= metrics["stage1_seconds"] + metrics["stage2_seconds"]
    # the whole model counts the frozen ViT and the frozen LM; only the middle trains
    parts = metrics["parameters_by_part"]
    assert parts["visual_encoder"]["trainable"] == parts["language_model"]["trainable"] == 0
    assert parts["visual_encoder"]["total"] > 0 and parts["language_model"]["total"] > 0
    assert metrics["total_parameters"] == metrics["trainable_parameters"] + \
        metrics["frozen_parameters"]
    assert metrics["frozen_parameters"] == parts["visual_encoder"]["total"] + \
        parts["language_model"]["total"]
    assert metrics["stage1_trainable_parameters"] > 0
    assert metrics["stage2_init"] == "stage1" and metrics["vision_encoder"] == "BLIP run of 3 steps"
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == TINY["n_test"] and {"generated", "truth", "scene"} <= set(captions[0])
    answers = (out / "answers.jsonl").read_text().splitlines()
    assert len(answers) == metrics["zero_shot_questions"]
    printed = capsys.readouterr()
    assert "3 steps of ITC alone" in printed.out  # says the ViT was trained here
    assert "LM step" not in printed.out  # the loops' step lines went into the bars
    assert "LM pretraining" in printed.err and "stage 2" in printed.err


def test_vision_checkpoint_and_fresh_stage2(tmp_path):
    small = dict(n_train=30, n_val=0, n_test=10, width=16, depth=1, heads=2, embed_dim=8,
                 batch_size=8, steps=2, warmup_steps=0)
    trainer = blip_trainer(TrainConfig(**small))
    trainer.run(progress=False, checkpoint_path=tmp_path / "ckpt.npz")
    cfg = Blip2RunConfig(**{**TINY, "stage2_init": "fresh", "n_test": 10})
    metrics = run_blip2(tmp_path / "out", cfg, vision_checkpoint=tmp_path / "ckpt.npz")
    assert str(tmp_path / "ckpt.npz") in metrics["vision_encoder"]
    assert metrics["stage2_init"] == "fresh" and metrics["n_test"] == 10
    vit = trainer.model.visual_encoder.param_count()
    assert metrics["parameters_by_part"]["visual_encoder"]["total"] == vit
    # the checkpoint's world: its test split, which its ViT never trained on
    data = checkpoint_world(trainer.cfg, 24, 10)
    assert {s.key() for s in data.test.scenes} == {s.key() for s in trainer.task.dataset.test.scenes}
    with pytest.raises(ValueError, match="only 10 test images"):
        checkpoint_world(trainer.cfg, 24, 11)


def test_missing_or_broken_vision_checkpoint_exits_with_2(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    assert main(["blip2", "--out", str(tmp_path / "out"), "--vision-checkpoint", str(missing),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no file at" in err and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    assert main(["blip2", "--out", str(tmp_path / "out"), "--vision-checkpoint", str(junk),
                 "--quiet"]) == 2
    assert "junk.npz" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--stage1-steps", "0"], "stage1_steps"),
    (["--n-test", "-1"], "n_test"),
    (["--batch-size", "64", "--n-train", "10"], "batch_size 64 exceeds n_train 10"),
])
def test_bad_options_give_clear_errors(tmp_path, capsys, argv, message):
    assert main(["blip2", "--out", str(tmp_path), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_options_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["blip2", "--stage2-init", "both"])
    assert exit_info.value.code == 2
    assert "--stage2-init" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["blip2", "--lm-steps", "many"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["blip2", "--help"])
    assert exit_info.value.code == 0
    assert "--vision-checkpoint" in capsys.readouterr().out


def test_config_checks():
    with pytest.raises(ValueError, match="qformer_heads"):
        Blip2RunConfig(qformer_width=16, qformer_heads=3)
    with pytest.raises(ValueError, match="stage2_init"):
        Blip2RunConfig(stage2_init="stage0")
    with pytest.raises(ValueError, match="stage2_lr"):
        Blip2RunConfig(stage2_lr=0.0)
    with pytest.raises(ValueError, match="k_test"):
        Blip2RunConfig(k_test=5)
    with pytest.raises(ValueError, match="unknown"):
        Blip2RunConfig.from_dict({"stage3_steps": 1})
    assert Blip2RunConfig.from_dict(Blip2RunConfig().to_dict()) == Blip2RunConfig()
    with pytest.raises(TypeError, match="Blip2RunConfig"):
        run_blip2("unused", {"n_train": 10})
