"""The BLIP-2 pipeline (``python -m minblip blip2``) on tiny settings."""
import json

import numpy as np
import pytest

from minblip.__main__ import main
from minblip.blip2_checkpoint import load_blip2
from minblip.blip2_pipeline import (Blip2RunConfig, checkpoint_world, format_blip2_table,
                                    run_blip2)
from minblip.blip2_experiment import AblationConfig, run_ablation
from minblip.questions import QUESTION_KINDS
from minblip.train import TrainConfig, blip_trainer

TINY = dict(n_train=24, n_test=8, batch_size=8, vision_steps=3, vision_width=16,
            qformer_width=16, qformer_heads=2, num_queries=2, stage1_steps=3, lm_width=16,
            lm_depth=1, lm_heads=2, t5_mlp_dim=24, lm_steps=3, lm_corpus_size=64,
            stage2_steps=3, num_beams=2)

STAGE1_RATES = ["stage1_i2t_recall@1", "stage1_t2i_recall@1", "stage1_i2t_recall@5",
                "stage1_reranked_i2t_recall@1", "stage1_reranked_t2i_recall@1",
                "vision_blip_itc_i2t_recall@1", "vision_blip_itc_t2i_recall@1"]
RATES = ["stage2_caption_attribute_accuracy", "stage2_caption_exact_match",
         "zero_shot_answer_accuracy", "zero_shot_blind_accuracy", "zero_shot_chance_accuracy"]
RATES += [f"stage2_caption_{a}_accuracy"
          for a in ("colour", "shape", "size", "position", "object_count")]
RATES += [f"zero_shot_{kind}_{which}_accuracy"
          for kind in QUESTION_KINDS for which in ("answer", "blind", "chance")]
TIMES = ["vision_seconds", "stage1_seconds", "stage1_eval_seconds", "total_seconds",
         "cpu_seconds"]
FILES = ["metrics.json", "loss_curves.png", "captions.png"]
FILES += [f"{name}_{kind}.{ext}" for kind in ("opt", "t5")
          for name, ext in (("captions", "jsonl"), ("answers", "jsonl"), ("blip2", "npz"))]


def test_tiny_run_writes_every_metric_and_file(tmp_path, capsys):
    out = tmp_path / "blip2"
    metrics = run_blip2(out, Blip2RunConfig(**TINY), progress=True, log=print)
    for key in STAGE1_RATES:
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in TIMES:
        assert metrics[key] >= 0.0, key
    assert metrics["total_seconds"] >= metrics["stage1_seconds"] + metrics["vision_seconds"]
    assert metrics["language_models"] == ["opt", "t5"]
    for kind in ("opt", "t5"):
        m = metrics[kind]
        for key in RATES:
            assert 0.0 <= m[key] <= 1.0, (kind, key)
        # the whole model counts the frozen ViT and the frozen LM; only the middle trains
        parts = m["parameters_by_part"]
        assert parts["visual_encoder"]["trainable"] == parts["language_model"]["trainable"] == 0
        assert parts["visual_encoder"]["total"] > 0 and parts["language_model"]["total"] > 0
        assert m["total_parameters"] == m["trainable_parameters"] + m["frozen_parameters"]
        assert m["frozen_parameters"] == parts["visual_encoder"]["total"] + \
            parts["language_model"]["total"]
        assert m["stage2_init"] == "stage1"
        loaded, tok, info = load_blip2(m["checkpoint"])  # the saved model is the trained one
        assert info["config"]["language_model"]["type"] == kind
        assert info["extra"]["caption_attribute_accuracy"] == \
            m["stage2_caption_attribute_accuracy"]
        captions = [json.loads(line)
                    for line in (out / f"captions_{kind}.jsonl").read_text().splitlines()]
        assert len(captions) == TINY["n_test"]
        assert {"generated", "truth", "scene"} <= set(captions[0])
        answers = (out / f"answers_{kind}.jsonl").read_text().splitlines()
        assert len(answers) == m["zero_shot_questions"]
    assert metrics["opt"]["trainable_parameters"] == metrics["t5"]["trainable_parameters"]
    assert metrics["stage1_trainable_parameters"] > 0 and metrics["blip_parameters"] > 0
    assert metrics["vision_encoder"] == "BLIP run of 3 steps"
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    printed = capsys.readouterr()
    assert "3 steps of ITC alone" in printed.out  # says the ViT was trained here
    assert "stage 2 with the t5 LM" in printed.out
    assert "stage 1" in printed.err and "stage 2" in printed.err  # the bars of this process
    table = format_blip2_table(metrics)
    assert "stage 2, t5 LM: zero-shot answers" in table and "the ViT's BLIP" in table


def test_two_processes_give_the_same_numbers(tmp_path):
    cfg = Blip2RunConfig(**{**TINY, "language_models": ("t5", "opt")})
    one = run_blip2(tmp_path / "one", cfg, jobs=1)
    two = run_blip2(tmp_path / "two", cfg, jobs=2)
    volatile = {"total_seconds", "cpu_seconds", "jobs", "vision_seconds", "stage1_seconds",
                "stage1_eval_seconds"}
    for key in set(one) - volatile:
        if key in ("opt", "t5"):
            for k in one[key]:
                if not k.endswith("seconds") and k != "checkpoint":
                    assert one[key][k] == two[key][k], (key, k)
        else:
            assert one[key] == two[key], key
    assert two["jobs"] == 2 and two["cpu_seconds"] > 0


