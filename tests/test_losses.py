"""TADSR's losses (docs/method.md 3.2) against a PyTorch re-statement of the reference math.

Every comparison feeds identical inputs, weights and noise to both sides and checks values and gradients:
Blur_t (torchvision GaussianBlur semantics, re-stated with torch ops since torchvision is not installed),
the timestep rules, CFG, the DMD surrogate, TA-VSD and the fake-score loss end to end on a tiny UNet
(diffusers on the torch side), and the L2 part of the generator loss.

The fake score's LoRA is applied on the torch side *unmerged*, as explicit factors added by forward hooks
(`out + 2 * B(A(x))` on the 16 mid-block modules), so the same torch tensors serve as the TA-VSD fake score
and give exact autograd gradients w.r.t. the LoRA factors for the fake-score loss.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDPMScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from torch_utils import nchw_to_nhwc, nhwc_to_nchw, randomize_, rel_err

from configs import tadsr_sd21
from tadsr_jax import prng
from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.method import losses, tadsr
from tadsr_jax.method.tadsr import FAKE_SCORE, GENERATOR, TADSR, GeneratorLoRA, GeneratorParam, LossConfig
from tadsr_jax.nn import lora
from tadsr_jax.weights.loaders import load_text_encoder, load_unet, load_vae

# Spec text (docs/method.md 3.2): the generator timesteps int(linspace(1, 999, 50)).
SPEC_T_LIST = [
    1,
    21,
    41,
    62,
    82,
    102,
    123,
    143,
    163,
    184,
    204,
    225,
    245,
    265,
    286,
    306,
    326,
    347,
    367,
    387,
    408,
    428,
    449,
    469,
    489,
    510,
    530,
    550,
    571,
    591,
    612,
    632,
    652,
    673,
    693,
    713,
    734,
    754,
    774,
    795,
    815,
    836,
    856,
    876,
    897,
    917,
    937,
    958,
    978,
    999,
]
BLUR_T = np.array([1, 199, 200, 450, 650, 999])  # kernel sizes 5, 5, 9, 13, 17, 21

# One level, so XLA compiles the UNet's backward in seconds; the cross-attention mid block is where the fake
# score's LoRA lives (16 modules: 2 resnets x 2 convs, proj_in/out, 2 x 4 attention projections, 2 ff layers).
TINY_UNET = {
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (16,),
    "cross_attention_dim": 16,
    "down_block_types": ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",),
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
TINY_VAE = {
    "block_out_channels": (16,),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
}
TINY_TEXT = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 12,
    "hidden_act": "gelu",
    "bos_token_id": 62,
    "eos_token_id": 63,
    "pad_token_id": 63,
}
LORA_SCALE = 8.0 / 4  # PEFT alpha / rank with TADSR's rank 4, alpha 8 (docs/method.md 2.2)
FAKE = "fake_others"


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


# ---------------------------------------------------------------------------------------------------------
# Torch re-statements of the reference math
# ---------------------------------------------------------------------------------------------------------


def torch_kernel1d(k: int, sigma: float) -> torch.Tensor:
    """torchvision's _get_gaussian_kernel1d."""
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    pdf = torch.exp(-(x**2) / (2 * sigma**2))
    return pdf / pdf.sum()


