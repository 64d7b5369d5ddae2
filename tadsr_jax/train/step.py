"""The train state and the single jitted TADSR train step (generator update, then fake-score update)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tadsr_jax import parallel
from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.method import losses
from tadsr_jax.method.tadsr import FAKE_SCORE, FROZEN, GENERATOR, TADSR, LossConfig, fake_score_loss, generator_loss
from tadsr_jax.models.clip_text import CLIPTextModel
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.models.unet import UNet2DConditionModel
from tadsr_jax.models.vae import AutoencoderKL
from tadsr_jax.nn import remat
from tadsr_jax.nn.attention import set_implementation as set_attention_implementation


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything training changes (and checkpoints): never the frozen base weights."""

    step: jax.Array
    generator: nnx.State
    fake_score: nnx.State
    generator_opt: optax.OptState
    fake_score_opt: optax.OptState
    key: jax.Array


# The kinds of diffusers' `get_scheduler`, each after a linear warmup (but constant), decaying over the rest.
_DECAYS: dict[str, Callable[[ml_collections.ConfigDict, int], optax.Schedule]] = {
    "constant_with_warmup": lambda c, n: optax.constant_schedule(c.lr),
    "linear": lambda c, n: optax.linear_schedule(c.lr, 0.0, n),
    "cosine": lambda c, n: optax.cosine_decay_schedule(c.lr, n),
    "cosine_with_restarts": lambda c, n: _cosine_with_hard_restarts(c.lr, c.lr_num_cycles, n),
    "polynomial": lambda c, n: optax.polynomial_schedule(c.lr, c.lr_end, c.lr_power, n),
}
LR_SCHEDULES = ("constant", *_DECAYS)


