"""The paper's setting (docs/method.md 3.1): SD-2.1-base, LoRA rank 4, global batch 16 of 512x512 crops, AdamW 5e-5.

Set the SD-2.1-base diffusers folder (with TADSR's time_vae/, or a stock vae/ whose time layers then start at
zero) and the converted LPIPS weights:
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

from tadsr_jax.defaults import base_config


def get_config():
    config = base_config()
    config.seed = 123
    config.model.pretrained = ""  # required: the SD-2.1-base folder
    config.model.dtype = "bfloat16"  # frozen base in bf16; trainables and optimizer states stay fp32
    config.lpips.path = ""  # required: launch/convert.py --what=lpips output

    config.data.source = "paired_list"
    config.data.crop_size = 512
    config.data.num_workers = 8

    config.train.steps = 100_000
    config.train.batch_size = 16
    config.train.lr = 5e-5
    config.train.checkpoint_every = 500
    config.train.log_every = 50
    config.train.sample_every = 1000

    config.mesh.data = -1
    config.mesh.fsdp = 1  # raise (e.g. 4-8) to shard the frozen UNet/VAE/text encoder across devices
    return config
