"""One-step xS super-resolution of host images (S = `scale`, 4 by default): preprocess, one jitted call per shape
bucket, colour fix.

The model works at the output resolution: S is the factor of the bicubic upscale in front of it (the reference's
`--upscale`). Preprocessing follows the reference (docs/method.md 5): an image whose short side is below
process_size / S is first upscaled to it (bicubic), then everything is upscaled xS (bicubic). Fixes and choices
of ours:
- the working image is padded (reflect) to a multiple of `bucket` pixels instead of rescaled to a multiple of 8,
  so sizes share compiled programs, and the padding is cropped off again;
- the output is exactly S x the original size (the reference computes that resize and throws it away);
- every image gets its own posterior-noise key from the seed, so its output does not depend on which other
  images share its batch, and the same seed gives the same output;
- outputs are rounded to 8 bits (the reference truncates), after the colour fix in float.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image
from tqdm import tqdm

from tadsr_jax.infer.colorfix import COLOR_FIX_METHODS, color_fix
from tadsr_jax.infer.model import SRModel
from tadsr_jax.infer.tagger import Tagger, build_prompt
from tadsr_jax.infer.tiling import tiled_call
from tadsr_jax.infer.vae_tiling import StripwiseVAE
from tadsr_jax.method.generator import generate
from tadsr_jax.models.clip_text import tokenize

MAX_SCALE = 8


@dataclasses.dataclass(frozen=True)
class SRSettings:
    timestep: int  # the knob: low = fidelity, high = realism
    scale: int  # output = scale x input: the bicubic upscale in front of the model
    process_size: int  # images with a short side below process_size / scale are upscaled to it first
    bucket: int  # working images are padded to multiples of this many pixels (a multiple of 8)
    batch_size: int
    latent_tile: int  # UNet tiles, latent pixels
    latent_overlap: int
    vae_strip_above: int  # working images with more pixels run the VAE strip-wise, one at a time
    color_fix: str
    sample_posterior: bool
    seed: int

    def __post_init__(self):
        if not 1 <= self.timestep <= 999:
            raise ValueError(f"sr.timestep must be an integer in 1..999, got {self.timestep}")
        if not (isinstance(self.scale, int) and 1 <= self.scale <= MAX_SCALE):
            raise ValueError(f"sr.scale must be an integer in 1..{MAX_SCALE}, got {self.scale!r}")
        if self.color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"sr.color_fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {self.color_fix!r}")
        if self.bucket < 8 or self.bucket % 8:
            raise ValueError(f"sr.bucket must be a positive multiple of 8 pixels, got {self.bucket}")
        if self.batch_size < 1 or self.process_size < self.scale:
            raise ValueError(
                f"need sr.batch_size >= 1 and sr.process_size >= sr.scale ({self.scale}), got "
                f"{self.batch_size}, {self.process_size}"
            )
        if not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(
                f"need 0 <= sr.latent_overlap < sr.latent_tile, got {self.latent_overlap}, {self.latent_tile}"
            )

    @classmethod
    def from_config(cls, sr: ml_collections.ConfigDict) -> SRSettings:
        """The settings of `config.sr` (its other keys, such as prompt and dtype, are the caller's)."""
        return cls(**{f.name: sr[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A working image: the xS bicubic input in [-1, 1] (h, w, 3) and the size the output must have."""

    lq: np.ndarray
    output_size: tuple[int, int]  # (height, width): S x the original

    @property
    def bucket_shape(self) -> tuple[int, int]:
        return self.lq.shape[:2]


def compiler_options() -> dict[str, str]:
    """XLA options of the SR programs. On the CPU: the memory-optimised scheduler. The CPU backend computes
    bfloat16 dots and convolutions in float32, and its default (concurrency-optimised) scheduler converts every
    weight before the first layer runs, so a bfloat16 program held a float32 copy of all weights (bf16 serving
    peaked above float32); this one converts each weight where it is used, at no measured cost in speed."""
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if jax.default_backend() == "cpu" else {}


def working_size(height: int, width: int, process_size: int, scale: int) -> tuple[int, int]:
    """(height, width) of the working image of an input of that size: its short side raised to
    process_size / scale if below, then x scale."""
    short = process_size // scale
    if min(height, width) < short:
        s = short / min(height, width)
        height, width = int(s * height), int(s * width)
    return scale * height, scale * width


def prepare(pixels: np.ndarray, process_size: int, scale: int) -> Prepared:
    """uint8 (H, W, 3) -> the working image of the reference's preprocessing (see module docstring)."""
    h0, w0 = pixels.shape[:2]
    image = Image.fromarray(pixels)
    h, w = working_size(h0, w0, process_size, scale)
    if min(h0, w0) < process_size // scale:
        image = image.resize((w // scale, h // scale), Image.BICUBIC)
    image = image.resize((w, h), Image.BICUBIC)
    lq = np.asarray(image, np.float32) / 127.5 - 1.0
    return Prepared(lq=lq, output_size=(scale * h0, scale * w0))


def bicubic_upscale(pixels: np.ndarray, scale: int) -> np.ndarray:
    """The plain bicubic x`scale` upscale of uint8 (H, W, 3), the baseline SR is compared with."""
    h, w = pixels.shape[:2]
    return np.asarray(Image.fromarray(pixels).resize((scale * w, scale * h), Image.BICUBIC))


def padded_shape(shape: tuple[int, int], bucket: int) -> tuple[int, int]:
    return tuple(-(-s // bucket) * bucket for s in shape)


def pad_to(lq: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Reflect-pad (h, w, 3) at the bottom/right to `shape` (edge-pad where reflection is too short)."""
    pad = ((0, shape[0] - lq.shape[0]), (0, shape[1] - lq.shape[1]), (0, 0))
    mode = "reflect" if all(p < s for (_, p), s in zip(pad[:2], lq.shape[:2])) else "edge"
    return np.pad(lq, pad, mode=mode)


# One compiled program per image shape and method, instead of dispatching the wavelet fix op by op.
_color_fix = jax.jit(color_fix, static_argnames="method")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded."""
    return np.asarray(np.round(np.clip(x, 0.0, 1.0) * 255.0), np.uint8)


def finish(sr: np.ndarray, prepared: Prepared, method: str) -> np.ndarray:
    """SR output in [-1, 1] at the padded working size -> colour-fixed uint8 at exactly the output size."""
    h, w = prepared.lq.shape[:2]
    sr01 = (np.asarray(sr[:h, :w], np.float32) + 1.0) / 2.0
    fixed = np.asarray(_color_fix(jnp.asarray(sr01), jnp.asarray((prepared.lq + 1.0) / 2.0), method))
    out = to_uint8(fixed)
    if out.shape[:2] != prepared.output_size:
        out = np.asarray(Image.fromarray(out).resize(prepared.output_size[::-1], Image.BICUBIC))
    return out


class Upscaler:
    """Jitted one-step SR with `model`: compiled once per (batch, height, width) and reused.

    `__call__` takes working images of one padded shape plus per-image prompts and timesteps and returns SR
    images in [-1, 1]; `super_resolve` runs a list of host images end to end.
    """

    def __init__(self, model: SRModel, settings: SRSettings, tagger: Tagger | None = None):
        self.model, self.settings, self.tagger = model, settings, tagger
        self.tokenizer = model.tokenizer
        self.max_length = model.text_encoder.config.max_position_embeddings
        self.graphdef, self.params = nnx.split((model.unet, model.vae, model.text_encoder))
        self.compiled: dict[tuple[int, ...], jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        schedule, s = model.schedule, settings

        def denoise(unet, z, t, context):
            return tiled_call(lambda tile: unet(tile, t, context), z, s.latent_tile, s.latent_overlap)

        def forward(params, lq, input_ids, timesteps, keys):
            unet, vae, text_encoder = nnx.merge(self.graphdef, params)
            context = text_encoder(input_ids)

            def tiled_unet(z, t, c, conv_in=None):
                return denoise(unet, z, t, c)

            def one(image, ctx, t, key):
                return generate(
                    vae, tiled_unet, schedule, image[None], t[None], ctx[None], key, sample_posterior=s.sample_posterior
                )[1][0]

            return jax.vmap(one)(lq, context, timesteps, keys)

        self.forward = jax.jit(forward, compiler_options=compiler_options())  # (params, lq, ids, t, keys) -> SR

        # The strip-wise path for large images: the VAE runs on the host (vae_tiling), the UNet one jitted tile at
        # a time (one program for every large image, and a progress bar).
        def encode_text(params, input_ids):
            return nnx.merge(self.graphdef, params)[2](input_ids)

        def unet_tile(params, z, t, context):
            return nnx.merge(self.graphdef, params)[0](z, t, context)

        self._encode_text = jax.jit(encode_text, compiler_options=compiler_options())
        self._unet_tile = jax.jit(unet_tile, compiler_options=compiler_options())

    def replace(self, **changes) -> Upscaler:
        """The same model with other settings; compiled programs are shared unless the change needs new ones."""
        settings = dataclasses.replace(self.settings, **changes)
        traced = ("latent_tile", "latent_overlap", "sample_posterior")  # read while tracing
        if any(getattr(settings, name) != getattr(self.settings, name) for name in traced):
            return Upscaler(self.model, settings, self.tagger)
        other = copy.copy(self)
        other.settings = settings
        return other

    def tokens(self, prompts: Sequence[str]) -> np.ndarray:
        return tokenize(self.tokenizer, list(prompts), self.max_length)

    def _inputs(self, lq: np.ndarray, prompts: Sequence[str], timesteps: Sequence[int]) -> tuple[jax.Array, ...]:
        """The jitted forward's arguments after the parameters: images, token ids, timesteps, noise keys."""
        bad = [t for t in timesteps if not 1 <= int(t) <= 999]
        if bad:
            raise ValueError(f"timesteps must be integers in 1..999, got {bad[0]}")
        lq = jnp.asarray(lq, jnp.float32)
        keys = jnp.stack([jax.random.key(self.settings.seed)] * lq.shape[0])
        return lq, jnp.asarray(self.tokens(prompts)), jnp.asarray(timesteps, jnp.int32), keys

    def trace(self, lq: np.ndarray, prompts: Sequence[str], timesteps: Sequence[int]) -> jax.stages.Traced:
        """The jitted forward traced for these inputs (lowered and compiled by `__call__`; benchmarks count
        its FLOPs)."""
        return self.forward.trace(self.params, *self._inputs(lq, prompts, timesteps))

    def _compiled(self, lq: jax.Array, ids: jax.Array, t: jax.Array, keys: jax.Array) -> jax.stages.Compiled:
        shape = lq.shape
        if shape not in self.compiled:
            logging.info("compiling SR for batch %d at %dx%d (once per shape)", shape[0], shape[1], shape[2])
            start = time.perf_counter()
            self.compiled[shape] = self.forward.trace(self.params, lq, ids, t, keys).lower().compile()
            self.compile_seconds += time.perf_counter() - start
        return self.compiled[shape]

    def __call__(self, lq: np.ndarray, prompts: Sequence[str], timesteps: Sequence[int]) -> jax.Array:
        """(B, H, W, 3) working images in [-1, 1] (one padded shape) -> SR images (B, H, W, 3) in [-1, 1]."""
        lq, ids, t, keys = self._inputs(lq, prompts, timesteps)
        if lq.shape[1] * lq.shape[2] > self.settings.vae_strip_above:
            return self._stripwise(lq, ids, t, keys)
        return self._compiled(lq, ids, t, keys)(self.params, lq, ids, t, keys)

    def _stripwise(self, lq: jax.Array, ids: jax.Array, t: jax.Array, keys: jax.Array) -> jax.Array:
        """`__call__` for large images: the same generator, its VAE strip-wise (exact but for attention locality)."""
        vae = StripwiseVAE(nnx.merge(self.graphdef, self.params)[1])
        context = self._encode_text(self.params, ids)

        def tiles_one_by_one(f, tiles):
            return jnp.stack([f(tile) for tile in tqdm(tiles, desc="UNet tiles", unit="tile", leave=False)])

        def unet(z, timesteps, ctx, conv_in=None):
            return tiled_call(
                lambda tile: self._unet_tile(self.params, tile, timesteps, ctx),
                z,
                self.settings.latent_tile,
                self.settings.latent_overlap,
                map_tiles=tiles_one_by_one,
            )

        return jnp.concatenate(
            [
                generate(
                    vae,
                    unet,
                    self.model.schedule,
                    lq[i : i + 1],
                    t[i : i + 1],
                    context[i : i + 1],
                    keys[i],
                    sample_posterior=self.settings.sample_posterior,
                )[1]
                for i in range(lq.shape[0])
            ]
        )

    def prompts(self, prepared: Sequence[Prepared], prompts: Sequence[str]) -> list[str]:
        """The prompts the UNet gets: `prompts` as they are, or with a tagger the reference's
        "<tags of the working image>, <prompt>,"."""
        if self.tagger is None:
            return list(prompts)
        tags = self.tagger([(p.lq + 1) / 2 for p in prepared])
        return [build_prompt(t, prompt) for t, prompt in zip(tags, prompts)]

    def super_resolve(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[np.ndarray]:
        """uint8 (H, W, 3) images -> uint8 (SH, SW, 3) (S = settings.scale), batched by padded shape."""
        return self.super_resolve_with_prompts(images, prompts)[0]

    def super_resolve_with_prompts(
        self, images: Sequence[np.ndarray], prompts: Sequence[str]
    ) -> tuple[list[np.ndarray], list[str]]:
        """`super_resolve`, and the prompt each image was run with (see `prompts`)."""
        s = self.settings
        prepared = [prepare(im, s.process_size, s.scale) for im in images]
        outputs: list[np.ndarray | None] = [None] * len(images)
        used = list(prompts)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            by_shape.setdefault(padded_shape(p.bucket_shape, s.bucket), []).append(i)
        for shape, indices in by_shape.items():
            for chunk in self._batches(indices):
                filled = _filled(chunk, s.batch_size)
                lq = np.stack([pad_to(prepared[i].lq, shape) for i in filled])
                batch_prompts = self.prompts([prepared[i] for i in filled], [prompts[i] for i in filled])
                sr = np.asarray(self(lq, batch_prompts, [s.timestep] * len(filled)))
                for j, i in enumerate(chunk):
                    outputs[i], used[i] = finish(sr[j], prepared[i], s.color_fix), batch_prompts[j]
        return outputs, used

    def sweep(self, image: np.ndarray, prompt: str, timesteps: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """One image at every timestep of `timesteps` -> (timestep, uint8 output) in that order, as they come.

        `batch_size` timesteps go in one call: the program (and compile) of a normal run of that image, since the
        timestep is an argument of it, not a constant. (A call with every timestep at once compiled a program of
        its own, ran slower on a CPU than the calls one by one, and gave no progress until it ended.)
        """
        s = self.settings
        p = prepare(image, s.process_size, s.scale)
        lq = pad_to(p.lq, padded_shape(p.bucket_shape, s.bucket))
        prompt = self.prompts([p], [prompt])[0]
        for chunk in self._batches(list(timesteps)):
            filled = _filled(chunk, s.batch_size)
            sr = np.asarray(self(np.stack([lq] * len(filled)), [prompt] * len(filled), filled))
            for t, x in zip(chunk, sr):
                yield t, finish(x, p, s.color_fix)

    def _batches(self, items: list) -> Iterator[list]:
        size = self.settings.batch_size
        return (items[start : start + size] for start in range(0, len(items), size))


def _filled(chunk: list, size: int) -> list:
    """`chunk` with its last item repeated up to `size`: a short last batch uses the full batch's program."""
    return chunk + [chunk[-1]] * (size - len(chunk))