def test_vision_checkpoint_and_fresh_stage2(tmp_path):
    small = dict(n_train=30, n_val=0, n_test=10, width=16, depth=1, heads=2, embed_dim=8,
                 batch_size=8, steps=2, warmup_steps=0)
    trainer = blip_trainer(TrainConfig(**small))
    trainer.run(progress=False, checkpoint_path=tmp_path / "ckpt.npz")
    cfg = Blip2RunConfig(**{**TINY, "stage2_init": "fresh", "n_test": 10,
                            "language_models": ("opt",)})
    metrics = run_blip2(tmp_path / "out", cfg, vision_checkpoint=tmp_path / "ckpt.npz")
    assert str(tmp_path / "ckpt.npz") in metrics["vision_encoder"]
    assert metrics["stage2_init"] == "fresh" and metrics["n_test"] == 10
    assert metrics["language_models"] == ["opt"] and "t5" not in metrics
    vit = trainer.model.visual_encoder.param_count()
    assert metrics["opt"]["parameters_by_part"]["visual_encoder"]["total"] == vit
    unfrozen = run_blip2(tmp_path / "unfrozen", Blip2RunConfig(
        **{**TINY, "stage2_init": "unfrozen", "language_models": ("t5",)}))
    parts = unfrozen["t5"]["parameters_by_part"]
    assert parts["language_model"]["trainable"] == parts["language_model"]["total"] > 0
    assert parts["visual_encoder"]["trainable"] == 0  # its features are fixed inputs
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
    (["--num-queries", "0"], "num_queries"),
    (["--ablation", "--seeds", "1", "1"], "distinct seeds"),
    (["--jobs", "3"], "jobs must be 1 or 2"),
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
        main(["blip2", "--language-models", "gpt"])
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
    with pytest.raises(ValueError, match="language_models"):
        Blip2RunConfig(language_models=("opt", "opt"))
    with pytest.raises(ValueError, match="stage1_weights"):
        Blip2RunConfig(stage1_weights=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown"):
        Blip2RunConfig.from_dict({"stage3_steps": 1})
    assert Blip2RunConfig.from_dict(Blip2RunConfig().to_dict()) == Blip2RunConfig()
    with pytest.raises(TypeError, match="Blip2RunConfig"):
        run_blip2("unused", {"n_train": 10})


def test_tiny_ablation_over_two_seeds(tmp_path):
    """The three ablations end to end on tiny settings: every variant of every seed,
    the summary's spreads and paired differences, the tables and the plots."""
    cfg = AblationConfig(Blip2RunConfig(**{**TINY, "stage1_steps": 5, "stage2_steps": 4}),
                         seeds=(0, 1), queries=(1, 2), stage1_lrs=(1e-3,), stage2_points=2,
                         weak_vision=dict(vision_steps=2, vision_width=8, vision_heads=2))
    lines = []
    summary = run_ablation(tmp_path / "abl", cfg, log=lines.append)
    # per seed: two ViTs, 5 stage-1 runs (base, no ITG, 1 query, lr, weak ViT), the LMs, 6 stage 2
    assert len(lines) == 2 * (2 + 5 + 1 + 6)
    assert summary["seeds"] == [0, 1]
    assert set(summary["stage1_variants"]) == {"base", "no_itg", "queries_1", "lr_0.001",
                                               "weak_vision"}
    assert summary["queries"] == {"1": "queries_1", "2": "base"}
    assert summary["learning_rates"] == {"0.002": "base", "0.001": "lr_0.001"}
    assert set(summary["vision"]) == {"default", "weak"}
    base = summary["stage1_variants"]["base"]
    assert base["curve"]["step"]["mean"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    for kind in ("opt", "t5"):
        for init in ("stage1", "fresh", "unfrozen"):
            e = summary["stage2"][kind][init]
            assert e["curve"]["step"]["mean"] == [2.0, 4.0]
            assert len(e["zero_shot_answer_accuracy"]["values"]) == 2
        d = summary["stage2"][kind]["differences_vs_stage1"]["fresh"]
        fresh = summary["stage2"][kind]["fresh"]["stage2_caption_attribute_accuracy"]["values"]
        base = summary["stage2"][kind]["stage1"]["stage2_caption_attribute_accuracy"]["values"]
        np.testing.assert_allclose(d["stage2_caption_attribute_accuracy"]["values"],
                                   np.subtract(fresh, base))
    assert summary["stage1_variants"]["base"]["ms_per_step"]["mean"] > 0
    unfrozen = summary["stage2"]["opt"]["unfrozen"]["trainable_parameters"]["mean"]
    assert unfrozen > summary["stage2"]["opt"]["stage1"]["trainable_parameters"]["mean"]
    tables = (tmp_path / "abl" / "tables.md").read_text()
    assert "ITG's effect" in tables and "| 2 |" in tables and "LM unfrozen" in tables
    for name in ("metrics.json", "stage2_curves.png", "stage1_ablations.png"):
        assert (tmp_path / "abl" / name).stat().st_size > 0
    with pytest.raises(ValueError, match="stage2_points"):
        AblationConfig(Blip2RunConfig(**TINY), stage1_points=1, stage2_points=2)  # 2 into 3
