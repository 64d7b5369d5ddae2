"""Subprocess worker for tests/test_parallel.py (the pytest process itself stays single-device).

    python tests/parallel_worker.py unit OUT.json
    python tests/parallel_worker.py train OUT_PREFIX --data=D --fsdp=F \\
        [--coordinator=HOST:PORT --num_processes=N --process_id=I]
    python tests/parallel_worker.py validate OUT_PREFIX --images=FOLDER [--coordinator=... --num_processes=N ...]

`unit` checks the mesh and sharding rules on the simulated devices and writes what it saw as JSON.
`train` runs STEPS of a toy LoRA train step (frozen FSDP-sharded base weight, replicated LoRA trainables,
adamw, donated trainable state, per-example noise drawn inside the step), feeding this process's rows of
each global batch through `parallel.global_batch`, and writes OUT_PREFIX.npz (trained LoRA factors and
losses) and OUT_PREFIX.json (shardings seen).
`validate` runs validation during training (tadsr_jax/train/validation.py) on the images of FOLDER, global batches
of VALIDATION_BATCH, Real-ESRGAN LQs, with a stand-in sampler (the LQ plus noise scaled by t, drawn from the batch's
key over the global batch), and writes OUT_PREFIX.json (means, image counts, a `process_sum` of values float32
cannot hold) and OUT_PREFIX.npz (this process's rows: the uint8 outputs at each timestep, HR crops and mask).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tadsr_jax import parallel
from tadsr_jax.nn.layers import Linear
from tadsr_jax.nn.lora import LoRAParam, add_adapter, set_active_adapters
from tadsr_jax.nn.naming import BASE_PARAMS

MIN_SIZE = 8192
GLOBAL_BATCH = 16
STEPS = 3
VALIDATION_BATCH = 2
VALIDATION_TIMESTEPS = (100, 300)


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def unit(out: str) -> None:
    sds = jax.ShapeDtypeStruct
    tree = {
        "big": sds((64, 512), jnp.float32),
        "conv": sds((3, 3, 320, 640), jnp.float32),
        "square": sds((512, 512), jnp.float32),
        "odd": sds((1001, 999), jnp.float32),
        "small": sds((4, 8), jnp.float32),
        "count": sds((), jnp.int32),
    }
    fsdp_mesh = parallel.make_mesh(data=2, fsdp=-1)
    data_mesh = parallel.make_mesh(data=-1, fsdp=1)
    abstract_linear = nnx.state(nnx.eval_shape(lambda: Linear(64, 512, rngs=nnx.Rngs(0))))
    linear_shardings = parallel.shard_params(abstract_linear, fsdp_mesh, min_size=MIN_SIZE)

    batch_sharding = parallel.batch_sharding(fsdp_mesh)
    local = {
        "x": np.arange(GLOBAL_BATCH * 3, dtype=np.float32).reshape(GLOBAL_BATCH, 3),
        "name": np.array([f"img{i}.png" for i in range(GLOBAL_BATCH)]),
    }
    batch = parallel.global_batch(local, batch_sharding)
    result = {
        "mesh_default": dict(data_mesh.shape),
        "mesh_data2": dict(fsdp_mesh.shape),
        "mesh_fsdp8": dict(parallel.make_mesh(data=-1, fsdp=8).shape),
        "mesh_axis_names": list(fsdp_mesh.axis_names),
        "err_indivisible": _error(lambda: parallel.make_mesh(data=3, fsdp=-1)),
        "err_product": _error(lambda: parallel.make_mesh(data=4, fsdp=4)),
        "specs_fsdp4": {k: str(s.spec) for k, s in parallel.shard_params(tree, fsdp_mesh, min_size=MIN_SIZE).items()},
        "specs_fsdp1": {k: str(s.spec) for k, s in parallel.shard_params(tree, data_mesh, min_size=MIN_SIZE).items()},
        "linear_kernel": str(linear_shardings["kernel"].get_value().spec),
        "linear_bias": str(linear_shardings["bias"].get_value().spec),
        "replicated": str(parallel.replicated(fsdp_mesh).spec),
        "batch_spec": str(batch_sharding.spec),
        "batch_keys": sorted(batch),
        "batch_shard_shapes": sorted({tuple(s.data.shape) for s in batch["x"].addressable_shards}),
        "batch_equal": bool(np.array_equal(np.asarray(batch["x"]), local["x"])),
        "row_slice": list(parallel.process_row_slice(batch_sharding, GLOBAL_BATCH).indices(GLOBAL_BATCH)[:2]),
        "err_batch_rows": _error(lambda: parallel.global_batch({"x": np.zeros((12, 3))}, batch_sharding)),
        "err_batch_scalar": _error(lambda: parallel.global_batch({"x": np.zeros(())}, batch_sharding)),
    }
    with open(out, "w") as f:
        json.dump(result, f)


class ToyLoRA(LoRAParam):
    pass


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = Linear(64, 512, rngs=rngs)  # kernel: 32768 elements >= MIN_SIZE -> FSDP-sharded
        self.fc2 = Linear(512, 8, rngs=rngs)  # kernel: 4096 elements -> replicated

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def build() -> Toy:
    model = Toy(nnx.Rngs(0))
    add_adapter(model, "toy", ToyLoRA, ["fc1", "fc2"], rngs=nnx.Rngs(1))
    set_active_adapters(model, ["toy"])
    return model


def batches() -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(STEPS):
        rng = np.random.default_rng(100 + i)
        out.append(
            {
                "x": rng.normal(size=(GLOBAL_BATCH, 64)).astype(np.float32),
                "y": rng.normal(size=(GLOBAL_BATCH, 8)).astype(np.float32),
                "name": np.array([f"img{i}_{j}.png" for j in range(GLOBAL_BATCH)]),
            }
        )
    return out


def flat_arrays(state: nnx.State, prefix: str) -> dict[str, np.ndarray]:
    """Replicated leaves as numpy, read from this process's first copy."""
    return {
        prefix + "/".join(map(str, path)): np.asarray(v[...].addressable_data(0))
        for path, v in nnx.to_flat_state(state)
    }


