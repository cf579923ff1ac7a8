"""Helpers shared by the layer and attention tests."""
import numpy as np

from minblip import Module


def randomize(module, rng, std=0.5):
    """Redraw every Param (float64) from rng so gradients are not tiny and LayerNorm's
    gamma and beta are not the trivial ones and zeros."""
    module.to(np.float64)
    for p in module.params():
        p.data[...] = rng.normal(0.0, std, p.shape)
    return module


class Seeded(Module):
    """Runs a layer with a fresh generator of the same seed on every call, so
    its dropout masks are the same in every evaluation of the gradient-check loss."""

    def __init__(self, layer, seed):
        self.layer, self.seed = layer, seed

    def forward(self, *args, **kwargs):
        return self.layer.forward(*args, rng=np.random.default_rng(self.seed), **kwargs)

    def backward(self, dout, cache):
        return self.layer.backward(dout, cache)
