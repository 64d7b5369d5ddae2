"""The paper's setting (docs/method.md 3.1): SD-2.1-base, LoRA rank 4, global batch 16 of 512x512 crops, AdamW 5e-5.

Every key of every experiment is here, with its value and what it does; other configs (configs/tiny.py) start from
this one and override. Set the SD-2.1-base diffusers folder (with TADSR's time_vae/, or a stock vae/ whose time
layers then start at zero) and the converted LPIPS weights:
  python launch/train.py --config=configs/tadsr_sd21.py --workdir=gs://bucket/run \\
      --config.model.pretrained=/path/to/stable-diffusion-2-1-base --config.lpips.path=/path/to/lpips_vgg.safetensors \\
      --config.data.source=paired_list --config.data.path=/path/to/train_list.txt
Other data (Real-ESRGAN LRs made on the fly from HR crops):
      --config.data.source=hr_folder --config.data.path=/path/to/LSDIR/HR [--config.data.captions=captions.tsv]
      --config.data.source=tfds --config.data.path=div2k/bicubic_x4 --config.data.image_key=hr
      [--config.data.tfds_data_dir=gs://bucket/tfds]
A weighted mixture is set in a config file:
      config.data.source = "mixture"
      config.data.mixture.lsdir = source_config(source="hr_folder", path="/data/LSDIR/HR", weight=0.8)
      config.data.mixture.ffhq = source_config(source="hr_folder", path="/data/FFHQ", weight=0.2)
"""

import ml_collections

