"""The small trained BLIP that notebook 00 ("the whole picture") loads.

Notebook 00 shows one trained model captioning and retrieving, and must run in
seconds inside the test command, so it loads a checkpoint instead of training.
The checkpoint is committed in ``data_samples/tour_blip/`` and made by this
file, from the repository root:

    python -m minblip.tour

which pretrains :func:`tour_config` (``TrainConfig``'s defaults at width 48) on the
built-in world and writes the model's Params, its configuration and the
training time (no optimiser state: nothing resumes from it). The test
``tests/test_tour.py`` checks that the committed file loads into the model the
config describes; rerun the command after a change to the model's Params.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .checkpoint import save_checkpoint
from .train import TrainConfig, blip_trainer, load_model

TOUR_CHECKPOINT = Path(__file__).resolve().parents[1] / "data_samples" / "tour_blip" / \
    "checkpoint.npz"


def tour_config(**overrides) -> TrainConfig:
    """``TrainConfig``'s defaults (3000 steps of batch 32 on 5000 images of 32x32;
    the demo's recipe came later and changes the image geometry) with a narrower
    model, width 48, so the committed file stays small.
    ``overrides`` replace fields (the tests train a few steps)."""
    return dataclasses.replace(TrainConfig(width=48), **overrides)


def write_tour_checkpoint(path=TOUR_CHECKPOINT, cfg: TrainConfig | None = None,
                          progress: bool = True) -> dict:
    """Pretrain ``cfg`` (default :func:`tour_config`) and write the model to
    ``path``. Returns {"steps", "train_seconds", "parameters"}."""
    cfg = cfg or tour_config()
    trainer = blip_trainer(cfg)
    trainer.run(progress=progress)
    info = {"steps": trainer.step, "train_seconds": trainer.train_seconds,
            "parameters": trainer.model.param_count()}
    save_checkpoint(path, trainer.model, cfg.to_dict(), trainer.step,
                    extra={**trainer.task.checkpoint_extra(),
                           "train_seconds": trainer.train_seconds})
    return info


def load_tour_model(path=TOUR_CHECKPOINT):
    """(model, tokenizer, TrainConfig) of the committed tour checkpoint."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no tour checkpoint; write it with "
                                f"'python -m minblip.tour --out {path}'")
    return load_model(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minblip.tour",
                                     description="Write the trained checkpoint notebook 00 loads.")
    parser.add_argument("--out", type=Path, default=TOUR_CHECKPOINT,
                        help=f"the .npz file to write (default: {TOUR_CHECKPOINT})")
    args = parser.parse_args(argv)
    info = write_tour_checkpoint(args.out)
    print(f"wrote {args.out}: {info['parameters']:,} parameters, {info['steps']} steps in "
          f"{info['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