def _cosine_with_hard_restarts(lr: float, cycles: int, steps: int) -> optax.Schedule:
    """`cycles` half cosines from lr to 0 over `steps`, then 0. Closed form: a cycle may end between two steps,
    which optax's restart schedules (whole steps per cycle) cannot express."""

    def schedule(count):
        progress = count / steps
        return jnp.where(progress < 1.0, 0.5 * lr * (1.0 + jnp.cos(jnp.pi * jnp.mod(cycles * progress, 1.0))), 0.0)

    return schedule


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate of each optimizer update: diffusers' `get_scheduler(lr_schedule, num_warmup_steps=
    warmup_steps, num_training_steps=steps, num_cycles=lr_num_cycles, power=lr_power)`, as the reference builds
    it (polynomial's lr_end, which get_scheduler leaves at 1e-7, is `lr_end`). `config` is `config.train`."""
    kind, warmup = config.lr_schedule, config.warmup_steps
    if kind not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule: unknown schedule {kind!r} (known: {', '.join(LR_SCHEDULES)})")
    if kind == "constant":
        if warmup:
            raise ValueError(
                f"train.warmup_steps={warmup} does nothing with train.lr_schedule='constant' (as in "
                f"diffusers' get_scheduler): use 'constant_with_warmup', or warmup_steps=0"
            )
        return optax.constant_schedule(config.lr)
    if not 0 <= warmup < config.steps:
        raise ValueError(f"train.warmup_steps must be in 0..{config.steps - 1} (train.steps - 1), got {warmup}")
    if kind == "polynomial" and not config.lr_end < config.lr:
        raise ValueError(f"train.lr_end ({config.lr_end:g}) must be below train.lr ({config.lr:g})")
    if kind == "cosine_with_restarts" and config.lr_num_cycles < 1:
        raise ValueError(f"train.lr_num_cycles must be at least 1, got {config.lr_num_cycles}")
    decay = _DECAYS[kind](config, config.steps - warmup)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled weight decay, as torch.optim.AdamW)."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        ),
    )


def init_state(generator: nnx.State, fake_score: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0; trainable tensors and optimizer states in fp32 even when the frozen base is bf16."""
    generator = jax.tree.map(lambda x: x.astype(jnp.float32), generator)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        generator=generator,
        fake_score=fake_score,
        generator_opt=tx.init(generator),
        fake_score_opt=tx.init(fake_score),
        key=jax.random.key_data(jax.random.key(seed)),
    )


REMAT_KEYS = ("unet", "vae_encoder", "vae_decoder")


def remat_policy(config: ml_collections.ConfigDict, key: str) -> str:
    """`config.model.remat.<key>`, checked (ValueError naming the key); the UNet has no layer-wise policy."""
    try:
        return remat.check_policy(config.model.remat[key], per_layer=key != "unet")
    except ValueError as e:
        raise ValueError(f"model.remat.{key}: {e}") from None


def make_model(
    config: ml_collections.ConfigDict,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    lpips: LPIPS | None,
    platform: str | None = None,
) -> TADSR:
    """TADSR on these networks with `config.model`'s adapters, remat policies and attention kernel (concrete or
    under eval_shape); `platform` is the one the step is compiled for (default: JAX's default backend)."""
    set_attention_implementation(unet, config.model.attention, platform)
    set_attention_implementation(vae, config.model.attention, platform)
    unet.remat, vae.encoder.remat, vae.decoder.remat = (remat_policy(config, key) for key in REMAT_KEYS)
    return TADSR(
        unet,
        vae,
        text_encoder,
        lpips,
        rank=config.model.lora_rank,
        alpha=config.model.lora_alpha,
        fake_score_groups=tuple(config.model.fake_score_groups),
        rngs=nnx.Rngs(config.seed),
    )


@dataclasses.dataclass
class StepProgram:
    """The jitted train step and sampler of one model on one mesh, with the shardings of their arguments."""

    graphdef: nnx.GraphDef
    step_fn: Callable  # (state, frozen, rest, batch, neg_context) -> (state, metrics); state donated
    sample_fn: Callable  # (state, frozen, rest, batch, timesteps, key) -> SR images
    state_sharding: TrainState
    frozen_sharding: nnx.State
    rest_sharding: nnx.State
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def split_model(model: TADSR) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State, nnx.State]:
    """(graphdef, generator, fake score, frozen, rest): the variable sets the step treats differently."""
    return nnx.split(model, GENERATOR, FAKE_SCORE, FROZEN, ...)


def step_program(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    schedule: NoiseSchedule,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    frozen: nnx.State,
    rest: nnx.State,
) -> StepProgram:
    """Shardings (train state replicated, large frozen weights over 'fsdp', the batch over every mesh axis) and
    the jitted functions. The trees may be abstract: only their shapes are read."""
    check_config(config, mesh.size)
    replicated = parallel.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    frozen_sharding = parallel.shard_params(frozen, mesh, min_size=config.mesh.fsdp_min_size)
    rest_sharding = jax.tree.map(lambda _: replicated, rest)
    batch_sharding = parallel.batch_sharding(mesh)
    step_fn = jax.jit(
        parallel.under_mesh(
            mesh, make_train_step(graphdef, schedule, optimizer(config.train), config, batch_shards=mesh.size)
        ),
        in_shardings=(state_sharding, frozen_sharding, rest_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    sample_fn = jax.jit(
        parallel.under_mesh(mesh, sample_images(graphdef, schedule)),
        in_shardings=(state_sharding, frozen_sharding, rest_sharding, batch_sharding, batch_sharding, replicated),
        out_shardings=replicated,
    )
    return StepProgram(
        graphdef=graphdef,
        step_fn=step_fn,
        sample_fn=sample_fn,
        state_sharding=state_sharding,
        frozen_sharding=frozen_sharding,
        rest_sharding=rest_sharding,
        batch_sharding=batch_sharding,
        replicated=replicated,
    )


def sample_student_timesteps(key: jax.Array, batch: int, mode: str, num: int, max_timestep: int) -> jax.Array:
    """The reference draws from int(linspace(1, 999, 50)) per sample; 'uniform' draws any integer in [1, 999].
    `max_timestep` replaces 999 in both."""
    if not 1 <= max_timestep <= 999:
        raise ValueError(f"train.max_student_timestep must be in 1..999, got {max_timestep}")
    if mode == "list":
        table = jnp.asarray(losses.student_timesteps(num, max_timestep))
        return table[jax.random.randint(key, (batch,), 0, table.shape[0])]
    if mode == "uniform":
        return jax.random.randint(key, (batch,), 1, max_timestep + 1)
    raise ValueError(f"train.student_timesteps: unknown mode {mode!r} (list, uniform)")


def trained_timesteps(train_config: ml_collections.ConfigDict) -> list[int]:
    """[lowest, highest] student timestep the generator is trained at (saved with checkpoints and exports)."""
    return [1, int(train_config.max_student_timestep)]


def check_config(config: ml_collections.ConfigDict, batch_shards: int) -> None:
    """Raise ValueError, one line naming the key, for train settings that cannot work, before anything loads:
    the remat policies, the lr schedule, and a batch that does not split into `train.accumulate_steps` equal
    micro-batches over the `batch_shards` devices it is spread over."""
    for key in REMAT_KEYS:
        remat_policy(config, key)
    learning_rate(config.train)
    accumulate, batch_size = config.train.accumulate_steps, config.train.batch_size
    if accumulate < 1:
        raise ValueError(f"train.accumulate_steps must be at least 1, got {accumulate}")
    if batch_size % (accumulate * batch_shards):
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by train.accumulate_steps x devices = "
            f"{accumulate} x {batch_shards} (every device gets the same rows in every micro-batch)"
        )


def micro_batches(x: jax.Array, count: int, shards: int) -> jax.Array:
    """(B, ...) -> (count, B / count, ...). The batch is laid out as `shards` blocks of rows, one per device;
    micro-batch m takes the m-th part of every block, so it is spread over the devices as the batch is and no row
    moves between devices."""
    rows = x.shape[0] // (count * shards)
    x = x.reshape(shards, count, rows, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(count, shards * rows, *x.shape[3:])


def mean_over_micro_batches(fn: Callable, rows, count: int, shards: int):
    """The mean of `fn(micro-batch)` over `count` micro-batches of the pytree `rows` (every leaf has the batch
    axis first), one at a time (`lax.scan`): for mean losses and their gradients, exactly `fn(rows)` up to
    float32 rounding, holding one micro-batch's activations at a time."""
    if count == 1:
        return fn(rows)
    micro = jax.tree.map(lambda x: micro_batches(x, count, shards), rows)
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro)))
    total, _ = jax.lax.scan(lambda acc, r: (jax.tree.map(jnp.add, acc, fn(r)), None), total, micro)
    return jax.tree.map(lambda x: x / count, total)


def make_train_step(
    graphdef: nnx.GraphDef,
    schedule: NoiseSchedule,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    batch_shards: int = 1,
) -> Callable:
    """`step(state, frozen, rest, batch, neg_context) -> (state, metrics)`, to be jitted by the caller.

    One step = the generator's three losses, its update, then the fake score's loss on the detached
    generator latent and its update, as the reference orders them. A non-finite loss leaves the state
    unchanged and reports `finite = False`, so the caller can stop without corrupting anything.

    Gradient accumulation (`train.accumulate_steps` = k): both gradients are the means over k micro-batches of
    the batch (`micro_batches`, over `batch_shards` devices), each micro-batch's fake-score loss on its own
    generator latents, all at the parameters before the step; then one update of each. This is the reference's
    `accelerator.accumulate(model_gen, model_reg)`: its optimizer steps are skipped until the k-th micro-batch, so
    every micro-batch's generator and fake-score gradients see the old parameters (the fake score's of the last
    one too: its latents were computed before the generator's step, and detached), and the sums of loss / k are
    these means. Every random draw (student timestep, posterior, TA-VSD and fake-score noise and timesteps) comes
    from a key of its own row (`tadsr_jax.prng`), so k micro-batches of B / k train exactly as one batch of B.
    """
    loss_cfg = LossConfig(**config.loss.to_dict())
    train_cfg = config.train

    def gradients(state: TrainState, frozen: nnx.State, rest: nnx.State, rows: dict, neg_context: jax.Array):
        """(generator gradients, fake-score gradients), losses of `rows` (a batch or micro-batch)."""

        def gen_loss(generator):
            model = nnx.merge(graphdef, generator, state.fake_score, frozen, rest)
            return generator_loss(
                model, schedule, rows["batch"], neg_context, rows["student_t"], rows["gen_key"], loss_cfg
            )

        (g_loss, out), g_grads = jax.value_and_grad(gen_loss, has_aux=True)(state.generator)

        def fake_loss(fake):
            model = nnx.merge(graphdef, state.generator, fake, frozen, rest)
            return loss_cfg.fake * fake_score_loss(model, schedule, out.x0, out.context, rows["fake_key"])

        f_loss, f_grads = jax.value_and_grad(fake_loss)(state.fake_score)
        losses = {
            "loss/generator": g_loss,
            "loss/fake_score": f_loss,
            **{f"loss/{name}": value for name, value in out.losses.items()},
        }
        return (g_grads, f_grads), losses

    def step(
        state: TrainState, frozen: nnx.State, rest: nnx.State, batch: dict[str, jax.Array], neg_context: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        key, k_t, k_gen, k_fake = jax.random.split(jax.random.wrap_key_data(state.key), 4)
        batch_size = batch["lq"].shape[0]
        student_t = sample_student_timesteps(
            k_t,
            batch_size,
            train_cfg.student_timesteps,
            train_cfg.num_student_timesteps,
            train_cfg.max_student_timestep,
        )
        rows = {
            "batch": batch,
            "student_t": student_t,
            "gen_key": jax.random.split(k_gen, batch_size),
            "fake_key": jax.random.split(k_fake, batch_size),
        }
        (g_grads, f_grads), losses = mean_over_micro_batches(
            lambda r: gradients(state, frozen, rest, r, neg_context), rows, train_cfg.accumulate_steps, batch_shards
        )

        g_updates, generator_opt = tx.update(g_grads, state.generator_opt, state.generator)
        generator = optax.apply_updates(state.generator, g_updates)
        f_updates, fake_score_opt = tx.update(f_grads, state.fake_score_opt, state.fake_score)
        fake_score = optax.apply_updates(state.fake_score, f_updates)

        finite = jnp.isfinite(losses["loss/generator"]) & jnp.isfinite(losses["loss/fake_score"])
        new = TrainState(
            step=state.step + 1,
            generator=generator,
            fake_score=fake_score,
            generator_opt=generator_opt,
            fake_score_opt=fake_score_opt,
            key=jax.random.key_data(key),
        )
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {
            **losses,
            "finite": finite,
            "grad_norm/generator": optax.global_norm(g_grads),
            "grad_norm/fake_score": optax.global_norm(f_grads),
            "lr": learning_rate(train_cfg)(state.step),
            "student_t_mean": jnp.mean(student_t.astype(jnp.float32)),
        }
        return new, metrics

    return step


def sample_images(graphdef: nnx.GraphDef, schedule: NoiseSchedule) -> Callable:
    """`fn(state, frozen, rest, batch, timesteps, key) -> SR images` with the current generator."""

    def fn(
        state: TrainState,
        frozen: nnx.State,
        rest: nnx.State,
        batch: dict[str, jax.Array],
        timesteps: jax.Array,
        key: jax.Array,
    ) -> jax.Array:
        model = nnx.merge(graphdef, state.generator, state.fake_score, frozen, rest)
        context = model.text_encoder(batch["input_ids"])
        return model.student(schedule, batch["lq"], timesteps, context, key)[1]

    return fn


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