from tadsr_jax.data.pipeline import source_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 123

    config.model = ml_collections.ConfigDict()
    # required: the SD-2.1-base folder (unet/, time_vae/ or vae/, text_encoder/, tokenizer/, scheduler/); training
    # stops with one line when it is empty (offline: launch/stand_ins.py writes a stand-in for configs/tiny.py).
    config.model.pretrained = ""
    config.model.dtype = "bfloat16"  # the frozen networks' weights and activations (LPIPS too); trainables stay fp32
    # Architectures (diffusers/transformers config.json fields) of the offline stand-in (tadsr_jax/stand_ins.py);
    # empty: the pretrained folder's (SD-2.1-base's for launch/compile.py, which reads no files).
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
    # Rematerialisation policies (tadsr_jax/nn/remat.py: none, full, dots, dots_no_batch; the VAE halves also
    # layers): recompute each block's activations in the backward pass instead of keeping them (memory for
    # compute). 8 images per 16 GiB v5e chip: unet=full, vae_encoder=full, vae_decoder=layers (README).
    config.model.remat = ml_collections.ConfigDict()
    config.model.remat.unet = "none"
    config.model.remat.vae_encoder = "none"
    config.model.remat.vae_decoder = "none"
    # Attention kernel (tadsr_jax/nn/attention.py): auto, blockwise, xla, cudnn, flash. "auto" picks the best of
    # the platform the step is compiled for (CPU: blockwise, TPU: Pallas flash, GPU: cuDNN for bf16).
    config.model.attention = "auto"

    config.lpips = ml_collections.ConfigDict()
    config.lpips.path = ""  # required: the safetensors from `launch/convert.py --what=lpips`
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
    config.loss.cfg_base = 7.5  # the teacher's guidance scale: cfg_base + cfg_per_step * t_teacher
    config.loss.cfg_per_step = 1.0 / 200.0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 100_000
    config.train.batch_size = 16  # global; 8+ per TPU chip (README, Parallelism: "Eight images per chip")
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
    config.train.b1 = 0.9  # AdamW, both optimizers
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.weight_decay = 1e-2
    config.train.max_grad_norm = 1.0  # per optimizer
    config.train.student_timesteps = "list"  # "list": int(linspace(1, 999, num_student_timesteps)); "uniform": 1..999
    config.train.num_student_timesteps = 50
    config.train.max_student_timestep = 999  # lower: train only the fidelity end of the timestep knob
    # The reference's negative prompt for the teacher's classifier-free guidance (docs/method.md 3.1).
    config.train.negative_prompt = (
        "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
        "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
        "jpeg artifacts, deformed, lowres, over-smooth"
    )
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.sample_every = 1000  # LQ | SR | HR grids to TensorBoard and <workdir>/samples/
    config.train.sample_timestep = 500
    config.train.eval_every = 0  # steps between validations on data.eval (and at the last step); 0: off
    config.train.eval_timesteps = ()  # student timesteps validated; empty: (sample_timestep,)

    # The training data: one source (source_config: tadsr_jax/data/pipeline.py) or a weighted mixture of sources.
    config.data = source_config(source="paired_list", path="")  # required: data.path, the list file (or see above)
    config.data.mixture = ml_collections.ConfigDict()  # source == "mixture": {name: source_config(...)}
    config.data.sample_size = 128  # side of the offline stand-in's training images (tadsr_jax/stand_ins.py)
    config.data.crop_size = 512  # square random crop, same window on HR and LR; smaller images are first upscaled
    config.data.scale = 4  # SR factor of synthetic LRs (bicubic and Real-ESRGAN)
    config.data.flip = True  # random horizontal flip
    # LR of records without one: "realesrgan" (online, second order; data.realesrgan below) or "bicubic".
    config.data.degradation = "realesrgan"
    config.data.synthetic_prob = 0.01  # paired records: chance of a bicubic LR from the HR instead of the listed LR
    config.data.num_workers = 8  # grain worker processes; 0 decodes in this process
    config.data.read_threads = 8  # decoding threads (in each worker process when num_workers > 0)
    config.data.prefetch = 2  # batches buffered ahead (per worker when num_workers > 0)
    config.data.device_prefetch = 2  # batches copied to the devices ahead of the train step
    # The held-out set of validation during training (train.eval_every): one source as above, not a mixture; empty
    # path: none. Centre crops of crop_size, no flip; LRs listed (or tfds') or made by `degradation`, seeded per
    # image so that every validation sees the same ones.
    config.data.eval = source_config(source="hr_folder", path="")
    del config.data.eval.weight

    # Real-ESRGAN's second-order degradation: the reference's params_realesrgan.yml, kernel_info flattened into the
    # top level (its scale is data.scale). tadsr_jax/data/degradation.py says what each step does.
    config.data.realesrgan = r = ml_collections.ConfigDict()
    # First degradation.
    r.resize_prob = (0.2, 0.7, 0.1)  # P(up, down, keep) of the random resize
    r.resize_range = (0.15, 1.5)  # up: s ~ U(1, max); down: s ~ U(min, 1)
    r.gaussian_noise_prob = 0.5  # else Poisson noise
    r.noise_range = (1.0, 30.0)  # Gaussian sigma ~ U(range), in 0-255 units
    r.poisson_scale_range = (0.05, 3.0)  # Poisson noise multiplier ~ U(range)
    r.gray_noise_prob = 0.4  # noise shared by the three channels (Gaussian or Poisson)
    r.jpeg_range = (30, 95)  # JPEG quality ~ U(range), rounded
    # Second degradation.
    r.second_blur_prob = 0.8  # blur with kernel2, else no second blur
    r.resize_prob2 = (0.3, 0.4, 0.3)
    r.resize_range2 = (0.3, 1.2)  # relative to (H / scale, W / scale)
    r.gaussian_noise_prob2 = 0.5
    r.noise_range2 = (1.0, 25.0)
    r.poisson_scale_range2 = (0.05, 2.5)
    r.gray_noise_prob2 = 0.4
    r.jpeg_range2 = (30, 95)
    # Blur kernels of the first degradation (kernel_info).
    r.blur_kernel_size = 21  # sizes drawn uniformly from the odd 7..blur_kernel_size (also the final sinc's)
    r.kernel_list = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    r.kernel_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # one per kernel_list entry
    r.sinc_prob = 0.1  # kernel1 is a sinc (circular low-pass) instead of a kernel_list type
    r.blur_sigma = (0.2, 3.0)  # sigma_x, sigma_y ~ U(range); rotation ~ U(-pi, pi)
    r.betag_range = (0.5, 4.0)  # generalized Gaussian shape: U(min, 1) or U(1, max), 50/50
    r.betap_range = (1.0, 2.0)  # plateau shape, drawn the same way
    # Blur kernels of the second degradation.
    r.blur_kernel_size2 = 21
    r.kernel_list2 = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
    r.kernel_prob2 = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    r.sinc_prob2 = 0.1
    r.blur_sigma2 = (0.2, 1.5)
    r.betag_range2 = (0.5, 4.0)
    r.betap_range2 = (1.0, 2.0)
    # The final sinc filter (else a pulse, i.e. none).
    r.final_sinc_prob = 0.8

    # The ('data', 'fsdp') device mesh (tadsr_jax/parallel.py).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # data-parallel size; -1: all devices not used by the other axis
    # How many devices share one copy of the large frozen weights (raise, e.g. to 4-8, to shard the frozen
    # UNet/VAE/text encoder across devices); -1: all devices left.
    config.mesh.fsdp = 1
    config.mesh.fsdp_min_size = 2**20  # elements; smaller weights stay replicated

    # Inference (launch/sr.py, --config.sr.KEY=VALUE). See tadsr_jax/infer/pipeline.py.
    config.sr = ml_collections.ConfigDict()
    config.sr.timestep = 500  # the fidelity (low) / realism (high) knob, 1..999
    config.sr.prompt = ""  # for every image (sr.py --captions gives per-image ones)
    # DAPE tagger file (launch/convert.py --what=dape): each working image's tags prefix its prompt as the
    # reference's ("<tags>, <prompt>,"); empty: no tagging. Runs in sr.dtype.
    config.sr.tagger = ""
    config.sr.save_prompts = False  # write each output's prompt to <output name>.txt beside it
    config.sr.sample_posterior = True  # the reference samples the VAE posterior (seeded here)
    config.sr.seed = 42  # posterior noise: the same seed gives the same output
    config.sr.dtype = "float32"  # or "bfloat16" (GPU/TPU serving)
    # Output = scale x input, 1..8: the bicubic upscale in front of the model (the reference's --upscale; the model
    # works at the output resolution, and TADSR is trained and evaluated at 4).
    config.sr.scale = 4
    config.sr.process_size = 512  # short sides below process_size / scale are upscaled to it first
    config.sr.bucket = 64  # working images are padded to multiples of this (pixels): fewer compiled shapes
    config.sr.batch_size = 1  # same-shape images (or --sweep timesteps) per call
    config.sr.latent_tile = 96  # UNet tiles and their overlap, latent pixels
    config.sr.latent_overlap = 32
    # Working images with more pixels run the VAE strip-wise on the host (infer/vae_tiling.py: GroupNorm
    # statistics stay global, attention is windowed above 64x64 latents), bounding memory for huge outputs.
    config.sr.vae_strip_above = 1024 * 1024
    config.sr.color_fix = "adain"  # adain | wavelet | none
    return config
