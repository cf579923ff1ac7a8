"""The trained checkpoint that notebook 00 loads is the one minblip.tour describes."""
import numpy as np

from minblip.checkpoint import read_config, read_header
from minblip.tour import TOUR_CHECKPOINT, load_tour_model, tour_config, write_tour_checkpoint
from minblip.train import config_as_saved


def test_the_committed_checkpoint_is_the_tour_config_and_loads():
    # config_as_saved: a field added to TrainConfig since the file was written counts
    # as its default, which is what the tour run used
    expected = config_as_saved(tour_config(), read_header(TOUR_CHECKPOINT))
    assert read_config(TOUR_CHECKPOINT) == expected, (
        "the committed tour checkpoint was made with another config: rerun "
        "'python -m minblip.tour'")
    model, tok, cfg = load_tour_model()
    assert cfg == tour_config()
    assert all(np.isfinite(p.data).all() for p in model.params())


def test_write_tour_checkpoint_writes_what_load_reads(tmp_path):
    cfg = tour_config(steps=2, warmup_steps=0, n_train=8, n_val=0, n_test=2, batch_size=4,
                      width=8, heads=2)
    info = write_tour_checkpoint(tmp_path / "tour.npz", cfg, progress=False)
    assert info["steps"] == 2
    model, _, loaded = load_tour_model(tmp_path / "tour.npz")
    assert loaded == cfg and model.param_count() == info["parameters"]


def test_a_missing_checkpoint_says_how_to_make_it(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError, match="python -m minblip.tour"):
        load_tour_model(tmp_path / "none.npz")
