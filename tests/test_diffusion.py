"""DDPM schedule and x0 rules (tadsr_jax.diffusion, docs/method.md sections 0 and 3.2) against diffusers'
DDPMScheduler and the formulas re-stated in torch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch_utils import nchw_to_nhwc, nhwc_to_nchw, rel_err

from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.loaders import load_schedule

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LINEAR_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
T = torch.tensor([0, 500, 999])  # per-sample timesteps, both ends included
# diffusers accumulates alphas_cumprod in float32: over 1000 products it drifts up to 9.3e-7 (relative) from the
# float64 product, ours (float64, then rounded) stays within 6e-8. Ours vs diffusers measured 9.5e-7 (SD), 3.8e-7
# (linear): ~10x below this bound. An off-by-one in the cumprod or a wrong beta schedule errs by >= 1e-3.
SCHEDULE_TOL = 1e-5
# add_noise inherits that schedule difference plus one rounding per term: measured up to 9.6e-7 (100 seeds; a CI
# machine gave 1.01e-6), so ~20x below this bound; an off-by-one t errs by 6e-3 or more.
ADD_NOISE_TOL = 2e-5
# The x0 rules divide by sqrt(alphas_cumprod[t]) (0.068 at t=999), which amplifies that noise ~15x: measured up to
# 2.1e-6 (100 seeds), ~14x below this bound; an off-by-one t or a missing sqrt gives errors of 1e-3 or more.
X0_TOL = 3e-5


def _max_rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    return float(np.abs(ours / theirs - 1).max())


def _latents(seed: int, shape=(3, 4, 8, 6)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_stable_diffusion_schedule_matches_diffusers():
    ours = NoiseSchedule.stable_diffusion()
    theirs = DDPMScheduler(**SD_CONFIG).alphas_cumprod.numpy()
    assert ours.num_timesteps == 1000 and ours.alphas_cumprod.dtype == jnp.float32
    assert _max_rel(ours.alphas_cumprod, theirs) <= SCHEDULE_TOL


@pytest.mark.parametrize(
    "config",
    [SD_CONFIG, LINEAR_CONFIG, dict(LINEAR_CONFIG, num_train_timesteps=500)],
    ids=["scaled_linear", "linear", "linear_500"],
)
def test_from_config_matches_diffusers(config):
    ours = NoiseSchedule.from_config(dict(config, prediction_type="epsilon", steps_offset=1))  # extra keys ignored
    theirs = DDPMScheduler(**config).alphas_cumprod.numpy()
    assert _max_rel(ours.alphas_cumprod, theirs) <= SCHEDULE_TOL


def test_from_config_rejects_unsupported_beta_schedule():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        NoiseSchedule.from_config(dict(SD_CONFIG, beta_schedule="squaredcos_cap_v2"))


def test_add_noise_matches_diffusers_per_sample():
    scheduler = DDPMScheduler(**SD_CONFIG)
    x0, noise = _latents(0), _latents(1)
    theirs = scheduler.add_noise(x0, noise, T).numpy()
    ours = NoiseSchedule.stable_diffusion().add_noise(
        jnp.asarray(nchw_to_nhwc(x0)), jnp.asarray(nchw_to_nhwc(noise)), jnp.asarray(T.numpy())
    )
    assert rel_err(nhwc_to_nchw(ours), theirs) <= ADD_NOISE_TOL
    for i in range(len(T)):  # each sample uses its own timestep: t=0 is almost x0, t=999 almost noise
        assert rel_err(nhwc_to_nchw(ours)[i], theirs[i]) <= ADD_NOISE_TOL


def test_eps_to_x0_inverts_add_noise_and_matches_torch():
    schedule = NoiseSchedule.stable_diffusion()
    x0, eps = _latents(2), _latents(3)
    t = jnp.asarray(T.numpy())
    z = schedule.add_noise(jnp.asarray(nchw_to_nhwc(x0)), jnp.asarray(nchw_to_nhwc(eps)), t)
    recovered = schedule.eps_to_x0(z, jnp.asarray(nchw_to_nhwc(eps)), t)
    for i in range(len(T)):
        assert rel_err(nhwc_to_nchw(recovered)[i], x0[i].numpy()) <= X0_TOL, int(T[i])

    a = DDPMScheduler(**SD_CONFIG).alphas_cumprod[T].view(-1, 1, 1, 1)
    z_t = torch.tensor(nhwc_to_nchw(z))
    theirs = ((z_t - (1 - a).sqrt() * eps) / a.sqrt()).numpy()
    for i in range(len(T)):
        assert rel_err(nhwc_to_nchw(recovered)[i], theirs[i]) <= X0_TOL, int(T[i])


def test_student_x0_matches_torch():
    z_lq, residual = _latents(4), _latents(5)
    t = torch.tensor([1, 500, 999])
    a = DDPMScheduler(**SD_CONFIG).alphas_cumprod[t].view(-1, 1, 1, 1)
    theirs = (z_lq / a.sqrt() - residual).numpy()
    ours = NoiseSchedule.stable_diffusion().student_x0(
        jnp.asarray(nchw_to_nhwc(z_lq)), jnp.asarray(nchw_to_nhwc(residual)), jnp.asarray(t.numpy())
    )
    for i in range(len(t)):
        assert rel_err(nhwc_to_nchw(ours)[i], theirs[i]) <= X0_TOL, int(t[i])


@pytest.mark.parametrize("config", [SD_CONFIG, LINEAR_CONFIG], ids=["scaled_linear", "linear"])
def test_load_schedule_reads_diffusers_folder(tmp_path, config):
    scheduler = DDPMScheduler(**config)
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    ours = load_schedule(str(tmp_path))
    assert _max_rel(ours.alphas_cumprod, scheduler.alphas_cumprod.numpy()) <= SCHEDULE_TOL


def test_load_schedule_errors(tmp_path):
    with pytest.raises(WeightsError, match="scheduler_config.json"):
        load_schedule(str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(SD_CONFIG, beta_schedule="squaredcos_cap_v2")))
    with pytest.raises(WeightsError, match="squaredcos_cap_v2"):
        load_schedule(str(tmp_path))
