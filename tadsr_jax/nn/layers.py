"""Dense, convolution, normalisation and embedding layers, NHWC, with PyTorch-compatible parameter names.

Parameter leaves are named so that a PyTorch state-dict key maps onto them mechanically
(`weight` -> `kernel` / `scale` / `embedding`, `bias` -> `bias`), see `tadsr_jax.weights.convert`.
`Linear` and `Conv2d` can carry LoRA adapters (see `tadsr_jax.nn.lora`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax import flops, prng
from tadsr_jax.nn import lora


def _torch_default_uniform(rngs: nnx.Rngs, shape: Sequence[int], fan_in: int, dtype) -> jax.Array:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return prng.uniform(rngs.params(), shape, dtype, -bound, bound)


def gathered(weight: jax.Array) -> jax.Array:
    """`weight`, whole on every device of the context mesh (`tadsr_jax.parallel.under_mesh`), for its layer to use:
    a weight split over the mesh (FSDP) is all-gathered where it is used, and the layer's activations keep the
    batch split they came with. Left to choose, XLA's partitioner split some of SD-2.1's large activations by
    channel to match their convolution's split kernel instead (v5e, 8 images per chip, fsdp 8: all-to-alls of
    float32 512x512 maps, and 15.96 GiB of temporaries against the 15.75 allowed; without FSDP the step fits)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return weight
    return jax.lax.with_sharding_constraint(weight, jax.sharding.PartitionSpec())


