"""Defaults shared by every experiment config (configs/*.py start from `base_config()` and override)."""

import ml_collections

from tadsr_jax.data.pipeline import data_config
from tadsr_jax.parallel import mesh_config

# The reference's negative prompt for the teacher's classifier-free guidance (docs/method.md 3.1).
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
    "jpeg artifacts, deformed, lowres, over-smooth"
)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 123

    config.model = ml_collections.ConfigDict()
    # An SD-style folder (unet/, time_vae/ or vae/, text_encoder/, tokenizer/, scheduler/). Empty: write a
    # random-weight model of the architectures below into <workdir>/random_sd once and use that.
    config.model.pretrained = ""
    config.model.dtype = "float32"  # or "bfloat16": the frozen networks' weights and activations (LPIPS too)
    config.model.unet = ml_collections.ConfigDict()
    config.model.vae = ml_collections.ConfigDict()
    config.model.text_encoder = ml_collections.ConfigDict()
    # Fine-tuning: start the generator (LoRA factors, student conv_in, VAE time layers) from the reference's
    # tadsr.pkl, our .safetensors export (launch/convert.py --what=generator) or a training workdir's checkpoint,
    # with fresh optimizer states at step 0. Empty: fresh adapters. A workdir with checkpoints resumes its own.
    config.model.init_generator = ""
    config.model.lora_rank = 4
    config.model.lora_alpha = 8.0
    # The reference's fake score effectively trains only its mid-block LoRA; ("encoder", "decoder", "others")
    # gives it all three groups.
    config.model.fake_score_groups = ("others",)
    # Rematerialisation policies (tadsr_jax/nn/remat.py: none, full, dots, dots_no_batch): recompute each block's
    # activations in the backward pass instead of keeping them (memory for compute).
    config.model.remat = ml_collections.ConfigDict(dict(unet="none", vae_encoder="none", vae_decoder="none"))
    # Attention kernel (tadsr_jax/nn/attention.py): auto, blockwise, xla, cudnn, flash. "auto" picks the best of
    # the platform the step is compiled for (CPU: blockwise, TPU: Pallas flash, GPU: cuDNN for bf16).
    config.model.attention = "auto"

    config.lpips = ml_collections.ConfigDict()
    config.lpips.path = ""  # safetensors from `launch/convert.py --what=lpips`
    config.lpips.random_seed = -1  # >= 0: a seeded random VGG stand-in (offline tiny configs only)
    # DISTS weights (`launch/convert.py --what=dists`): validation (train.eval_every) then reports DISTS too; LPIPS
    # when lpips.path is set.
    config.dists = ml_collections.ConfigDict()
    config.dists.path = ""

    config.loss = ml_collections.ConfigDict()
    config.loss.l2 = 1.0
    config.loss.lpips = 2.0
    config.loss.vsd = 1.0
    config.loss.fake = 1.0
    config.loss.teacher_scale = 0.5  # TA-VSD lambda: t_teacher = floor(lambda * t + gamma)
    config.loss.teacher_shift = 0.0  # gamma
    config.loss.cfg_base = 7.5
    config.loss.cfg_per_step = 1.0 / 200.0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 100_000
    config.train.batch_size = 16  # global
    # Micro-batches per optimizer update (the reference's --gradient_accumulation_steps): each update's gradients
    # are the mean over batch_size images, computed accumulate_steps micro-batches at a time (less memory).
    config.train.accumulate_steps = 1
    config.train.lr = 5e-5
    # diffusers' get_scheduler kinds (the reference's --lr_scheduler): constant, constant_with_warmup, linear, cosine,
    # cosine_with_restarts, polynomial; counted in optimizer updates, decaying over train.steps.
    config.train.lr_schedule = "constant"
    config.train.warmup_steps = 0  # linear warmup from 0 (every kind but constant, as in diffusers)
    config.train.lr_num_cycles = 1  # cosine_with_restarts: hard restarts (cosine alone is one half cosine)
    config.train.lr_power = 1.0  # polynomial: the decay's power
    config.train.lr_end = 1e-7  # polynomial: the final learning rate (diffusers' default)
    config.train.b1 = 0.9
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.weight_decay = 1e-2
    config.train.max_grad_norm = 1.0
    config.train.student_timesteps = "list"  # "list": int(linspace(1, 999, 50)); "uniform": any of 1..999
    config.train.num_student_timesteps = 50
    config.train.max_student_timestep = 999  # lower: train only the fidelity end of the timestep knob
    config.train.negative_prompt = NEGATIVE_PROMPT
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.sample_every = 1000
    config.train.sample_timestep = 500
    config.train.eval_every = 0  # steps between validations on data.eval (and at the last step); 0: off
    config.train.eval_timesteps = ()  # student timesteps validated; empty: (sample_timestep,)

    config.data = data_config()
    config.mesh = mesh_config()

    # Inference (launch/sr.py; its flags override these). See tadsr_jax/infer/pipeline.py.
    config.sr = ml_collections.ConfigDict()
    config.sr.timestep = 500  # the fidelity (low) / realism (high) knob, 1..999
    config.sr.prompt = ""
    config.sr.sample_posterior = True  # the reference samples the VAE posterior (seeded here)
    config.sr.seed = 42
    config.sr.dtype = "float32"  # or "bfloat16" (GPU/TPU serving)
    # Output = scale x input, 1..8: the bicubic upscale in front of the model (the reference's --upscale; the model
    # works at the output resolution, and TADSR is trained and evaluated at 4).
    config.sr.scale = 4
    config.sr.process_size = 512  # short sides below process_size / scale are upscaled to it first
    config.sr.bucket = 64  # working images are padded to multiples of this (pixels): fewer compiled shapes
    config.sr.batch_size = 1
    config.sr.latent_tile = 96  # UNet tiles and their overlap, latent pixels
    config.sr.latent_overlap = 32
    # Working images with more pixels run the VAE strip-wise on the host (infer/vae_tiling.py: GroupNorm
    # statistics stay global, attention is windowed above 64x64 latents), bounding memory for huge outputs.
    config.sr.vae_strip_above = 1024 * 1024
    config.sr.color_fix = "adain"  # adain | wavelet | none
    return config
