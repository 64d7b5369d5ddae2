"""VAE encode/decode of images too large for one pass, equal to the untiled network except for attention locality.

The network is interpreted op by op on feature maps held in host memory (numpy, one image at a time). Every
spatially local op (3x3 and 1x1 convs, the stride-2 downsample, nearest x2 + conv, SiLU, the time scale/shift)
runs over horizontal strips of rows, each strip fetched with exactly the halo rows it needs and zero rows only
beyond the true image border, so a strip equals the matching rows of the full-image op. Each strip goes through a
small jitted function whose parameters are arguments: one compile per op shape, the last strip zero-padded to the
common shape and cropped.

GroupNorm is exact: whoever writes a map also returns, per strip, shifted per-group sums of its valid rows, which
are combined on the host in float64 into the global mean and variance (what `GroupNorm` computes over the whole
image); the normalisation is then applied strip-wise, fused with the SiLU and the conv that follow it.

The one documented difference: the mid-block self-attention attends globally only while the map has at most
`attention_window**2` tokens (the usual 512x512 image has 64x64 latents); above that, within non-overlapping
windows of `attention_window` x `attention_window` latent pixels (global attention over a 4096x4096 image's
512x512 latents is out of reach). Its GroupNorm still uses global statistics.

Memory: the maps held on the host at any time stay within `memory_budget` bytes where the network allows it
(default: 90% of the memory available when the call starts). Each intermediate map is either stored or
recomputed by its readers, whichever the budget allows:
- a ResNet stores its conv1 output in a new map and writes conv2 (plus the shortcut) over it; when the input
  and that map do not fit together, conv1 is computed twice instead (once for its GroupNorm statistics, once
  fused with conv2) and the ResNet's output is written over its input, one strip behind the reads so that no
  halo row is overwritten early;
- an upsampled map is stored if it and the next ResNet's conv1 output fit; otherwise its rows are recomputed
  from the half-resolution map by each of its three readers (statistics, conv1, shortcut).
At the budget's floor the peak is one map of the output size plus the half-resolution map feeding it (SD at
4096x4096 in float32: 8.6 + 4.3 GB); the attention writes in place. Recomputing costs compute: SD's decoder at
4096x4096 does about 1.3x the convolution FLOPs of the all-stored pass with a 14 GiB budget (what a 24 GiB
machine has beside the fp32 model: only the 256-channel full-resolution map and the last two ResNets' conv1
outputs are recomputed), 1.8x with none. Stored or recomputed, the results are the same.

`strip_rows` is the strip height in rows of each op's input (rounded up to even where a lazily upsampled map
is read; a downsample writes `strip_rows // 2` rows per strip); the attention works in bands of one window.
Convs compute in the parameter dtype as the model does and intermediate maps are stored in it; the returned
moments and images are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from tadsr_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEMidBlock
from tadsr_jax.nn import Attention, Conv2d, GroupNorm, Linear, ResnetBlock2D, conv2d, lora


@dataclasses.dataclass
class _Map:
    """A (H, W, C) feature map on the host with the global (mean, var) per GroupNorm group.

    With `upsample` set, the map is nearest x2 of `data` followed by that conv, recomputed whenever read; `data`
    is None where only the statistics were computed.
    """

    data: np.ndarray | None
    stats: tuple[np.ndarray, np.ndarray] | None = None
    upsample: dict | None = None

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.data.shape[:2]
        return (2 * h, 2 * w) if self.upsample is not None else (h, w)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One call's strip height, attention window, GroupNorm group count, compute (parameter) dtype and the bytes
    of host maps it may hold at once."""

    strip_rows: int
    attention_window: int
    groups: int
    dtype: np.dtype
    memory_budget: int

    def fits(self, *maps: tuple[int, int, int]) -> bool:
        """Whether maps of these (height, width, channels) fit in the budget together."""
        return sum(h * w * c for h, w, c in maps) * self.dtype.itemsize <= self.memory_budget

    def rows(self, height: int, *, even: bool = False) -> int:
        rows = min(self.strip_rows, height)
        return rows + rows % 2 if even else rows