def torch_gaussian_blur(img: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """torchvision GaussianBlur(k, sigma) on NCHW: 2-D outer-product kernel, reflect pad k//2, depthwise conv."""
    k1 = torch_kernel1d(k, sigma)
    kernel = (k1[:, None] * k1[None, :]).expand(img.shape[1], 1, k, k)
    return F.conv2d(F.pad(img, [k // 2] * 4, mode="reflect"), kernel, groups=img.shape[1])


def torch_blur_t(images: torch.Tensor, ts) -> torch.Tensor:
    """TADSR's Blur_t per sample: k = 5 + 4 floor(t/200), sigma = 1 + t/200."""
    return torch.cat(
        [torch_gaussian_blur(images[i : i + 1], 5 + 4 * (int(t) // 200), 1 + int(t) / 200) for i, t in enumerate(ts)]
    )


def torch_dmd(x0: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """The reference's distribution_matching_loss given x0 (requiring grad) and the no-grad predictions."""
    lam = (x0 - x0_real).abs().mean(dim=[1, 2, 3], keepdim=True)
    g = (x0_fake - x0_real) / lam
    return F.mse_loss(x0, (x0 - g).detach())


# ---------------------------------------------------------------------------------------------------------
# 1. Blur_t and the blurred L2
# ---------------------------------------------------------------------------------------------------------


def test_blur_taps_are_torchvision_kernels():
    taps = np.asarray(losses.blur_taps(jnp.asarray(BLUR_T)))
    assert taps.shape == (len(BLUR_T), losses.MAX_BLUR_TAPS)
    sizes = []
    for row, t in zip(taps, BLUR_T):
        k = 5 + 4 * (t // 200)
        sizes.append(k)
        ref = np.zeros(21)
        ref[10 - k // 2 : 10 + k // 2 + 1] = torch_kernel1d(k, 1 + t / 200).numpy()
        err = np.abs(row - ref).max()
        print(f"\nblur taps t={t} (k={k}): max abs err {err:.1e}")
        assert err <= 1e-6  # measured 3e-8 (taps <= 1 rounded to float32): 30x; a wrong sigma errs by >= 1e-3
    assert sizes == [5, 5, 9, 13, 17, 21]
    np.testing.assert_array_equal(losses.blur_kernel_size(jnp.asarray(BLUR_T)), sizes)


blur = jax.jit(losses.timestep_blur)
mse_value_and_grad = jax.jit(jax.value_and_grad(losses.blurred_mse))


def test_timestep_blur_matches_torchvision_per_sample():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (len(BLUR_T), 24, 40, 3)).astype(np.float32)  # non-square
    ours = np.asarray(blur(jnp.asarray(images), jnp.asarray(BLUR_T)))
    ref = nchw_to_nhwc(torch_blur_t(_t(nhwc_to_nchw(images)), BLUR_T))
    err = np.abs(ours - ref).max()
    print(f"\ntimestep_blur 24x40: max abs err {err:.1e}")
    # measured 2.4e-7 (2 ulps of the [-1, 1] pixels; summation orders differ): ~20x; a wrong kernel errs by 1e-2
    assert err <= 5e-6
    # each sample got its own kernel: the blur strength differs clearly between t = 1 and t = 999
    assert np.abs(ref[0] - ref[-1]).max() > 0.1


def test_blurred_mse_value_and_gradient_match_torch():
    rng = np.random.default_rng(1)
    t = np.array([1, 450, 999, 200])
    pred = rng.uniform(-1, 1, (4, 24, 40, 3)).astype(np.float32)
    target = rng.uniform(-1, 1, (4, 24, 40, 3)).astype(np.float32)
    value, grad = mse_value_and_grad(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(t))

    x = _t(nhwc_to_nchw(pred)).requires_grad_()
    ref = ((torch_blur_t(x, t) - torch_blur_t(_t(nhwc_to_nchw(target)), t)) ** 2).mean()
    ref.backward()
    value_err = abs(float(value) - ref.item()) / ref.item()
    grad_err = rel_err(nhwc_to_nchw(grad), x.grad.numpy())
    print(f"\nblurred_mse: value rel err {value_err:.1e}, grad rel err {grad_err:.1e}")
    # measured up to 4.5e-6 (float32 means over ~12k terms in two orders): ~10x; a wrong kernel or mean gives 1e-2
    assert value_err <= 5e-5 and grad_err <= 5e-5


# ---------------------------------------------------------------------------------------------------------
# 2. Timesteps, guidance scale, CFG
# ---------------------------------------------------------------------------------------------------------


def test_student_teacher_timesteps_and_guidance_scale():
    paper = tadsr_sd21.get_config()
    ts = losses.student_timesteps(paper.train.num_student_timesteps, paper.train.max_student_timestep)
    np.testing.assert_array_equal(ts, np.linspace(1, 999, 50).astype(int))
    assert ts.tolist() == SPEC_T_LIST
    from tadsr_jax.train.step import sample_student_timesteps

    drawn = np.asarray(sample_student_timesteps(jax.random.key(0), 4096, "list", 50, max_timestep=999))
    assert set(drawn.tolist()) == set(SPEC_T_LIST)
    capped = np.asarray(sample_student_timesteps(jax.random.key(0), 4096, "list", 50, max_timestep=200))
    assert set(capped.tolist()) == set(np.linspace(1, 200, 50).astype(int).tolist())
    uniform = np.asarray(sample_student_timesteps(jax.random.key(0), 4096, "uniform", 50, max_timestep=200))
    assert uniform.min() == 1 and uniform.max() == 200
    with pytest.raises(ValueError, match="max_student_timestep"):
        sample_student_timesteps(jax.random.key(0), 4, "list", 50, max_timestep=1000)

    t = np.arange(1000)
    paper_t = losses.teacher_timestep(jnp.asarray(t), paper.loss.teacher_scale, paper.loss.teacher_shift)
    np.testing.assert_array_equal(paper_t, np.floor(0.5 * t).astype(int))
    np.testing.assert_array_equal(
        losses.teacher_timestep(jnp.asarray(t), 0.5, 3.0), np.floor(0.5 * t + 3.0).astype(int)
    )  # gamma shift
    np.testing.assert_array_equal(losses.teacher_timestep(jnp.asarray(t), 0.3, 0.0), np.floor(0.3 * t).astype(int))

    t_r = np.arange(500)
    w = np.asarray(losses.guidance_scale(jnp.asarray(t_r), paper.loss.cfg_base, paper.loss.cfg_per_step), np.float64)
    err = np.abs(w - (7.5 + t_r / 200)).max()
    print(f"\nguidance_scale: max abs err {err:.1e}")
    # float32 w in [7.5, 10): an ulp is 9.5e-7 and two roundings stay below 1.5 ulps; measured 6.1e-7 over every
    # t_r, so 1e-5 is 16x above; a wrong slope or offset errs by >= 5e-3. 7.5 + 0 / 200 is exact in any order.
    assert err <= 1e-5 and w[0] == 7.5 and abs(w[-1] - 9.995) <= 1e-5


def test_classifier_free_guidance_matches_torch():
    rng = np.random.default_rng(2)
    eps_u, eps_c = (rng.standard_normal((3, 8, 6, 4)).astype(np.float32) for _ in range(2))
    t_r = np.array([0, 250, 499])
    loss = tadsr_sd21.get_config().loss
    ours = losses.classifier_free_guidance(
        jnp.asarray(eps_u),
        jnp.asarray(eps_c),
        losses.guidance_scale(jnp.asarray(t_r), loss.cfg_base, loss.cfg_per_step),
    )
    u, c = _t(nhwc_to_nchw(eps_u)), _t(nhwc_to_nchw(eps_c))
    w = (7.5 + torch.from_numpy(t_r) / 200).float().view(-1, 1, 1, 1)
    ref = u + w * (c - u)
    err = rel_err(nhwc_to_nchw(ours), ref.numpy())
    print(f"\nCFG: rel err {err:.1e}")
    # measured 0 here (the same three float32 operations), but a fused multiply-add on another CPU moves an output
    # (up to ~50, std ~12) by an ulp, 3e-7 of the std: 30x below; a wrong guidance scale errs by >= 1e-2
    assert err <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# 3. The DMD surrogate
# ---------------------------------------------------------------------------------------------------------

dmd_value_and_grads = jax.jit(jax.value_and_grad(losses.distribution_matching_loss, argnums=(0, 1, 2)))


def test_distribution_matching_loss_value_and_gradient():
    rng = np.random.default_rng(3)
    shape = (3, 8, 12, 4)
    scale = np.array([0.5, 1.0, 3.0], np.float32).reshape(-1, 1, 1, 1)  # different per-sample weights
    x0 = rng.standard_normal(shape).astype(np.float32) * scale
    x0_fake = x0 + 0.3 * rng.standard_normal(shape).astype(np.float32)
    x0_real = x0 + scale * rng.standard_normal(shape).astype(np.float32)
    value, (grad, grad_fake, grad_real) = dmd_value_and_grads(
        jnp.asarray(x0), jnp.asarray(x0_fake), jnp.asarray(x0_real)
    )

    x = _t(nhwc_to_nchw(x0)).requires_grad_()
    ref = torch_dmd(x, _t(nhwc_to_nchw(x0_fake)), _t(nhwc_to_nchw(x0_real)))
    ref.backward()
    value_err = abs(float(value) - ref.item()) / ref.item()
    grad_err = rel_err(nhwc_to_nchw(grad), x.grad.numpy())
    # the closed forms: value mean(g^2), gradient 2 g / N
    lam = np.abs(x0 - x0_real).mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    g = (x0_fake - x0_real) / lam
    closed_value_err = abs(float(value) - np.mean(g**2)) / np.mean(g**2)
    closed_grad_err = rel_err(grad, 2 * g / g.size)
    print(
        f"\nDMD: value rel err {value_err:.1e} (closed form {closed_value_err:.1e}), "
        f"grad rel err {grad_err:.1e} (closed form {closed_grad_err:.1e})"
    )
    # measured up to 2.7e-6 (float32 per-sample means of |x0 - x0_real| in another order): ~20x; a wrong lambda or
    # a missing stop-gradient gives errors of order 1
    assert value_err <= 5e-5 and grad_err <= 5e-5
    assert closed_value_err <= 5e-5 and closed_grad_err <= 5e-5
    # the fake and real predictions are targets: no gradient reaches them
    assert not np.any(np.asarray(grad_fake)) and not np.any(np.asarray(grad_real))


# ---------------------------------------------------------------------------------------------------------
# Tiny model: JAX TADSR and the same UNet in diffusers
# ---------------------------------------------------------------------------------------------------------


class TorchFakeScore:
    """The fake score's LoRA on a diffusers UNet, unmerged: forward hooks add LORA_SCALE * B(A(x))."""

    def __init__(self, torch_unet: TorchUNet, model: TADSR):
        self.enabled = False
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, host in lora.lora_hosts(model.unet).items():
            if FAKE not in host.lora:
                continue
            adapter = host.lora[FAKE]
            assert adapter.scale == LORA_SCALE
            module = torch_unet.get_submodule(name)
            if isinstance(module, torch.nn.Conv2d):
                a = _t(adapter.a[...]).permute(3, 2, 0, 1)  # (kh, kw, in, r) -> (r, in, kh, kw)
                b = _t(adapter.b[...]).T[:, :, None, None]  # (r, out) -> (out, r, 1, 1)
            else:
                assert isinstance(module, torch.nn.Linear), name
                a, b = _t(adapter.a[...]).T, _t(adapter.b[...]).T  # (r, in), (out, r)
            a.requires_grad_(), b.requires_grad_()
            self.factors[name] = (a, b)
            module.register_forward_hook(self._hook(a, b))

    def _hook(self, a, b):
        def hook(module, inputs, out):
            if not self.enabled:
                return None
            x = inputs[0]
            if isinstance(module, torch.nn.Conv2d):
                delta = F.conv2d(F.conv2d(x, a, None, module.stride, module.padding), b)
            else:
                delta = F.linear(F.linear(x, a), b)
            return out + LORA_SCALE * delta

        return hook

    @contextlib.contextmanager
    def active(self):
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False

    def zero_grad(self):
        for a, b in self.factors.values():
            a.grad = b.grad = None


@contextlib.contextmanager
def numpy_normal(seed: int):
    """`prng.normal` drawing from numpy: the LoRA A initialisation (tested in test_lora.py) only needs to be
    random here, and this avoids compiling one JAX sampler per factor shape (~half a second each on CPU)."""
    original, rng = prng.normal, np.random.default_rng(seed)
    prng.normal = lambda key, shape, dtype=jnp.float32: jnp.asarray(rng.standard_normal(shape), dtype)
    try:
        yield
    finally:
        prng.normal = original


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    # Every UNet tensor random (norms and zero-initialised layers included), written by diffusers itself.
    torch_unet = randomize_(TorchUNet(**TINY_UNET), seed=5)
    torch_unet.save_pretrained(folder / "unet")
    TorchVAE(**TINY_VAE).save_pretrained(folder / "vae")  # stock VAE: its encoder gets the time layers on load
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)).save_pretrained(folder / "text_encoder")
    with numpy_normal(seed=0):
        model = TADSR(
            load_unet(str(folder / "unet")),
            load_vae(str(folder / "vae"), time_aware=True),
            load_text_encoder(str(folder / "text_encoder")),
            None,
            rngs=nnx.Rngs(0),
        )

    rng = np.random.default_rng(4)
    hosts = {n: h for n, h in lora.lora_hosts(model.unet).items() if FAKE in h.lora}
    assert len(hosts) == 16 and all(n.startswith("mid_block.") for n in hosts)
    for host in hosts.values():  # B starts at zero, which would hide the fake score's LoRA path
        b = host.lora[FAKE].b
        b[...] = jnp.asarray(0.3 * rng.standard_normal(b[...].shape), jnp.float32)
    # The time-aware encoder starts with zero time projections, which would block every gradient to its time MLP.
    for _, module in nnx.iter_modules(model.vae.encoder):
        proj = getattr(module, "time_emb_proj", None)
        if proj is not None:
            proj.kernel[...] = jnp.asarray(0.05 * rng.standard_normal(proj.kernel[...].shape), jnp.float32)

    # The schedule on each side from its own definition: diffusers' DDPMScheduler (float32) and ours.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    return {
        "model": model,
        "schedule": NoiseSchedule.stable_diffusion(),
        "torch_unet": torch_unet,
        "fake": TorchFakeScore(torch_unet, model),
        "alphas_cumprod": scheduler.alphas_cumprod.float(),
    }


@contextlib.contextmanager
def fixed_normal(noise: np.ndarray):
    """Make `prng.normal` (the losses' noise draws) return `noise`."""
    original = prng.normal
    calls = []

    def normal(key, shape, dtype=jnp.float32):
        assert tuple(shape) == noise.shape and dtype == jnp.float32, (shape, dtype)
        calls.append(shape)
        return jnp.asarray(noise, dtype)

    prng.normal = normal
    try:
        yield calls
    finally:
        prng.normal = original


def _latent_inputs(seed: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, 8, 12, 4)).astype(np.float32)  # generator latent, non-square
    noise = rng.standard_normal((batch, 8, 12, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 12, 16)).astype(np.float32)
    neg_context = rng.standard_normal((1, 12, 16)).astype(np.float32)
    return x0, noise, context, neg_context


# ---------------------------------------------------------------------------------------------------------
# 4. TA-VSD end to end
# ---------------------------------------------------------------------------------------------------------


@nnx.jit
def ta_vsd_value_and_grad(model, schedule, x0, context, neg_context, student_t, key):
    loss_config = LossConfig(**tadsr_sd21.get_config().loss.to_dict())
    fn = lambda m, x: tadsr._ta_vsd(m, schedule, x, context, neg_context, student_t, key, loss_config)
    return nnx.value_and_grad(fn, argnums=1)(model, x0)


def torch_ta_vsd(tiny, x0, t_g, noise, c_pos, c_neg):
    """docs/method.md 3.2 DMD/TA-VSD: returns (loss, d loss / d x0, eps_fake, eps_cond) in NCHW."""
    unet, fake, ac = tiny["torch_unet"], tiny["fake"], tiny["alphas_cumprod"]
    x0 = x0.clone().requires_grad_()
    t_r = torch.floor(0.5 * t_g).long()
    a = ac[t_r].view(-1, 1, 1, 1)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        with fake.active():
            eps_fake = unet(z_t, t_r, c_pos).sample
        x0_fake = (z_t - (1 - a).sqrt() * eps_fake) / a.sqrt()
        both = unet(torch.cat([z_t, z_t]), torch.cat([t_r, t_r]), torch.cat([c_neg.expand_as(c_pos), c_pos])).sample
        eps_u, eps_c = both.chunk(2)
        w = (7.5 + t_r / 200).view(-1, 1, 1, 1)
        eps_real = eps_u + w * (eps_c - eps_u)
        x0_real = (z_t - (1 - a).sqrt() * eps_real) / a.sqrt()
    loss = torch_dmd(x0, x0_fake, x0_real)
    loss.backward()
    return loss.item(), x0.grad.numpy(), eps_fake, eps_c


def test_ta_vsd_matches_torch(tiny):
    x0, noise, context, neg_context = _latent_inputs(seed=6)
    t_g = np.array([131, 871])  # odd: t_r = floor(0.5 t) = 65, 435
    with fixed_normal(noise) as calls:
        value, grad = ta_vsd_value_and_grad(
            tiny["model"],
            tiny["schedule"],
            jnp.asarray(x0),
            jnp.asarray(context),
            jnp.asarray(neg_context),
            jnp.asarray(t_g),
            jax.random.key(0),
        )
    assert len(calls) == 1

    ref, ref_grad, eps_fake, eps_cond = torch_ta_vsd(
        tiny, _t(nhwc_to_nchw(x0)), torch.from_numpy(t_g), _t(nhwc_to_nchw(noise)), _t(context), _t(neg_context)
    )
    value_err = abs(float(value) - ref) / ref
    grad_err = rel_err(nhwc_to_nchw(grad), ref_grad)
    print(f"\nTA-VSD: value {ref:.4g}, rel err {value_err:.1e}; grad rel err {grad_err:.1e}")
    # measured value up to 5.0e-7, gradient 9.8e-6 and 2.0e-5 (2 seeds; float32 UNet passes, forward and backward, in
    # two orders), so 25x below; the wrong adapter moves eps by > 0.1 (asserted below)
    assert value_err <= 5e-4 and grad_err <= 5e-4
    # the fake score's LoRA is not negligible, so a wrong adapter choice would fail above
    assert rel_err(eps_fake.numpy(), eps_cond.numpy()) > 0.1


# ---------------------------------------------------------------------------------------------------------
# 5. Fake-score diffusion loss
# ---------------------------------------------------------------------------------------------------------


@nnx.jit
def fake_loss_value_and_grad(model, schedule, x0, context, key):
    fn = lambda m: tadsr.fake_score_loss(m, schedule, x0, context, key)
    return nnx.value_and_grad(fn, argnums=nnx.DiffState(0, FAKE_SCORE))(model)


def test_fake_score_loss_matches_torch(tiny, monkeypatch):
    """Value, and gradients w.r.t. every fake-score LoRA factor (A and B) against torch autograd."""
    x0, noise, context, _ = _latent_inputs(seed=7)
    t = np.array([37, 912])
    randint_calls = []

    def randint(key, shape, minval, maxval, *args, **kwargs):
        randint_calls.append((tuple(shape), minval, maxval))
        return jnp.asarray(t, jnp.int32)

    monkeypatch.setattr(jax.random, "randint", randint)
    with fixed_normal(noise) as calls:
        value, grads = fake_loss_value_and_grad(
            tiny["model"], tiny["schedule"], jnp.asarray(x0), jnp.asarray(context), jax.random.key(1)
        )
    monkeypatch.undo()
    assert len(calls) == 1 and randint_calls == [((2,), 0, 1000)]  # t ~ U{0, ..., 999} per sample

    unet, fake, ac = tiny["torch_unet"], tiny["fake"], tiny["alphas_cumprod"]
    fake.zero_grad()
    tt = torch.from_numpy(t)
    a = ac[tt].view(-1, 1, 1, 1)
    eps = _t(nhwc_to_nchw(noise))
    z_t = a.sqrt() * _t(nhwc_to_nchw(x0)) + (1 - a).sqrt() * eps
    with fake.active():
        ref = F.mse_loss(unet(z_t, tt, _t(context)).sample, eps)
    ref.backward()
    value_err = abs(float(value) - ref.item()) / ref.item()

    ours, theirs, seen = [], [], set()
    for path, leaf in nnx.to_flat_state(grads):
        *module_path, lora_key, adapter, factor = path
        assert (module_path[0], lora_key, adapter) == ("unet", "lora", FAKE), path
        name = lora.module_name(module_path[1:])
        g = np.asarray(leaf[...])
        a_t, b_t = fake.factors[name]
        ref_g = (a_t if factor == "a" else b_t).grad
        if ref_g.ndim == 4:  # conv: A (r, in, kh, kw) -> (kh, kw, in, r); B (out, r, 1, 1) -> (r, out)
            ref_g = ref_g.permute(2, 3, 1, 0) if factor == "a" else ref_g[:, :, 0, 0].T
        else:  # linear: (r, in) -> (in, r); (out, r) -> (r, out)
            ref_g = ref_g.T
        ours.append(g.ravel())
        theirs.append(ref_g.numpy().ravel())
        seen.add((name, factor))
    assert seen == {(n, f) for n in fake.factors for f in "ab"}
    per_tensor = max(rel_err(o, r) for o, r in zip(ours, theirs))
    assert all(np.any(o) for o in ours)  # every factor of every module gets a gradient
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    overall, l2 = rel_err(ours, theirs), np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    print(
        f"\nfake-score loss: value {ref.item():.4g}, rel err {value_err:.1e}; LoRA grads (A and B, "
        f"{len(seen)} tensors): max err / std {overall:.1e} overall, {per_tensor:.1e} worst tensor; "
        f"relative L2 error {l2:.1e}"
    )
    # Gradients come out of a float32 backward pass through the UNet, whose different summation orders give
    # max errors of ~1e-4 of the spread (measured over 2 seeds: value 3.2e-7, overall 1.3e-4, worst tensor 1.1e-4,
    # L2 1.0e-5), so these bounds are 15-30x above; a wrong factor layout, scale or adapter gives errors of order 1.
    assert value_err <= 1e-5 and overall <= 2e-3 and per_tensor <= 2e-3 and l2 <= 2e-4


# ---------------------------------------------------------------------------------------------------------
# 6. Generator loss, L2 part
# ---------------------------------------------------------------------------------------------------------


@nnx.jit
def generator_value_and_grad(model, schedule, batch, neg_context, student_t, key):
    fn = lambda m: tadsr.generator_loss(
        m,
        schedule,
        batch,
        neg_context,
        student_t,
        key,
        LossConfig(**{**tadsr_sd21.get_config().loss.to_dict(), "lpips": 0.0, "vsd": 0.0}),
    )
    return nnx.value_and_grad(fn, argnums=nnx.DiffState(0, GENERATOR), has_aux=True)(model)


@pytest.mark.slow  # compiles the generator's gradient
def test_generator_l2_loss_and_gradients(tiny):
    model = tiny["model"]
    rng = np.random.default_rng(8)
    batch = {
        "lq": jnp.asarray(rng.uniform(-1, 1, (2, 16, 24, 3)), jnp.float32),
        "hq": jnp.asarray(rng.uniform(-1, 1, (2, 16, 24, 3)), jnp.float32),
        "input_ids": jnp.asarray(rng.integers(0, TINY_TEXT["vocab_size"], (2, 12)), jnp.int32),
    }
    neg_context = jnp.asarray(rng.standard_normal((1, 12, 16)), jnp.float32)  # unused: the VSD weight is 0
    t = jnp.asarray([82, 958])
    (total, out), grads = generator_value_and_grad(model, tiny["schedule"], batch, neg_context, t, jax.random.key(2))
    assert set(out.losses) == {"l2"}
    assert np.mean(np.abs(np.asarray(out.images)) < 1) > 0.5  # the decoder's output is mostly unclipped
    ref = losses.blurred_mse(out.images, batch["hq"], t)
    err = abs(float(total) - float(ref)) / float(ref)
    print(f"\ngenerator L2: {float(total):.4g}, rel err vs blurred_mse(images) {err:.1e}")
    # Inside the jitted step XLA fuses and reorders the float32 mean over ~2.3k blurred pixels; outside it runs
    # unfused, so the two sums differ by a few ulps (measured 1.0e-6); a wrong term would differ by O(1).
    assert err <= 1e-5

    kinds = {"lora_b": 0, "time": 0, "conv_in": 0}
    for path, leaf in nnx.to_flat_state(grads):
        g = np.asarray(leaf[...])
        assert np.all(np.isfinite(g)), path
        name = ".".join(map(str, path))
        if isinstance(leaf, GeneratorLoRA) and path[-1] == "b":
            kind = "lora_b"
        elif isinstance(leaf, GeneratorParam) and "time" in name:
            kind = "time"
        elif isinstance(leaf, GeneratorParam) and path[0] == "student_conv_in":
            kind = "conv_in"
        else:
            continue
        assert np.any(g != 0), f"zero gradient for {name}"
        kinds[kind] += 1
    print(f"non-zero gradients: {kinds}")
    n_time = sum(1 for p, v in nnx.to_flat_state(nnx.state(model, GeneratorParam)) if "time" in ".".join(map(str, p)))
    assert kinds["time"] == n_time > 0 and kinds["conv_in"] == 2
    assert kinds["lora_b"] == len(nnx.to_flat_state(nnx.state(model, GeneratorLoRA))) // 2
