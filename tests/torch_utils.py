"""Helpers for parity tests against the PyTorch reference classes."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor a random value, norms and zero-initialised layers included.

    Weights get std 1/sqrt(fan_in) so activations stay O(1) through deep networks; norm scales are
    1 + 0.2 N(0, 1) so a transposed or ignored scale is visible.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def nhwc_to_nchw(x) -> np.ndarray:
    return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def rel_err(ours, theirs) -> float:
    """max |ours - theirs| / std(theirs): the parity measure of the README's Correctness section."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / theirs.std())
