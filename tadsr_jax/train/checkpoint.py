"""Orbax checkpoints of the train state and each process's data-iterator position.

Layout: <workdir>/checkpoints/<step>/{state, data}. `state` is the TrainState (trainable parameters, both
optimizer states, step, PRNG key); the frozen base is never saved. `data` holds every process's grain
iterator state, so a resumed run continues the same example stream. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from tadsr_jax.train.step import TrainState


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                              options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator, *, force: bool = False) -> bool:
        return self._manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

    def restore(self, abstract_state: TrainState, data_iterator=None, step: int | None = None) -> TrainState:
        """The state at `step` (default: latest), laid out like `abstract_state` (shapes and shardings);
        a given data iterator is moved to the saved position in place."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `state`, to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
