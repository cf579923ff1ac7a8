"""CapFilt (minblip.capfilt and minblip.capfilt_experiment): the filter's bookkeeping on
hand-made numbers, and the whole pipeline end to end on a tiny setting."""
import json

import numpy as np
import pytest

from minblip import capfilt, capfilt_experiment
from minblip.__main__ import main
from minblip.capfilt import (CapFiltConfig, bootstrap_captions, filter_quality, keep_mask,
                             threshold_curve)

TINY = dict(n_clean=16, clean_captions_per_image=2, n_web=24, n_test=8, width=16, depth=1,
            heads=2, embed_dim=8, batch_size=8, pretrain_steps=6, finetune_steps=4)


@pytest.fixture(scope="module")
def tiny_runs():
    return capfilt_experiment.run_seeds(CapFiltConfig(**TINY), [0, 1], progress=False)


# ---------------------------------------------------------------------------------------
# The filter on hand-made numbers
# ---------------------------------------------------------------------------------------

def test_filter_quality_on_a_hand_made_example():
    #            clean  clean  swap  swap   attr   filler clean  attr
    is_noisy = np.array([0, 0, 1, 1, 1, 1, 0, 1], bool)
    kinds = [None, None, "swap", "swap", "attribute", "filler", None, "attribute"]
    removed = np.array([0, 1, 1, 1, 0, 1, 0, 1], bool)
    q = filter_quality(removed, is_noisy, kinds)
    # removed: 5 texts, 4 corrupted (swap, swap, filler, attribute) and 1 clean
    assert q["precision"] == pytest.approx(4 / 5)
    assert q["recall"] == pytest.approx(4 / 5)      # one attribute text slipped through
    assert q["clean_removed"] == pytest.approx(1 / 3)
    assert (q["removed"], q["n"], q["n_noisy"]) == (5, 8, 5)
    swap, attr, filler = (q["by_kind"][k] for k in ("swap", "attribute", "filler"))
    assert (swap["recall"], attr["recall"], filler["recall"]) == (1.0, 0.5, 1.0)
    # a kind's precision: its removed texts against the one clean text removed
    assert swap["precision"] == pytest.approx(2 / 3)
    assert attr["precision"] == pytest.approx(1 / 2)
    assert filler["precision"] == pytest.approx(1 / 2)
    assert (swap["n"], attr["n"], filler["n"]) == (2, 2, 1)


def test_filter_quality_undefined_ratios_are_nan():
    q = filter_quality(np.zeros(3, bool), np.zeros(3, bool))
    assert np.isnan(q["precision"]) and np.isnan(q["recall"]) and q["clean_removed"] == 0.0


def test_filter_quality_rejects_mismatched_input():
    with pytest.raises(ValueError, match="bool arrays of the same shape"):
        filter_quality(np.zeros(3, bool), np.zeros(4, bool))
    with pytest.raises(ValueError, match="bool"):
        filter_quality(np.zeros(3), np.zeros(3, bool))
    with pytest.raises(ValueError, match="exactly where is_noisy"):
        filter_quality(np.zeros(2, bool), np.array([True, False]), [None, "swap"])


def test_keep_mask_is_strictly_above_the_threshold():
    p = np.array([0.2, 0.5, 0.50001, 0.9])
    np.testing.assert_array_equal(keep_mask(p, 0.5), [False, False, True, True])
    np.testing.assert_array_equal(keep_mask(p, 0.1), [True, True, True, True])


def test_the_filter_applies_to_web_and_synthetic_texts_alike():
    web = ["w0", "w1", "w2", "w3"]
    syn = ["s0", "s1", "s2", "s3"]
    p_web = np.array([0.9, 0.1, 0.9, 0.3])
    p_syn = np.array([0.8, 0.7, 0.2, 0.4])
    both = bootstrap_captions(web, syn, p_web, p_syn, 0.5)
    assert both == [["w0", "s0"], ["s1"], ["w2"], []]  # an image may keep 0, 1 or 2 texts
    filter_only = bootstrap_captions(web, syn, p_web, p_syn, 0.5, use_captioner=False)
    assert filter_only == [["w0"], [], ["w2"], []]
    captioner_only = bootstrap_captions(web, syn, p_web, p_syn, 0.5, use_filter=False)
    assert captioner_only == [[w, s] for w, s in zip(web, syn)]
    raw = bootstrap_captions(web, syn, p_web, p_syn, 0.5, use_captioner=False, use_filter=False)
    assert raw == [[w] for w in web]
    # a stricter threshold removes more of both kinds of text
    assert bootstrap_captions(web, syn, p_web, p_syn, 0.75) == [["w0", "s0"], [], ["w2"], []]


