"""All parallelism rules in one place: multi-host start-up, the device mesh, sharding rules, global batches.

The mesh has two named axes, ('data', 'fsdp'). The batch is split over both (every device gets its own
examples); large frozen weights are additionally split over 'fsdp' (ZeRO-3 style: XLA all-gathers them
where they are used), everything else is replicated. Sharding of a parameter tree is decided per leaf by
`param_spec`, a pure function of the leaf's shape, so the rule is data that is easy to read and test.

Multi-host: every host runs the same program and calls `initialize()` before any other JAX call; each
host then loads only its own rows of the global batch (`process_rows`, `process_row_slice`) and
`global_batch` assembles them into global arrays without gathering anything on one host.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch (leading) axis is split over every mesh axis

# ----------------------------------------------------------------------------------------------- start-up


def _slurm_tasks() -> int:
    """Number of tasks of the current `srun` step (1 outside SLURM or in the batch script itself)."""
    if "SLURM_STEP_NODELIST" not in os.environ:  # not launched by srun: one process, however many tasks
        return 1
    return int(os.environ.get("SLURM_NTASKS", "1"))


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu is installed and TPU chips are attached (/dev/accel* up to v4, vfio from v5)."""
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Start JAX's multi-process runtime where there is more than one process; call before any JAX computation.

    - All three arguments given: connect to that coordinator (GPU clusters, or several local CPU processes).
    - None given: on a Cloud TPU VM, and under SLURM `srun` with more than one task, let
      `jax.distributed.initialize()` detect the cluster; anywhere else this is a single-process no-op.
    Cross-process collectives between CPU devices use gloo. Calling it again once initialised is a no-op.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing and len(missing) < len(given):
        present = ", ".join(k for k in given if k not in missing)
        raise ValueError(
            f"multi-host start-up needs --coordinator_address, --num_processes and --process_id "
            f"together (got only {present})"
        )
    if jax.distributed.is_initialized():
        return
    explicit = not missing
    if not explicit and not (_on_cloud_tpu_vm() or _slurm_tasks() > 1):
        return
    # Only affects collectives between CPU devices of different processes (gloo is JAX's default; be explicit).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------- the mesh


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolve a (data, fsdp) request with at most one -1 against `num_devices`."""
    sizes = (data, fsdp)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis size may be -1, got data={data}, fsdp={fsdp}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data}, fsdp={fsdp}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split into data={data} x fsdp={fsdp} "
                f"({num_devices} is not divisible by {known})"
            )
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} devices, but there are {num_devices} devices"
        )
    return sizes


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh (sizes as `config.mesh.data/fsdp`, at most one -1) over `devices` (default: all
    global devices; a TPU topology's for ahead-of-time compilation) in topology-aware order, each host's devices
    together."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the context mesh, so that layers that must partition by hand (Pallas kernels,
    which XLA cannot partition, through `jax.shard_map`) see the mesh their inputs are sharded over."""

    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------------ parameter sharding


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """The sharding rule of one parameter (or optimizer-state) leaf, by shape alone. First match wins:

    1. fsdp_size == 1                              -> replicated (nothing to split over)
    2. fewer than `min_size` elements             -> replicated (biases, norms, LoRA factors, step counts)
    3. some dimension divisible by fsdp_size      -> split over 'fsdp' along the largest such dimension
                                                     (ties: the last one, e.g. a conv's output channels)
    4. otherwise                                  -> replicated
    """
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    divisible = [(size, dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
    if not divisible:
        return PartitionSpec()
    _, dim = max(divisible)
    return PartitionSpec(*([None] * dim), "fsdp")


def shard_params(abstract_state: Any, mesh: Mesh, *, min_size: int) -> Any:
    """NamedShardings for every array leaf of `abstract_state` (an nnx.State or any pytree of arrays or
    ShapeDtypeStructs), with the same tree structure, following `param_spec`."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, param_spec(tuple(np.shape(leaf)), fsdp_size, min_size)), abstract_state
    )


# ------------------------------------------------------------------------------------------------ batches


def process_rows(global_batch_size: int, *, num_processes: int | None = None, num_devices: int | None = None) -> int:
    """Rows of the global batch that each process loads; defaults to JAX's process and device counts."""
    num_processes = jax.process_count() if num_processes is None else num_processes
    num_devices = jax.device_count() if num_devices is None else num_devices
    if global_batch_size % num_processes:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {num_processes} processes")
    if global_batch_size % num_devices:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {num_devices} devices "
            f"(every device needs the same number of examples)"
        )
    return global_batch_size // num_processes


def process_row_slice(sharding: NamedSharding, global_batch_size: int) -> slice:
    """The rows of the global batch that this process feeds to `global_batch` under `sharding`."""
    rows = process_rows(global_batch_size)
    ranges = [
        index[0].indices(global_batch_size)[:2]
        for index in sharding.addressable_devices_indices_map((global_batch_size,)).values()
    ]
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if stop - start != rows:
        raise ValueError(
            f"this process's devices hold rows {start}..{stop - 1} of the global batch, not one "
            f"contiguous block of {rows}; use a mesh from make_mesh()"
        )
    return slice(start, stop)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's own rows (`process_row_slice`); no data leaves its host.

    Numeric and boolean entries become global jax.Arrays with `sharding`; non-numeric entries (file
    names, prompt strings) are dropped: they stay with the host's input pipeline.
    """
    arrays = {name: np.asarray(value) for name, value in local_batch.items()}
    arrays = {name: a for name, a in arrays.items() if a.dtype.kind in "biufc"}
    rows = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
    for name, n in rows.items():
        if n is None:
            raise ValueError(f"batch entry {name!r} is a scalar; every entry needs a leading batch axis")
    if len(set(rows.values())) > 1:
        raise ValueError(f"batch entries have different numbers of rows: {rows}")
    if rows:
        process_rows(next(iter(rows.values())) * jax.process_count())
    return {name: jax.make_array_from_process_local_data(sharding, a) for name, a in arrays.items()}


def process_sum(values: np.ndarray) -> np.ndarray:
    """Each process's float64 `values` (one shape everywhere) summed over the processes, in float64 on every host.

    The float64 bits travel as uint32 pairs: JAX without x64 would round them to float32 (1e-4 dB on a sum of 100
    PSNRs). The sum runs in process order, the same on every host.
    """
    values = np.ascontiguousarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(values.view(np.uint32)))
    return np.ascontiguousarray(gathered).view(np.float64).sum(axis=0)