class _StatsAccumulator:
    """Global per-group mean and variance from per-strip sums around a per-strip shift (exact for any shift)."""

    def __init__(self):
        self.counts, self.shifts, self.sums, self.squares = [], [], [], []

    def add(self, count: int, stats: tuple[jax.Array, jax.Array, jax.Array]) -> None:
        shift, s1, s2 = (np.asarray(s, np.float64) for s in stats)
        self.counts.append(count)
        self.shifts.append(shift)
        self.sums.append(s1)
        self.squares.append(s2)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        n = np.asarray(self.counts, np.float64)[:, None]
        shift, s1, s2 = np.stack(self.shifts), np.stack(self.sums), np.stack(self.squares)
        mean = (n * shift + s1).sum(0) / n.sum()
        offset = mean - shift
        var = (s2 - 2 * offset * s1 + n * offset**2).sum(0) / n.sum()
        return mean.astype(np.float32), var.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Jitted strip functions. Parameters are arguments (dicts of arrays; None marks an absent part), so layers of the
# same shape share one compile.


def _conv(x: jax.Array, p: dict, stride: int = 1, col_pad: int | None = None) -> jax.Array:
    """Conv over rows that already carry their halo (no row padding); columns padded like the layer."""
    pad = p["kernel"].shape[1] // 2 if col_pad is None else col_pad
    y = conv2d(x[None], p["kernel"].astype(x.dtype), stride, ((0, 0), (pad, pad)))[0]
    return y if p["bias"] is None else y + p["bias"].astype(x.dtype)


def _linear(x: jax.Array, p: dict) -> jax.Array:
    y = x @ p["kernel"].astype(x.dtype)
    return y if p["bias"] is None else y + p["bias"].astype(x.dtype)


def _group_norm(x: jax.Array, p: dict) -> jax.Array:
    """`GroupNorm.__call__` with given global statistics."""
    per_channel = x.shape[-1] // p["mean"].shape[0]
    mean, var = jnp.repeat(p["mean"], per_channel), jnp.repeat(p["var"], per_channel)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + p["eps"])
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def _upsample_conv(low: jax.Array, p: dict) -> jax.Array:
    """Rows [2i+1, 2j-1) of conv(nearest_x2(map)) from rows [i, j) of the map."""
    return _conv(jnp.repeat(jnp.repeat(low, 2, axis=0), 2, axis=1), p)


def _map_rows(raw: jax.Array, upsample: dict | None, halo: int) -> jax.Array:
    """A map's rows [a - halo, a + R + halo) from what `_fetch` returned."""
    if upsample is None:
        return raw
    rows = _upsample_conv(raw, upsample)
    return rows if halo else rows[1:-1]


def _row_mask(first_row: jax.Array, rows: int, height: jax.Array) -> jax.Array:
    index = first_row + jnp.arange(rows)
    return ((index >= 0) & (index < height))[:, None, None]


