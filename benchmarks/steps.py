"""The training steps the benchmarks time: minblip's ``Trainer.train_step`` of
the demo-size BLIP on a fixed batch, and the same step in the PyTorch twin
(``reference/torch_twin.py``) with ``torch.optim.AdamW``.

Import only inside a worker (after the thread count is set).
"""
from __future__ import annotations

import numpy as np

from common import use_repo

use_repo()

from minblip import demo  # noqa: E402
from minblip.blip import pretrain_step  # noqa: E402
from minblip.train import TrainConfig, blip_trainer  # noqa: E402


def demo_config() -> TrainConfig:
    """The demo's model, batch and optimiser (``minblip.demo.demo_config()``);
    only the pool of generated images is smaller, since a step draws its batch
    from it either way and generating 5000 would only slow the set-up."""
    return demo.demo_config(n_train=256, n_val=8, n_test=8)


class MinblipStep:
    """``Trainer.train_step`` (zero_grad, temperature clamp, ITC + ITM + LM
    forward and backward, gradient clipping, AdamW) on one fixed batch: the
    BLIP pretraining task's ``sample_batch`` is replaced so no time goes to
    drawing captions."""

    def __init__(self, cfg: TrainConfig | None = None, batch=None):
        """``batch`` (images, ids, mask) replaces the task's first batch (the
        scaling benchmark gives texts of a chosen length)."""
        self.cfg = cfg or demo_config()
        self.trainer = blip_trainer(self.cfg)
        task = self.trainer.task
        self.batch = task.sample_batch(self.trainer.data_rng) if batch is None else batch
        task.sample_batch = lambda rng: self.batch
        tok = task.tokenizer
        self.ids = dict(cls_id=tok.cls_id, enc_id=tok.enc_id, dec_id=tok.dec_id)
        # one forward before any update: the loss and negatives the twin must reproduce
        self.first = pretrain_step(self.trainer.model, *self.batch, **self.ids,
                                   rng=np.random.default_rng(0), weights=self.cfg.loss_weights,
                                   backward=False)

    def __call__(self):
        return self.trainer.train_step()


class TorchStep:
    """The same step in the PyTorch twin, built with ``step.trainer.model``'s
    current weights: forward (negatives fixed to those of ``step.first``),
    backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` with minblip's decay
    rule (Linear weights decay; biases, norms, embeddings, the tied LM head do
    not) and the same learning-rate schedule. The pixels need no gradient."""

    def __init__(self, step: MinblipStep, threads: int):
        import torch
        import torch_twin
        torch.set_num_threads(threads)
        self.torch = torch
        cfg, model = step.cfg, step.trainer.model
        self.cfg, self.model_cfg, self.lr_at = cfg, model.cfg, step.trainer.lr_at
        self.twin = torch_twin.twin_of(model)
        nn = torch.nn
        embeddings = {id(m.weight) for m in self.twin.modules() if isinstance(m, nn.Embedding)}
        linear_w = {id(m.weight) for m in self.twin.modules() if isinstance(m, nn.Linear)}
        self.params = list(self.twin.parameters())  # a tied Parameter once
        decay = [p for p in self.params if id(p) in linear_w and id(p) not in embeddings]
        rest = [p for p in self.params if not (id(p) in linear_w and id(p) not in embeddings)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        images, ids, mask = step.batch
        self.inputs = (torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask),
                       torch.from_numpy(step.first.neg_image_idx),
                       torch.from_numpy(step.first.neg_text_idx))
        self.kw = dict(step.ids, weights=cfg.loss_weights)
        self.count = 0
        self.first_loss = self.loss_now()

    def loss_now(self) -> float:
        with self.torch.no_grad():
            total, _, _ = self.twin.step(*self.inputs, **self.kw)
        return float(total.detach())

    def __call__(self):
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.twin.temp.clamp_(self.model_cfg.temp_min, self.model_cfg.temp_max)
        total, _, _ = self.twin.step(*self.inputs, **self.kw)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        lr = self.lr_at(self.count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.count += 1
        return float(total.detach())