def test_threshold_curve_on_a_hand_made_example():
    p = np.array([0.1, 0.4, 0.6, 0.3, 0.8, 0.9])
    noisy = np.array([1, 1, 1, 0, 0, 0], bool)
    c = threshold_curve(p, noisy, thresholds=[0.0, 0.35, 0.5, 1.0])
    np.testing.assert_allclose(c["recall"], [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(c["false_positive_rate"], [0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(c["precision"][1:], [1 / 2, 2 / 3, 1 / 2])
    assert np.isnan(c["precision"][0])  # nothing removed: precision undefined
    # (corrupted, clean) pairs with the corrupted text lower: all but (0.4, 0.3), (0.6, 0.3)
    assert c["roc_auc"] == pytest.approx(7 / 9)
    assert threshold_curve(np.array([0.5, 0.5]), np.array([True, False]))["roc_auc"] == 0.5


# ---------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [-0.1, 1.5])
def test_noise_outside_the_unit_interval_is_refused(noise):
    with pytest.raises(ValueError, match=r"noise must be a fraction in \[0, 1\]"):
        CapFiltConfig(noise=noise)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2, 1.3])
def test_threshold_outside_the_open_unit_interval_is_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be a probability strictly between"):
        CapFiltConfig(threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        keep_mask(np.array([0.5]), threshold)


def test_other_bad_arguments_are_named():
    with pytest.raises(TypeError, match="noise must be a number"):
        CapFiltConfig(noise="half")
    with pytest.raises(ValueError, match="noise_kinds"):
        CapFiltConfig(noise_kinds=("typo",))
    with pytest.raises(ValueError, match="batch_size 64 exceeds n_clean 16"):
        CapFiltConfig(**{**TINY, "batch_size": 64})
    with pytest.raises(ValueError, match="p_match must be probabilities"):
        keep_mask(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="one entry per web image"):
        bootstrap_captions(["a", "b"], ["c"], [0.9, 0.9], [0.9])
    with pytest.raises(ValueError, match="unknown setting 'both'"):
        capfilt.total_steps(CapFiltConfig(), ["both"])
    with pytest.raises(ValueError, match="unknown CapFilt options"):
        CapFiltConfig.from_dict({"noise": 0.5, "nosie": 0.4})


def test_the_command_line_reports_bad_arguments(capsys, tmp_path):
    assert main(["capfilt", "--out", str(tmp_path), "--noise", "1.2"]) == 2
    assert "noise must be a fraction in [0, 1], got 1.2" in capsys.readouterr().err
    assert main(["capfilt", "--out", str(tmp_path), "--threshold", "1"]) == 2
    assert "threshold must be a probability strictly between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------------------------------
# The pipeline end to end
# ---------------------------------------------------------------------------------------

def test_the_data_sets_are_disjoint_and_the_web_set_is_noisy():
    data = capfilt.make_data(CapFiltConfig(**TINY))
    ids = [set(s.image_ids.tolist()) for s in (data.clean, data.web, data.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(data.clean) == 16 and len(data.web) == 24 and len(data.test) == 8
    assert all(len(c) == 2 for c in data.clean.all_captions)
    assert data.web.is_noisy.sum() == 12  # noise 0.5 of 24, exactly


def test_the_pipeline_runs_end_to_end(tiny_runs):
    for run in tiny_runs:
        assert list(run.settings) == list(capfilt.SETTINGS)
        n = len(run.data.web)
        assert len(run.synthetic) == n and all(isinstance(t, str) and t for t in run.synthetic)
        assert run.p_web.shape == run.p_synthetic.shape == (n,)
        np.testing.assert_array_equal(run.keep_web, run.p_web > run.cfg.threshold)
        np.testing.assert_array_equal(run.keep_synthetic, run.p_synthetic > run.cfg.threshold)
        # each setting trained on what its captions say: 2 clean captions per clean image
        expect = {name: 32 + sum(len(c) for c in run.setting_captions(name))
                  for name in capfilt.SETTINGS}
        assert run.train_pairs == expect
        assert expect["captioner_only"] == 32 + 2 * n and expect["no_capfilt"] == 32 + n
        for metrics in run.settings.values():
            for key in capfilt.TABLE_METRICS:
                assert 0.0 <= metrics[key] <= 1.0


def test_captioner_filter_and_pretrained_model_share_no_parameter(tiny_runs):
    models = tiny_runs[0].models
    ids = {name: {id(p) for p in models[name].params()}
           for name in ("pretrained", "captioner", "filter", "capfilt")}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], f"{a} and {b} share a Param"
    assert models["no_capfilt"] is models["pretrained"]


def test_the_report_holds_every_metric(tiny_runs, tmp_path):
    summary = capfilt_experiment.summarize(tiny_runs)
    capfilt_experiment.write_report(tmp_path, tiny_runs, summary)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1]
    for key in ("filter_precision", "filter_recall"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    for name in capfilt.SETTINGS:
        for key in capfilt.TABLE_METRICS:
            spread = metrics["settings"][name][key]
            assert set(spread) == {"mean", "std", "min", "max", "values"}
            assert len(spread["values"]) == 2
            assert spread["mean"] == pytest.approx(np.mean(spread["values"]))
            assert spread["std"] == pytest.approx(np.std(spread["values"], ddof=1))
    assert set(metrics["filter_web"]["by_kind"]) <= {"swap", "attribute", "filler"}
    assert len(metrics["per_seed"]) == 2
    for name in ("metrics.json", "table.md", "texts.jsonl", "threshold_curve.png",
                 "match_histograms.png", "examples.png", "table.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "no CapFilt" in (tmp_path / "table.md").read_text()


def test_a_seed_determines_the_run(tiny_runs):
    again = capfilt.run_capfilt(CapFiltConfig(**TINY, seed=0))
    first = tiny_runs[0]
    assert again.synthetic == first.synthetic
    np.testing.assert_array_equal(again.p_web, first.p_web)
    np.testing.assert_array_equal(again.p_synthetic, first.p_synthetic)
    assert again.settings == first.settings
    other = tiny_runs[1]
    assert other.data.web.captions != first.data.web.captions
    assert not np.array_equal(other.p_web, first.p_web)


def test_the_command_line_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["capfilt", "--out", str(out), "--seeds", "3", "--n-clean", "16", "--n-web",
                 "16", "--n-test", "8", "--steps", "4", "--finetune-steps", "2", "--width",
                 "16", "--depth", "1", "--batch-size", "8", "--jobs", "1", "--quiet",
                 "--noise", "0.25"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [3] and metrics["config"]["noise"] == 0.25
    assert metrics["config"]["pretrain_steps"] == 4
    assert set(metrics["settings"]) == set(capfilt.SETTINGS)
    assert "filter_precision" in metrics and "filter_recall" in metrics
    assert "captioner + filter" in capsys.readouterr().out


def test_worker_processes_give_the_same_numbers(tiny_runs):
    parallel = capfilt_experiment.run_seeds(CapFiltConfig(**TINY), [0, 1], jobs=2, progress=False)
    for a, b in zip(tiny_runs, parallel):
        assert a.synthetic == b.synthetic
        np.testing.assert_array_equal(a.p_web, b.p_web)
        assert a.settings == b.settings and a.train_pairs == b.train_pairs
        assert list(b.settings) == list(capfilt.SETTINGS) and b.models == {}


def test_text_accuracy_scores_each_group_of_texts():
    from minblip import world
    from minblip.evaluate import caption_metrics
    scenes = capfilt.make_data(CapFiltConfig(**TINY)).web.scenes[:3]
    web = [world.canonical_caption(s) for s in scenes]
    syn = ["a nice picture", web[0], web[2]]
    acc = capfilt.text_accuracy(scenes, web, syn, np.array([True, False, True]),
                                np.zeros(3, bool))
    assert acc["web"]["caption_exact_match"] == 1.0
    # filler, another scene's caption, the right caption: one of three is true
    assert acc["synthetic"]["caption_exact_match"] == pytest.approx(1 / 3)
    assert acc["kept_web"] == caption_metrics([scenes[0], scenes[2]], [web[0], web[2]])
    assert all(np.isnan(v) for v in acc["kept_synthetic"].values())