def train(out: str, data: int, fsdp: int) -> None:
    mesh = parallel.make_mesh(data=data, fsdp=fsdp)
    repl = parallel.replicated(mesh)
    tx = optax.adamw(1e-2, weight_decay=0.01)

    graphdef, abstract_trainable, abstract_frozen = nnx.split(nnx.eval_shape(build), ToyLoRA, BASE_PARAMS)
    trainable_sh = parallel.shard_params(abstract_trainable, mesh, min_size=MIN_SIZE)
    frozen_sh = parallel.shard_params(abstract_frozen, mesh, min_size=MIN_SIZE)
    opt_sh = parallel.shard_params(jax.eval_shape(tx.init, abstract_trainable), mesh, min_size=MIN_SIZE)
    batch_sh = parallel.batch_sharding(mesh)

    def init():
        _, trainable, frozen = nnx.split(build(), ToyLoRA, BASE_PARAMS)
        return trainable, tx.init(trainable), frozen, jax.random.key(7)

    trainable, opt_state, frozen, key = jax.jit(init, out_shardings=(trainable_sh, opt_sh, frozen_sh, repl))()

    def step(trainable, opt_state, key, frozen, batch):
        key, noise_key = jax.random.split(key)

        def loss_fn(trainable):
            model = nnx.merge(graphdef, trainable, frozen)
            noise = jax.random.normal(noise_key, batch["x"].shape)  # a different draw for every example
            return jnp.mean((model(batch["x"] + 0.1 * noise) - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, key, loss

    train_step = jax.jit(
        step,
        in_shardings=(trainable_sh, opt_sh, repl, frozen_sh, batch_sh),
        out_shardings=(trainable_sh, opt_sh, repl, repl),
        donate_argnums=(0, 1, 2),
    )

    rows = parallel.process_row_slice(batch_sh, GLOBAL_BATCH)
    losses, donated = [], []
    for full in batches():
        batch = parallel.global_batch({k: v[rows] for k, v in full.items()}, batch_sh)
        previous = jax.tree.leaves(trainable)[0]
        trainable, opt_state, key, loss = train_step(trainable, opt_state, key, frozen, batch)
        donated.append(previous.is_deleted())
        losses.append(float(loss.addressable_data(0)))

    kernel = frozen["fc1"]["kernel"][...]
    meta = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh": dict(mesh.shape),
        "rows": [rows.start, rows.stop],
        "batch_keys": sorted(batch),
        "batch_spec": str(batch["x"].sharding.spec),
        "batch_shard_shapes": sorted({tuple(s.data.shape) for s in batch["x"].addressable_shards}),
        "frozen_kernel_spec": str(kernel.sharding.spec),
        "frozen_kernel_shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
        "frozen_fc2_spec": str(frozen["fc2"]["kernel"][...].sharding.spec),
        "trainable_specs": sorted({str(v[...].sharding.spec) for _, v in nnx.to_flat_state(trainable)}),
        "donated": donated,
    }
    np.savez(out + ".npz", losses=np.array(losses), **flat_arrays(trainable, "lora/"))
    with open(out + ".json", "w") as f:
        json.dump(meta, f)


def validate(out: str, images: str) -> None:
    from configs.tiny import get_config
    from tadsr_jax.train import validation

    config = get_config()
    config.train.batch_size, config.train.eval_timesteps = VALIDATION_BATCH, VALIDATION_TIMESTEPS
    config.data.eval.path, config.data.degradation = images, "realesrgan"
    mesh = parallel.make_mesh(data=-1, fsdp=1)
    rows, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def sample(state, frozen, rest, batch, timesteps, key):
        noise = jax.random.normal(key, batch["lq"].shape)
        return jnp.clip(batch["lq"] + noise * timesteps[:, None, None, None] / 1000.0, -1.0, 1.0)

    sample_fn = jax.jit(sample, in_shardings=(repl, repl, repl, rows, rows, repl), out_shardings=repl)
    tokenize = lambda prompts: np.array([[len(p)] * 4 for p in prompts], np.int32)
    validator = validation.create(config, sample_fn, rows, tokenize)
    means = validator({}, {}, {})
    outputs = {f"sr_t{t}": np.stack(list(validator.outputs({}, {}, {}, t))) for t in VALIDATION_TIMESTEPS}
    exact = parallel.process_sum(np.array([1.0 + jax.process_index() * 2.0**-40, 2.0]))
    with open(out + ".json", "w") as f:
        json.dump(
            {
                "means": {str(t): m for t, m in means.items()},
                "images": validator.images,
                "local_images": int(validator.shard.mask.sum()),
                "process_sum": exact.tolist(),
                "compiled_samplers": sample_fn._cache_size(),
            },
            f,
        )
    np.savez(out + ".npz", hq=validator.shard.hq, mask=validator.shard.mask, **outputs)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["unit", "train", "validate"])
    parser.add_argument("out")
    parser.add_argument("--data", type=int, default=-1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--images")
    args = parser.parse_args(argv)
    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.mode == "unit":
        unit(args.out)
    elif args.mode == "validate":
        validate(args.out, args.images)
    else:
        train(args.out, args.data, args.fsdp)


if __name__ == "__main__":
    main(sys.argv[1:])
