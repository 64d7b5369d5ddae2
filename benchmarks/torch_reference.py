"""PyTorch re-statements shared by the parity tests and the train benchmark (imports torch: not for users).

- `lpips_torch(net)`: the `lpips` package's LPIPS(net='vgg' or 'alex') built without torchvision, which does not
  import beside the pinned torch: a stand-in `torchvision.models` whose `vgg16()` and `alexnet()` have
  torchvision's `features` layouts and random convolutions; the package's own linear heads.
- `load_time_vae()`: a `time_vae/` folder as diffusers' stock AutoencoderKL plus the time tensors;
  `time_aware_moments()`: docs/method.md 1.1, the time-aware VAE encoder, on those stock encoder modules.
"""

from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F

# torchvision's `features` layouts: (out channels, kernel, stride, padding) per convolution (each followed by an
# in-place ReLU), ("M", kernel, stride) per max-pool.
VGG16_CFG = (
    (64, 3, 1, 1),
    (64, 3, 1, 1),
    ("M", 2, 2),
    (128, 3, 1, 1),
    (128, 3, 1, 1),
    ("M", 2, 2),
    *[(256, 3, 1, 1)] * 3,
    ("M", 2, 2),
    *[(512, 3, 1, 1)] * 3,
    ("M", 2, 2),
    *[(512, 3, 1, 1)] * 3,
    ("M", 2, 2),
)
ALEXNET_CFG = (
    (64, 11, 4, 2),
    ("M", 3, 2),
    (192, 5, 1, 2),
    ("M", 3, 2),
    (384, 3, 1, 1),
    (256, 3, 1, 1),
    (256, 3, 1, 1),
    ("M", 3, 2),
)


def _features_stand_in(layout):
    """A torchvision.models constructor without weights: only `.features`, laid out exactly as torchvision's."""

    def build(pretrained: bool = False, weights=None, **kwargs) -> types.SimpleNamespace:
        if pretrained or weights is not None:
            raise ValueError("the torchvision stand-in has no pretrained weights")
        layers, channels = [], 3
        for item in layout:
            if item[0] == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=item[1], stride=item[2]))
            else:
                out, kernel, stride, padding = item
                layers += [
                    torch.nn.Conv2d(channels, out, kernel_size=kernel, stride=stride, padding=padding),
                    torch.nn.ReLU(inplace=True),
                ]
                channels = out
        return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    return build


vgg16_stand_in = _features_stand_in(VGG16_CFG)  # torchvision.models.vgg16, random (also DISTS' trunk)
alexnet_stand_in = _features_stand_in(ALEXNET_CFG)  # torchvision.models.alexnet, random


def lpips_torch(net: str = "vgg") -> torch.nn.Module:
    """lpips.LPIPS(net=net, version='0.1'), net 'vgg' or 'alex', with the package's heads and a (PyTorch-default)
    random trunk."""
    fake_tv, fake_models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    fake_models.vgg16, fake_models.alexnet = vgg16_stand_in, alexnet_stand_in
    fake_tv.models = fake_models
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models")}
    sys.modules.update({"torchvision": fake_tv, "torchvision.models": fake_models})
    try:
        import lpips

        return lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_time_vae(folder: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A `time_vae/` folder (TADSR's time-aware VAE) as a stock diffusers AutoencoderKL plus its time tensors
    ('encoder.time_embedding.*', 'encoder.<resnet>.time_emb_proj.*', float32), for `time_aware_moments`."""
    import inspect
    import json
    import os
    import re

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from tadsr_jax.weights import loaders

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    accepted = inspect.signature(AutoencoderKL.__init__).parameters
    vae = AutoencoderKL(**{k: v for k, v in config.items() if k in accepted})
    tensors = {}
    for key, value in load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")).items():
        for pattern, replacement in loaders.LEGACY_VAE_ATTENTION:
            key = re.sub(pattern, replacement, key)
        tensors[key] = value
    time = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("encoder.") and "time" in k]}
    vae.load_state_dict(tensors, strict=True)
    return vae, time


def time_aware_moments(
    vae, time: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of diffusers `vae`'s encoder made time-aware with the tensors `time`
    ('encoder.time_embedding.linear_{1,2}.*', 'encoder.<resnet>.time_emb_proj.*'), for NCHW `x` and (B,) `t`."""
    enc = vae.encoder
    freqs = torch.exp(-math.log(10000) * torch.arange(64, dtype=torch.float32) / 64)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(time["encoder.time_embedding.linear_1.weight"].dtype)
    e = F.linear(
        F.silu(
            F.linear(emb, time["encoder.time_embedding.linear_1.weight"], time["encoder.time_embedding.linear_1.bias"])
        ),
        time["encoder.time_embedding.linear_2.weight"],
        time["encoder.time_embedding.linear_2.bias"],
    )

    def resnet(block, h_in, name):
        h = block.conv1(F.silu(block.norm1(h_in)))
        p = F.linear(
            F.silu(e), time[f"encoder.{name}.time_emb_proj.weight"], time[f"encoder.{name}.time_emb_proj.bias"]
        )
        scale, shift = p.chunk(2, dim=1)
        h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = block.conv2(F.silu(h))
        return (block.conv_shortcut(h_in) if block.conv_shortcut is not None else h_in) + h

    h = enc.conv_in(x)
    for i, block in enumerate(enc.down_blocks):
        for j, r in enumerate(block.resnets):
            h = resnet(r, h, f"down_blocks.{i}.resnets.{j}")
        if block.downsamplers is not None:
            h = block.downsamplers[0](h)
    h = resnet(enc.mid_block.resnets[0], h, "mid_block.resnets.0")
    if enc.mid_block.attentions[0] is not None:
        h = enc.mid_block.attentions[0](h)
    h = resnet(enc.mid_block.resnets[1], h, "mid_block.resnets.1")
    h = vae.quant_conv(enc.conv_out(F.silu(enc.conv_norm_out(h))))
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)