def _strip_stats(y: jax.Array, first_row: jax.Array, height: jax.Array, groups: int):
    """Per-group (shift, sum(y - shift), sum((y - shift)^2)) over the valid rows, shift = their mean."""
    rows, width, channels = y.shape
    y = y.astype(jnp.float32).reshape(rows, width, groups, channels // groups)
    valid = _row_mask(first_row, rows, height)[..., None]
    count = valid.sum() * width * (channels // groups)
    shift = jnp.where(valid, y, 0).sum((0, 1, 3)) / count
    centred = jnp.where(valid, y - shift[:, None], 0)
    return shift, centred.sum((0, 1, 3)), jnp.square(centred).sum((0, 1, 3))


def _norm_silu_conv(x: jax.Array, first_row: jax.Array, height: jax.Array, p: dict) -> jax.Array:
    """conv(SiLU(norm(x) [*(1+scale)+shift])) of rows from `first_row` that carry the conv's halo.

    Rows outside the image are zeroed before the conv: its zero padding (norm and pre-convs are not zero there).
    """
    if p["norm"] is not None:
        x = _group_norm(x, p["norm"])
        if p["scale_shift"] is not None:
            scale, shift = p["scale_shift"]
            x = x * (1 + scale) + shift
        x = jax.nn.silu(x)
    return _conv(jnp.where(_row_mask(first_row, x.shape[0], height), x, 0), p["conv"])


@functools.partial(jax.jit, static_argnames="groups")
def _conv_strip(raw, residual_raw, first_row, height, p, *, groups: int):
    """Output rows [a, a+R) of [post_conv](conv(SiLU(norm(pre_conv(src)) [*(1+scale)+shift])) [+ shortcut(res)])."""
    x = _map_rows(raw.astype(p["conv"]["kernel"].dtype), p["src_upsample"], 1)
    if p["pre_conv"] is not None:
        x = _conv(x, p["pre_conv"])
    y = _norm_silu_conv(x, first_row - 1, height, p)
    if residual_raw is not None:
        shortcut = _map_rows(residual_raw, p["residual_upsample"], 0)
        if p["shortcut"] is not None:
            shortcut = _conv(shortcut, p["shortcut"])
        y = shortcut + y
    if p["post_conv"] is not None:
        y = _conv(y, p["post_conv"])
    return y, (_strip_stats(y, first_row, height, groups) if groups else None)


@functools.partial(jax.jit, static_argnames="groups")
def _resnet_strip(raw, first_row, height, p, *, groups: int):
    """Output rows [a, a+R) of a whole ResNet from its input rows [a-2, a+R+2): conv1 recomputed, not stored."""
    x = raw.astype(p["conv1"]["conv"]["kernel"].dtype)
    h = _norm_silu_conv(x, first_row - 2, height, p["conv1"])
    y = _norm_silu_conv(h, first_row - 1, height, p["conv2"])
    shortcut = x[2:-2] if p["shortcut"] is None else _conv(x[2:-2], p["shortcut"])
    y = shortcut + y
    return y, _strip_stats(y, first_row, height, groups)


@functools.partial(jax.jit, static_argnames="groups")
def _upsample_strip(low, first_row, height, conv, *, groups: int):
    y = _upsample_conv(low, conv)[1:-1]
    return y, _strip_stats(y, first_row, height, groups)


@functools.partial(jax.jit, static_argnames="groups")
def _upsample_stats_strip(low, first_row, height, conv, *, groups: int):
    return _strip_stats(_upsample_conv(low, conv)[1:-1], first_row, height, groups)


@functools.partial(jax.jit, static_argnames="groups")
def _downsample_strip(raw, first_row, height, conv, *, groups: int):
    """Downsample2D(padding=0): zero column on the right (the bottom zero row comes with the fetch), stride 2."""
    y = _conv(jnp.pad(raw, ((0, 0), (0, 1), (0, 0))), conv, stride=2, col_pad=0)
    return y, _strip_stats(y, first_row, height, groups)


@functools.partial(jax.jit, static_argnames=("heads", "window", "masked", "upcast", "groups"))
def _attention_band(band, first_row, height, p, *, heads: int, window: int, masked: bool, upcast: bool, groups: int):
    """VAE self-attention (GroupNorm, q/k/v, softmax, out, residual) within windows of a band of rows.

    The band is split along its width into windows of `window` columns; with `masked`, keys outside the image
    (zero padding of the last band and of the last window) are excluded.
    """
    rows, width, channels = band.shape
    count = -(-width // window)
    x = jnp.pad(band, ((0, 0), (0, count * window - width), (0, 0)))

    def to_windows(t):
        return t.reshape(rows, count, window, -1).transpose(1, 0, 2, 3).reshape(count, rows * window, -1)

    tokens = to_windows(_group_norm(x, p["norm"]))
    mask = None
    if masked:
        inside = _row_mask(first_row, rows, height)[:, :, 0] & (jnp.arange(count * window) < width)[None]
        mask = to_windows(inside[..., None])[:, None, None, :, 0]
    q, k, v = (_linear(tokens, p[name]).reshape(count, rows * window, heads, -1) for name in ("to_q", "to_k", "to_v"))
    if upcast:
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    h = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(count, rows * window, -1).astype(band.dtype)
    h = _linear(h, p["to_out"]).reshape(count, rows, window, channels).transpose(1, 0, 2, 3)
    y = h.reshape(rows, count * window, channels)[:, :width] + band
    return y, _strip_stats(y, first_row, height, groups)


# ----------------------------------------------------------------------------------------------------------------
# Host side: parameters, row fetching, passes over strips.


def _dense(layer: Conv2d | Linear | None) -> dict | None:
    if layer is None:
        return None
    return {"kernel": layer.kernel[...], "bias": None if layer.bias is None else layer.bias[...]}


def _norm(gn: GroupNorm, stats: tuple[np.ndarray, np.ndarray]) -> dict:
    mean, var = stats
    return {"scale": gn.scale[...], "bias": gn.bias[...], "eps": np.float32(gn.eps), "mean": mean, "var": var}


def _rows(data: np.ndarray, start: int, stop: int) -> jax.Array:
    """Rows [start, stop) of a host map, zero outside it, copied to the device.

    Copied, not aliased: an aliased view would keep the whole host map alive until the next garbage collection
    (and could see the in-place writes that follow).
    """
    if start >= 0 and stop <= data.shape[0]:
        rows = data[start:stop]
    else:
        rows = np.zeros((stop - start, *data.shape[1:]), data.dtype)
        lo, hi = max(start, 0), min(stop, data.shape[0])
        rows[lo - start : hi - start] = data[lo:hi]
    return jax.device_put(rows, may_alias=False)


def _fetch(src: _Map, first_row: int, rows: int, halo: int) -> jax.Array:
    if src.upsample is None:
        return _rows(src.data, first_row - halo, first_row + rows + halo)
    return _rows(src.data, first_row // 2 - 1, (first_row + rows) // 2 + 1)


def _sweep(
    height: int,
    rows: int,
    strip: Callable[[int], tuple[jax.Array | None, tuple | None]],
    out: np.ndarray | None,
    group_row: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Runs `strip(a)` -> (rows [a, a + rows) of a map or None, their GroupNorm sums or None) over the map's
    strips, writes the rows into `out` and returns the map's global (mean, var) (None without sums).

    Writes lag one strip behind, so `out` may be the map the strips read (halo rows included, up to `rows` of
    them). `group_row` is the number of values of one GroupNorm group in one row.
    """
    stats, pending = _StatsAccumulator(), None
    for a in range(0, height, rows):
        y, strip_stats = strip(a)
        if strip_stats is not None:
            stats.add(min(rows, height - a) * group_row, strip_stats)
        if out is not None:
            if pending is not None:
                out[pending[0] : pending[0] + len(pending[1])] = pending[1]
            pending = (a, np.asarray(y)[: height - a])
    if pending is not None:
        out[pending[0] :] = pending[1]
    return stats.result() if stats.counts else None


def _conv_params(
    conv: Conv2d,
    norm: GroupNorm | None = None,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
    scale_shift: tuple[jax.Array, jax.Array] | None = None,
) -> dict:
    """`_norm_silu_conv`'s parameters; `stats` are the global statistics of the map `norm` normalises."""
    return {"norm": None if norm is None else _norm(norm, stats), "scale_shift": scale_shift, "conv": _dense(conv)}


def _conv_pass(
    src: _Map,
    conv: Conv2d,
    plan: _Plan,
    *,
    norm: GroupNorm | None = None,
    scale_shift: tuple[jax.Array, jax.Array] | None = None,
    pre_conv: Conv2d | None = None,
    residual: _Map | None = None,
    shortcut: Conv2d | None = None,
    post_conv: Conv2d | None = None,
    out: np.ndarray | None = None,
    final: bool = False,
    store: bool = True,
) -> _Map:
    """A 3x3 conv and its fused neighbours over strips, into a new map or `out` (which may be `src.data`);
    with `store=False` only the output's statistics are computed (`data` is None)."""
    height, width = src.shape
    rows = plan.rows(height, even=src.upsample is not None or (residual is not None and residual.upsample is not None))
    p = {
        **_conv_params(conv, norm, src.stats, scale_shift),
        "src_upsample": src.upsample,
        "pre_conv": _dense(pre_conv),
        "residual_upsample": None if residual is None else residual.upsample,
        "shortcut": _dense(shortcut),
        "post_conv": _dense(post_conv),
    }
    channels = (post_conv or conv).out_channels
    if out is None and store:
        out = np.empty((height, width, channels), np.float32 if final else plan.dtype)
    groups = 0 if final else plan.groups

    def strip(a):
        residual_raw = None if residual is None else _fetch(residual, a, rows, 0)
        return _conv_strip(_fetch(src, a, rows, 1), residual_raw, a, height, p, groups=groups)

    return _Map(out, _sweep(height, rows, strip, out, width * channels // plan.groups))


def _resnet(resnet: ResnetBlock2D, x: _Map, temb: jax.Array | None, plan: _Plan) -> _Map:
    """A ResNet with its conv1 output stored, or, where input and that output do not fit the budget together
    and the output can replace the input, recomputed and written over the input."""
    scale_shift = None
    if resnet.time_emb_proj is not None:
        if resnet.time_mode != "scale_shift":
            raise NotImplementedError(f"tiled VAE: time_mode {resnet.time_mode!r} is not a VAE ResNet mode")
        t = resnet.time_emb_proj(jax.nn.silu(temb[None]))[0].astype(plan.dtype)
        scale_shift = tuple(jnp.split(t, 2))
    height, width = x.shape
    in_place = x.upsample is None and x.data.shape[-1] == resnet.conv2.out_channels
    if not in_place or plan.fits(x.data.shape, (height, width, resnet.conv1.out_channels)):
        h = _conv_pass(x, resnet.conv1, plan, norm=resnet.norm1)
        return _conv_pass(
            h,
            resnet.conv2,
            plan,
            norm=resnet.norm2,
            scale_shift=scale_shift,
            residual=x,
            shortcut=resnet.conv_shortcut,
            out=h.data,
        )
    h_stats = _conv_pass(x, resnet.conv1, plan, norm=resnet.norm1, store=False).stats
    p = {
        "conv1": _conv_params(resnet.conv1, resnet.norm1, x.stats),
        "conv2": _conv_params(resnet.conv2, resnet.norm2, h_stats, scale_shift),
        "shortcut": _dense(resnet.conv_shortcut),
    }
    rows = max(plan.rows(height), min(2, height))  # the writes lag one strip and the reads reach 2 rows back

    def strip(a):
        return _resnet_strip(_rows(x.data, a - 2, a + rows + 2), a, height, p, groups=plan.groups)

    return _Map(x.data, _sweep(height, rows, strip, x.data, width * x.data.shape[-1] // plan.groups))


def _downsample(conv: Conv2d, x: _Map, plan: _Plan) -> _Map:
    height, width = x.shape
    out_height, out_width = (height - 2) // 2 + 1, (width - 2) // 2 + 1
    rows = min(max(plan.strip_rows // 2, 1), out_height)
    out = np.empty((out_height, out_width, conv.out_channels), plan.dtype)

    def strip(a):
        return _downsample_strip(
            _rows(x.data, 2 * a, 2 * (a + rows) + 1), a, out_height, _dense(conv), groups=plan.groups
        )

    return _Map(out, _sweep(out_height, rows, strip, out, out_width * conv.out_channels // plan.groups))


def _upsample(conv: Conv2d, x: _Map, plan: _Plan, *, store: bool) -> _Map:
    """Nearest x2 + conv, stored, or left to its readers (`store=False`) with only its statistics computed."""
    height, width = 2 * x.data.shape[0], 2 * x.data.shape[1]
    rows = 2 * min(plan.strip_rows, x.data.shape[0])
    out = np.empty((height, width, conv.out_channels), plan.dtype) if store else None

    def strip(a):
        low = _rows(x.data, a // 2 - 1, (a + rows) // 2 + 1)
        if store:
            return _upsample_strip(low, a, height, _dense(conv), groups=plan.groups)
        return None, _upsample_stats_strip(low, a, height, _dense(conv), groups=plan.groups)

    stats = _sweep(height, rows, strip, out, width * conv.out_channels // plan.groups)
    return _Map(out, stats) if store else _Map(x.data, stats, upsample=_dense(conv))


def _attention(attn: Attention, x: _Map, plan: _Plan) -> _Map:
    """Mid-block attention, in place: globally if the map fits one window, else per window (see module doc)."""
    height, width = x.shape
    window = plan.attention_window
    rows, cols = (height, width) if height * width <= window**2 else (window, window)
    p = {
        "norm": _norm(attn.group_norm, x.stats),
        "to_q": _dense(attn.to_q),
        "to_k": _dense(attn.to_k),
        "to_v": _dense(attn.to_v),
        "to_out": _dense(attn.to_out[0]),
    }
    masked = bool(height % rows or width % cols)

    def strip(a):  # a band reads only its own rows, so writing one band behind is safe too
        return _attention_band(
            _rows(x.data, a, a + rows),
            a,
            height,
            p,
            heads=attn.heads,
            window=cols,
            masked=masked,
            upcast=attn.upcast,
            groups=plan.groups,
        )

    return _Map(x.data, _sweep(height, rows, strip, x.data, width * x.data.shape[-1] // plan.groups))


def _mid_block(mid: VAEMidBlock, x: _Map, temb: jax.Array | None, plan: _Plan) -> _Map:
    x = _resnet(mid.resnets[0], x, temb, plan)
    if mid.attentions is not None:
        x = _attention(mid.attentions[0], x, plan)
    return _resnet(mid.resnets[1], x, temb, plan)


def _plan(vae: AutoencoderKL, strip_rows: int, attention_window: int, memory_budget: int | None) -> _Plan:
    if strip_rows < 1 or attention_window < 1:
        raise ValueError(f"strip_rows ({strip_rows}) and attention_window ({attention_window}) must be positive")
    if any(list(host.active_lora()) for host in lora.lora_hosts(vae).values()):
        raise ValueError("tiled VAE: merge the active LoRA adapters into the VAE first (lora.merge_adapters)")
    if memory_budget is None:
        memory_budget = int(0.9 * psutil.virtual_memory().available)
    return _Plan(
        strip_rows,
        attention_window,
        vae.config.norm_num_groups,
        np.dtype(vae.decoder.conv_in.kernel[...].dtype),
        memory_budget,
    )


def _encode_image(vae: AutoencoderKL, image: np.ndarray, temb: jax.Array | None, plan: _Plan) -> np.ndarray:
    encoder = vae.encoder
    x = _conv_pass(_Map(image), encoder.conv_in, plan)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x, temb, plan)
        if block.downsamplers is not None:
            x = _downsample(block.downsamplers[0].conv, x, plan)
    x = _mid_block(encoder.mid_block, x, temb, plan)
    return _conv_pass(x, encoder.conv_out, plan, norm=encoder.conv_norm_out, post_conv=vae.quant_conv, final=True).data


def _decode_latent(vae: AutoencoderKL, latent: np.ndarray, plan: _Plan) -> np.ndarray:
    decoder = vae.decoder
    x = _conv_pass(_Map(latent), decoder.conv_in, plan, pre_conv=vae.post_quant_conv)
    x = _mid_block(decoder.mid_block, x, None, plan)
    blocks = decoder.up_blocks
    for i, block in enumerate(blocks):
        for resnet in block.resnets:
            x = _resnet(resnet, x, None, plan)
        if block.upsamplers is not None:
            conv = block.upsamplers[0].conv
            height, width = 2 * x.data.shape[0], 2 * x.data.shape[1]
            store = plan.fits(
                (height, width, conv.out_channels), (height, width, blocks[i + 1].resnets[0].conv1.out_channels)
            )
            x = _upsample(conv, x, plan, store=store)
    return _conv_pass(x, decoder.conv_out, plan, norm=decoder.conv_norm_out, final=True).data


def tiled_encode(
    vae: AutoencoderKL,
    images: np.ndarray | jax.Array,
    timesteps: jax.Array | int | None = None,
    *,
    strip_rows: int = 256,
    attention_window: int = 64,
    memory_budget: int | None = None,
) -> DiagonalGaussian:
    """`vae.encode(images, timesteps)` for (B, H, W, 3) images in [-1, 1] of any size, one image at a time.

    `memory_budget`: bytes of feature maps to hold on the host at once (see the module docstring); None: 90% of
    the memory available now.
    """
    encoder = vae.encoder
    if encoder.time_aware and timesteps is None:
        raise ValueError("the time-aware encoder needs timesteps")
    plan = _plan(vae, strip_rows, attention_window, memory_budget)
    images = np.asarray(images)
    temb = encoder.time_embed(timesteps, len(images)) if encoder.time_aware else None
    moments = [_encode_image(vae, image, None if temb is None else temb[b], plan) for b, image in enumerate(images)]
    return DiagonalGaussian.from_moments(jnp.asarray(np.stack(moments)))


def tiled_decode(
    vae: AutoencoderKL,
    latents: np.ndarray | jax.Array,
    *,
    strip_rows: int = 64,
    attention_window: int = 64,
    memory_budget: int | None = None,
) -> np.ndarray:
    """`vae.decode(latents)` for (B, h, w, latent_channels) latents of any size, one latent at a time (float32);
    `memory_budget` as in `tiled_encode`."""
    plan = _plan(vae, strip_rows, attention_window, memory_budget)
    return np.stack([_decode_latent(vae, latent, plan) for latent in np.asarray(latents)])


class StripwiseVAE:
    """An `AutoencoderKL` whose encode/decode run strip-wise on the host (for images too large for one pass)."""

    def __init__(
        self, vae: AutoencoderKL, *, encode_rows: int = 256, decode_rows: int = 64, attention_window: int = 64
    ):
        self.vae, self.config = vae, vae.config
        self.encode_rows, self.decode_rows, self.attention_window = encode_rows, decode_rows, attention_window

    def encode(self, images: jax.Array, timesteps: jax.Array | int | None = None) -> DiagonalGaussian:
        return tiled_encode(
            self.vae, images, timesteps, strip_rows=self.encode_rows, attention_window=self.attention_window
        )

    def decode(self, latents: jax.Array) -> jax.Array:
        return jnp.asarray(
            tiled_decode(self.vae, latents, strip_rows=self.decode_rows, attention_window=self.attention_window)
        )