class Linear(lora.LoRAHost):
    """y = x W + b (+ LoRA deltas of the active adapters)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        zero_init: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features)
        init = jnp.zeros(shape, dtype) if zero_init else _torch_default_uniform(rngs, shape, in_features, dtype)
        self.kernel = nnx.Param(init)
        if use_bias:
            self.bias = nnx.Param(
                jnp.zeros((out_features,), dtype)
                if zero_init
                else _torch_default_uniform(rngs, (out_features,), in_features, dtype)
            )
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ gathered(self.kernel[...]).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        for adapter in self.active_lora():
            a, b = adapter.a[...].astype(x.dtype), adapter.b[...].astype(x.dtype)
            y = y + adapter.scale * ((x @ a) @ b)
        return y

    def lora_factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.in_features, rank), (rank, self.out_features)

    def lora_delta(self, adapter: lora.LoRAAdapter) -> jax.Array:
        return adapter.scale * (adapter.a[...] @ adapter.b[...])


Padding = int | Sequence[tuple[int, int]]


def _explicit(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    return tuple(tuple(p) for p in padding)


# On XLA:CPU a 3x3 convolution over a map of at most this many output positions per image runs 1.1-8x faster as
# one matmul over the k x k shifted copies of the input (2x2 to 16x16 maps, 64-1280 channels, forward and
# backward; XLA's kernels fall to 1-20 GFLOP/s below 8x8 maps); at 32x32 and up the convolution is as fast or
# faster. TPUs keep the convolution: XLA's estimate for the matmul form there is 0.9-1.7x of it.
CPU_MATMUL_CONV_MAX_POSITIONS = 16 * 16
# ... and has at least this many input channels: with fewer the two forms run alike (16x16, 64 channels: 1.08x),
# and the matmul form's extra ops cost compile time (the tiny test models' train steps compiled 30% slower).
CPU_MATMUL_CONV_MIN_CHANNELS = 128


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=_explicit(padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _window(x: jax.Array, di: int, dj: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """x[:, di::stride, dj::stride] cut to out_hw: what tap (di, dj) of a strided k x k window sees."""
    ho, wo = out_hw
    return x[:, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """The convolution as (shifted copies of x, concatenated along channels in the kernel's (h, w) order) @ kernel."""
    kh, kw, channels, features = kernel.shape
    (top, bottom), (left, right) = _explicit(padding)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_hw = ((x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1)
    shifted = [_window(x, di, dj, stride, out_hw) for di in range(kh) for dj in range(kw)]
    return jnp.concatenate(shifted, axis=-1) @ kernel.reshape(kh * kw * channels, features)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """NHWC x HWIO convolution with symmetric integer padding or explicit ((top, bottom), (left, right)).

    Small maps on CPU go through `_conv_as_matmul` (see `CPU_MATMUL_CONV_MAX_POSITIONS`); the choice is made for
    the platform the program is compiled for (`jax.lax.platform_dependent`), so a TPU program compiled on a CPU
    host keeps the convolution."""
    (top, bottom), (left, right) = _explicit(padding)
    kh, kw = kernel.shape[:2]
    positions = ((x.shape[1] + top + bottom - kh) // stride + 1) * ((x.shape[2] + left + right - kw) // stride + 1)
    if kh * kw == 1 or positions > CPU_MATMUL_CONV_MAX_POSITIONS or x.shape[-1] < CPU_MATMUL_CONV_MIN_CHANNELS:
        return _conv(x, kernel, stride, padding)
    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x, k: _conv_as_matmul(x, k, stride, padding),
        default=lambda x, k: _conv(x, k, stride, padding),
    )


def low_rank_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """`conv2d` for a kernel with few output channels (a LoRA A factor: k x k, C -> r), the form chosen for the
    platform compiled for (`jax.lax.platform_dependent`).

    CPU: one matmul and a sum of taps (`_low_rank_taps`): XLA:CPU runs convolutions with 4 output channels at
    3-13 GFLOP/s, 5-30x below its large ones; the tap form makes their forward and backward passes 1.4-6x faster
    there (SD shapes, rank 4). TPU keeps the convolution: its (B, H, W, k k r) tap map fills 36 of the 128 lanes
    of every tile, and XLA's v5p estimate for a conv with its rank-4 adapter, forward and backward, was 11% worse
    with it (bf16, batch 8: 512x512x128 6.51 against 5.88 ms; 64x64x320 0.549 against 0.494 ms).
    """
    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x, k: _low_rank_taps(x, k, stride, padding),
        default=lambda x, k: _conv(x, k, stride, padding),
    )


def nearest_x2_conv2d(x: jax.Array, kernel: jax.Array, *, low_rank: bool = False) -> jax.Array:
    """`conv2d` with a 3x3 kernel, stride 1 and padding 1 of x upsampled x2 by nearest neighbour (what every
    Upsample2D computes), the form chosen for the platform compiled for (`jax.lax.platform_dependent`);
    `low_rank` for a kernel with few output channels (a LoRA A factor, see `low_rank_conv2d`).

    TPU: one convolution over x dilated by 2 (`lhs_dilation`), whose zeros XLA skips, with a 4x4 kernel: the 3x3
    kernel added up over the four 2x2 offsets. Each output then takes 4 taps of x instead of 9 of the upsampled
    map, and the 4x larger upsampled map and its gradient are never built: XLA's v5p estimate for the VAE decoder's
    256 -> 512 upsampler (256 channels, 8 images, bf16, forward and input gradient) 15.0 -> 5.8 ms. XLA:CPU runs
    that form 7-11x slower; there the four output phases are four 2x2 convolutions of x (`_phase_convs`, 1.3-2.1x
    faster than the upsampled map's convolution, forward and input gradient, 16-64 pixels, 128-256 channels), and
    a low-rank kernel convolves the upsampled map as `low_rank_conv2d` does. Other platforms: the upsampled map.
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"nearest_x2_conv2d needs a 3x3 kernel, got {kernel.shape[0]}x{kernel.shape[1]}")

    def upsampled(x: jax.Array, k: jax.Array) -> jax.Array:
        return (low_rank_conv2d if low_rank else conv2d)(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), k, 1, 1)

    return jax.lax.platform_dependent(
        x,
        kernel,
        tpu=_upsampling_conv,
        cpu=upsampled if low_rank else _phase_convs,
        default=upsampled,
    )


def _block_sums(kernel: jax.Array) -> jax.Array:
    """The 3x3 kernel's 4x4 sums over the four 2x2 offsets. Output row 2i + p of the upsampled map's convolution
    sees input rows i - 1 + p and i + p, with kernel rows (0, 1 + 2) for p = 0 and (0 + 1, 2) for p = 1: rows
    p and p + 2 of these sums (the same for columns)."""
    return sum(jnp.pad(kernel, ((a, 1 - a), (b, 1 - b), (0, 0), (0, 0))) for a in (0, 1) for b in (0, 1))


def _upsampling_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """TPU's form: the block sums (`_block_sums`) over x dilated by 2, all four output phases in one convolution."""
    return jax.lax.conv_general_dilated(
        x,
        _block_sums(kernel),
        window_strides=(1, 1),
        padding=((2, 2), (2, 2)),
        lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _phase_convs(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """CPU's form: each output phase (p, q) as a 2x2 convolution of x with rows p, p + 2 and columns q, q + 2 of
    the block sums (`_block_sums`), the four interleaved."""
    batch, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    blocks = _block_sums(kernel)
    rows = [
        jnp.stack(
            [_conv(padded[:, p : p + height + 1, q : q + width + 1], blocks[p::2, q::2], 1, 0) for q in (0, 1)],
            axis=3,
        )  # (B, H, W, 2, O)
        for p in (0, 1)
    ]
    return jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, -1)


def _low_rank_taps(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """x @ kernel as a (C, k k r) matrix gives every tap's contribution at every position; output (i, j) sums tap
    (di, dj) of position (s i + di, s j + dj) (`_sum_taps`). Same FLOPs as the convolution."""
    k, _, channels, rank = kernel.shape
    (top, bottom), (left, right) = _explicit(padding)
    z = (x @ kernel.transpose(2, 0, 1, 3).reshape(channels, k * k * rank)).reshape(*x.shape[:3], k * k, rank)
    z = jnp.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0)))
    out_hw = ((z.shape[1] - k) // stride + 1, (z.shape[2] - k) // stride + 1)
    return _sum_taps(z, k, stride, out_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sum_taps(z: jax.Array, k: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
    """(B, Hp, Wp, k k, r) -> (B, Ho, Wo, r): the sum over taps (di, dj) of z[:, di::stride, dj::stride, di k + dj].

    Hand-written backward: autodiff would pad each tap's cotangent to all k k taps and add the k k copies; the
    cotangent is one stack of the k k (strided) pads instead."""
    return sum(_window(z, di, dj, stride, out_hw)[:, :, :, di * k + dj] for di in range(k) for dj in range(k))


def _sum_taps_fwd(z, k, stride, out_hw):
    return _sum_taps(z, k, stride, out_hw), z.shape[1:3]


def _sum_taps_bwd(k, stride, out_hw, padded_hw, g):
    (hp, wp), (ho, wo) = padded_hw, out_hw
    zero = jnp.zeros((), g.dtype)
    taps = [
        jax.lax.pad(
            g,
            zero,
            (
                (0, 0, 0),
                (di, hp - di - stride * (ho - 1) - 1, stride - 1),
                (dj, wp - dj - stride * (wo - 1) - 1, stride - 1),
                (0, 0, 0),
            ),
        )
        for di in range(k)
        for dj in range(k)
    ]
    return (jnp.stack(taps, axis=3),)


_sum_taps.defvjp(_sum_taps_fwd, _sum_taps_bwd)


class Conv2d(lora.LoRAHost):
    """2-D convolution, NHWC activations and HWIO kernel (PyTorch OIHW is transposed on load)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        self.kernel = nnx.Param(
            _torch_default_uniform(rngs, (kernel_size, kernel_size, in_channels, out_channels), fan_in, dtype)
        )
        self.bias = nnx.Param(_torch_default_uniform(rngs, (out_channels,), fan_in, dtype)) if use_bias else None

    def __call__(self, x: jax.Array, *, nearest_x2: bool = False) -> jax.Array:
        """The convolution of x or, with `nearest_x2`, of x upsampled x2 by nearest neighbour (3x3, stride 1,
        padding 1 only: `nearest_x2_conv2d`, which need not build the upsampled map)."""
        if nearest_x2:
            if (self.kernel_size, self.stride, self.padding) != (3, 1, 1):
                raise ValueError("nearest_x2 needs a 3x3 convolution with stride 1 and padding 1")
            conv, low_rank = nearest_x2_conv2d, functools.partial(nearest_x2_conv2d, low_rank=True)
        else:
            conv = functools.partial(conv2d, stride=self.stride, padding=self.padding)
            low_rank = functools.partial(low_rank_conv2d, stride=self.stride, padding=self.padding)
        y = conv(x, gathered(self.kernel[...]).astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        for adapter in self.active_lora():
            # PEFT conv LoRA: A has the base kernel's geometry, B is a 1x1 conv.
            a, b = adapter.a[...].astype(x.dtype), adapter.b[...].astype(x.dtype)
            y = y + adapter.scale * (low_rank(x, a) @ b)
        return y

    def lora_factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k = self.kernel_size
        return (k, k, self.in_channels, rank), (rank, self.out_channels)

    def lora_delta(self, adapter: lora.LoRAAdapter) -> jax.Array:
        return adapter.scale * jnp.einsum("hwir,ro->hwio", adapter.a[...], adapter.b[...])


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC (or NTC) input; statistics in float32 whatever the activation dtype.

    `__call__` can also apply a (scale, shift) modulation and SiLU, the ops that follow every GroupNorm of SD's
    ResNet blocks. The backward pass keeps only the input and per-group statistics: the float32 intermediates
    (each twice the bytes of a bf16 map, two per norm) were the largest saved activations of a 512x512 train
    step. What it recomputes depends on the platform the program is compiled for (`_group_norm`).
    """

    def __init__(self, num_groups: int, num_channels: int, *, eps: float, dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))

    def __call__(
        self, x: jax.Array, *, scale_shift: tuple[jax.Array, jax.Array] | None = None, silu: bool = False
    ) -> jax.Array:
        """GN(x), then `* (1 + scale) + shift` if given, then SiLU if `silu`; in x's dtype."""
        return _group_norm(x, self.scale[...], self.bias[...], scale_shift, self.num_groups, self.eps, silu)


def _per_group(per_channel: jax.Array, num_groups: int) -> jax.Array:
    """(B, C) sums -> (B, C): each channel's group total, so every big reduction is over the spatial axis only."""
    b, c = per_channel.shape
    grouped = per_channel.reshape(b, num_groups, c // num_groups).sum(-1, keepdims=True)
    return jnp.broadcast_to(grouped, (b, num_groups, c // num_groups)).reshape(b, c)


def _per_group_materialized(per_channel: jax.Array, num_groups: int) -> jax.Array:
    """`_per_group` as two matmuls with the (C, G) 0/1 group-membership matrix (sums, then one copy per channel),
    for the CPU forms: the totals then come out of an op of their own, (B, C) in memory. XLA:CPU fuses
    `_per_group`'s broadcast into every consumer's loop over the map, and that loop's per-element group indexing made
    GroupNorm 2x slower there (forward of 2x128x128x64: 1.97 -> 0.91 ms). Not one (C, C) same-group matrix: at
    SD's 2560 channels that is a 26 MB constant per norm, and its matmul took 1.07 ms against 0.15. Only inside a
    custom VJP: autodiff would keep the matrix as a residual of every norm.
    """
    channels = per_channel.shape[-1]
    group = np.arange(channels) // (channels // num_groups)
    membership = jnp.asarray(group[:, None] == np.arange(num_groups)[None], per_channel.dtype)
    with flops.uncounted():  # a sum, not model FLOPs
        totals = jnp.dot(per_channel, membership, precision=jax.lax.Precision.HIGHEST)
        return jnp.dot(totals, membership.T, precision=jax.lax.Precision.HIGHEST)


def _group_stats_one_pass(x: jax.Array, num_groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-channel copies of each group's mean and 1/std, (B, 1, .., 1, C) float32, in one pass over x (TPU).

    The variance is E[d^2] - E[d]^2 over float32 sums of d = x - k. For a float32 x, k is one value of each group
    (its first position's first channel; a constant of the differentiation, the statistics do not depend on it),
    so the difference does not cancel when a group's mean is large against its spread. A 16-bit x takes k = 0:
    the float32 cancellation then stays below the output's own 16-bit rounding unless a group's mean exceeds ~50
    times its spread, and the shift would cost XLA's v5p estimate 8-16% on the VAE's 512x512 ResNet blocks.
    One pass instead of two (the mean, then the squares about it) saves a read of every map on TPU. The sums
    run over the spatial axes of x as it is: a reshape to (B, positions, C) is a relayout copy on TPU.
    """
    axes = tuple(range(1, x.ndim - 1))
    channels = x.shape[-1]
    per_group = channels // num_groups
    count = math.prod(x.shape[1:-1]) * per_group
    per_sample = (x.shape[0],) + (1,) * len(axes) + (channels,)
    d = x.astype(jnp.float32)
    shift = 0.0
    if jnp.dtype(x.dtype).itemsize >= 4:
        pilot = d[(slice(None),) + (0,) * len(axes) + (slice(None, None, per_group),)]  # (B, G)
        shift = jax.lax.stop_gradient(jnp.repeat(pilot, per_group, axis=-1).reshape(per_sample))
        d = d - shift
    shifted_mean = _per_group(d.sum(axes), num_groups) / count
    var = jnp.maximum(_per_group(jnp.square(d).sum(axes), num_groups) / count - jnp.square(shifted_mean), 0.0)
    return shift + shifted_mean.reshape(per_sample), jax.lax.rsqrt(var.reshape(per_sample) + eps)


def _group_stats_two_pass(x3: jax.Array, num_groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-channel copies of each group's mean and 1/std, (B, 1, C) float32, from x3 = x as (B, positions, C)."""
    count = x3.shape[1] * (x3.shape[2] // num_groups)
    mean = _per_group_materialized(x3.sum(1), num_groups)[:, None] / count
    # The squares about the mean, a second pass: no cancellation.
    var = _per_group_materialized(jnp.square(x3 - mean).sum(1), num_groups)[:, None] / count
    return mean, jax.lax.rsqrt(var + eps)


def _modulate(y: jax.Array, scale_shift: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    return y if scale_shift is None else y * (1 + scale_shift[0]) + scale_shift[1]


def _group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    scale_shift: tuple[jax.Array, jax.Array] | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> jax.Array:
    """GN -> modulation -> SiLU in the form each platform runs best (`jax.lax.platform_dependent`).

    CPU: two-pass statistics over x as (B, positions, C) and a hand-written two-pass backward
    (`_group_norm_two_pass`); the CPU train benchmark's traced step went from 4.1 to 3.4 s with that backward,
    and the one-pass form below made the untraced step 0.5-0.7 s slower there (2.42 -> 2.93-3.13 s).
    Elsewhere: one-pass statistics and one multiply-add per element (`_group_norm_affine`), differentiated by
    autodiff of the forward recomputed from the input (`jax.checkpoint`), which XLA fuses better on TPU: two SD
    ResNet blocks at 256x256x256, bf16, batch 4, forward and backward: a v5p estimate of 20.2 ms, 29.3 GB of HBM
    traffic and 2.6 GiB of temporaries, against 24.8 ms, 44.1 GB and 4.4 GiB with the hand-written backward and
    21.7 ms, 32.3 GB with the two-pass statistics; at 512x512x128, 8 images: 25.5 ms against 30.5 ms.
    """
    static = (num_groups, eps, silu)
    return jax.lax.platform_dependent(
        x,
        scale,
        bias,
        scale_shift,
        cpu=lambda *args: _group_norm_two_pass(*args, *static),
        default=lambda *args: _group_norm_recomputed(*args, *static),
    )


@functools.partial(jax.checkpoint, static_argnums=(4, 5, 6), policy=jax.checkpoint_policies.nothing_saveable)
def _group_norm_recomputed(x, scale, bias, scale_shift, num_groups, eps, silu):
    return _group_norm_affine(x, scale, bias, scale_shift, num_groups, eps, silu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _group_norm_two_pass(x, scale, bias, scale_shift, num_groups, eps, silu):
    return _group_norm_two_pass_fwd(x, scale, bias, scale_shift, num_groups, eps, silu)[0]


def _check_scale_shift(x: jax.Array, scale_shift: tuple[jax.Array, jax.Array] | None) -> None:
    per_sample = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    if scale_shift is not None and any(a.shape != per_sample for a in scale_shift):
        raise ValueError(
            f"GroupNorm: scale and shift must have shape {per_sample}, got {[a.shape for a in scale_shift]}"
        )


def _group_norm_affine(x, scale, bias, scale_shift, num_groups, eps, silu):
    """Everything up to SiLU as one affine map of x per (sample, channel), m = x a + b: one fused pass."""
    _check_scale_shift(x, scale_shift)
    f32 = jnp.float32
    mean, rstd = _group_stats_one_pass(x, num_groups, eps)
    a = rstd * scale.astype(f32)
    b = bias.astype(f32) - mean * a
    if scale_shift is not None:
        factor = 1 + scale_shift[0].astype(f32)
        a, b = a * factor, b * factor + scale_shift[1].astype(f32)
    m = x.astype(f32) * a + b
    return (jax.nn.silu(m) if silu else m).astype(x.dtype)


def _group_norm_two_pass_fwd(x, scale, bias, scale_shift, num_groups, eps, silu):
    _check_scale_shift(x, scale_shift)
    x3 = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
    mean, rstd = _group_stats_two_pass(x3, num_groups, eps)
    y = ((x3 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    y = _modulate(y.reshape(x.shape), scale_shift)
    return (jax.nn.silu(y) if silu else y), (x, scale, bias, scale_shift, mean, rstd)


def _group_norm_bwd(num_groups, eps, silu, residuals, g):
    """The backward of GN -> modulation -> SiLU, in float32 and in two passes over the map.

    With n = (x - mean) * rstd, y = n gamma + beta and m = y (1 + s) + t, let u be the cotangent of m (g times
    SiLU'(m)). The parameters' cotangents come from two per-channel sums over positions, P = sum u and
    Q = sum u n (the first pass): dt = P, ds = gamma Q + beta P, dbeta = sum_B (1 + s) P, dgamma = sum_B (1 + s) Q.
    With v = u (1 + s) gamma, the cotangent of n, the input's is rstd (v - mean_group(v) - n mean_group(v n)) (the
    second pass), where the group means of v and v n are group sums of (1 + s) gamma P and (1 + s) gamma Q.
    """
    del eps  # in rstd already
    x, scale, bias, scale_shift, mean, rstd = residuals
    f32 = jnp.float32
    batch, channels = x.shape[0], x.shape[-1]
    gamma, beta = scale.astype(f32), bias.astype(f32)
    factor, shift = jnp.ones((batch, channels), f32), None
    if scale_shift is not None:
        factor = 1 + scale_shift[0].astype(f32).reshape(batch, channels)
        shift = scale_shift[1].astype(f32).reshape(batch, 1, channels)

    n = (x.astype(f32).reshape(batch, -1, channels) - mean) * rstd
    u = g.astype(f32).reshape(n.shape)
    if silu:
        m = n * gamma + beta
        m = m if shift is None else m * factor[:, None] + shift
        sig = jax.nn.sigmoid(m)
        u = u * sig * (1 + m * (1 - sig))
    p, q = u.sum(1), (u * n).sum(1)  # (B, C)
    count = n.shape[1] * (channels // num_groups)
    mean_v = _per_group_materialized(factor * gamma * p, num_groups)[:, None] / count
    mean_vn = _per_group_materialized(factor * gamma * q, num_groups)[:, None] / count
    dx = rstd * (u * (factor * gamma)[:, None] - mean_v - n * mean_vn)
    d_scale_shift = None
    if scale_shift is not None:
        s, t = scale_shift
        d_scale_shift = ((gamma * q + beta * p).reshape(s.shape).astype(s.dtype), p.reshape(t.shape).astype(t.dtype))
    d_scale = (factor * q).sum(0).astype(scale.dtype)
    d_bias = (factor * p).sum(0).astype(bias.dtype)
    return dx.reshape(x.shape).astype(x.dtype), d_scale, d_bias, d_scale_shift


_group_norm_two_pass.defvjp(_group_norm_two_pass_fwd, _group_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32. As GroupNorm, the backward pass keeps only the input."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return _layer_norm(x, self.scale[...], self.bias[...], self.eps)


@functools.partial(jax.checkpoint, static_argnums=(3,), policy=jax.checkpoint_policies.nothing_saveable)
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(prng.normal(rngs.params(), (num_embeddings, features), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)
