"""The training input pipeline: a grain graph from sources to per-process batches, checkpointable.

  source (or weighted mixture of sources, each seeded, shuffled and repeated) -> random_map(MakeTrainPair)
         -> _ProcessRows -> to_iter_dataset (threads; drops the Nones of files that fail to decode) -> batch
         -> [mp_prefetch] -> [tokenize]
Shuffling, mixing and the per-example randomness (grain seeds random_map by (seed, position)) happen on the global,
repeated stream before it is split across processes, so each example's crop/flip/degradation depends only on
(seed, position). Global batch k is positions k*B..(k+1)*B-1 of that stream and process p reads its rows
p*B/P..(p+1)*B/P-1, the rows `parallel.global_batch` places it in: global batch k holds the same examples in the
same order whatever the process count, and so do the train step's per-row draws (as long as no file fails to
decode and num_workers <= 1: n workers interleave batches made from slices i::n of the process's stream).
Each epoch is reshuffled (repeat reseeds upstream transforms per epoch). The iterator's state is grain's (the
next index, per worker when num_workers > 0); restoring it needs the same data, config, seed and process layout.
"""

from collections.abc import Callable

import grain
import ml_collections
import numpy as np
from absl import flags

from tadsr_jax.data.degradation import RealESRGANDegradation
from tadsr_jax.data.sources import HRFolderSource, PairedListSource, TfdsSource
from tadsr_jax.data.transforms import BicubicDegradation, Degradation, MakeTrainPair

SOURCES = {
    "paired_list": lambda config: PairedListSource(config.path),
    "hr_folder": lambda config: HRFolderSource(config.path, config.captions),
    "tfds": lambda config: TfdsSource(
        config.path,
        config.split,
        data_dir=config.tfds_data_dir,
        image_key=config.image_key,
        lr_key=config.lr_key,
        prompt_key=config.prompt_key,
    ),
}
DEGRADATIONS = ("realesrgan", "bicubic")


def source_config(source: str, path: str, **overrides) -> ml_collections.ConfigDict:
    """The fields that name one source (the top level of `config.data`, or one entry of `config.data.mixture`):
    the one place a source's keys and their values are written (configs/tadsr_sd21.py builds both with it)."""
    config = ml_collections.ConfigDict()
    # "paired_list" (HR_path LR_path prompt... lines), "hr_folder" (LR synthesised), "tfds" (LR synthesised unless
    # lr_key names a paired LR feature); at the top level also "mixture" (the weighted sources of `mixture`).
    config.source = source
    # The list file, the HR folder or the tfds name ("div2k/bicubic_x4"); empty: scikit-image samples.
    config.path = path
    config.captions = ""  # hr_folder: optional file of `relative/name<TAB>caption` lines; else empty prompts
    config.split = "train"  # tfds split (slicing allowed: "train[:90%]")
    config.tfds_data_dir = ""  # tfds data_dir (prepared with file_format=array_record); empty: tfds' default
    config.image_key = "image"  # tfds feature of the HR image
    config.lr_key = ""  # tfds feature of a paired LR image; empty: the LR is synthesised
    config.prompt_key = ""  # tfds text feature used as the prompt; empty: empty prompts
    config.weight = 1.0  # relative sampling weight inside a mixture
    config.update(overrides)
    return config


def components(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The (name, source config) pairs that `config.data` draws from: itself, or its mixture's entries."""
    if config.source != "mixture":
        return [("data", config)]
    return [(f"data.mixture.{name}", entry) for name, entry in config.mixture.items()]


def make_eval_source(config: ml_collections.ConfigDict) -> PairedListSource | HRFolderSource | TfdsSource:
    """The validation set `config.data.eval` as a random-access source of records (checked: files listed and
    opened, as for training)."""
    entry = config.eval
    if entry.source not in SOURCES:
        raise ValueError(f"data.eval.source must be one of {sorted(SOURCES)}, got {entry.source!r}")
    if not entry.path:
        raise ValueError("data.eval.path is empty: set it to the held-out list file, image folder or tfds name")
    return SOURCES[entry.source](entry)


def _degradation(config: ml_collections.ConfigDict) -> Degradation:
    if config.degradation == "bicubic":
        return BicubicDegradation(config.scale)
    return RealESRGANDegradation(config.realesrgan, config.scale)


def make_transform(config: ml_collections.ConfigDict) -> MakeTrainPair:
    """The per-example work of `config.data`: crop, flip and the LR."""
    return MakeTrainPair(config.crop_size, config.scale, config.flip, config.synthetic_prob, _degradation(config))


def make_eval_transform(config: ml_collections.ConfigDict) -> MakeTrainPair:
    """The per-example work of the validation set: the central crop, no flip, and the LR listed with the record or
    made by the training's degradation (no random bicubic replacement of listed LRs)."""
    return MakeTrainPair(config.crop_size, config.scale, False, 0.0, _degradation(config), centre=True)


class _ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of `parent`: element i is element
    (i // local_batch * process_count + process_index) * local_batch + i % local_batch of `parent`."""

    def __init__(self, parent: grain.MapDataset, *, local_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._local_batch, self._process_index, self._process_count = local_batch, process_index, process_count

    def __len__(self) -> int:
        return len(self._parent) // (self._local_batch * self._process_count) * self._local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local_batch)
        return self._parent[(batch * self._process_count + self._process_index) * self._local_batch + row]

    def __str__(self) -> str:
        return f"_ProcessRows(local_batch={self._local_batch}, process {self._process_index} of {self._process_count})"


class _Tokenize:
    """Replaces the batch's `prompt` strings by `input_ids` (local_batch, T) int32."""

    def __init__(self, tokenize: Callable[[list[str]], np.ndarray], batch_size: int):
        self.tokenize = tokenize
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        ids = np.asarray(self.tokenize([str(p) for p in batch.pop("prompt")]), np.int32)
        if ids.ndim != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"tokenize must return ({self.batch_size}, T) token ids, got shape {ids.shape}")
        batch["input_ids"] = ids
        return batch


def _check(config: ml_collections.ConfigDict, global_batch_size: int, process_index: int, process_count: int):
    if config.source == "mixture" and not config.mixture:
        raise ValueError("data.source is 'mixture' but data.mixture is empty")
    for name, entry in components(config):
        if entry.source not in SOURCES:
            raise ValueError(
                f"{name}.source must be one of {sorted(SOURCES)}"
                f"{' or mixture' if name == 'data' else ''}, got {entry.source!r}"
            )
        if not entry.path:
            raise ValueError(f"{name}.path is empty: set it to the list file, image folder or tfds name")
        if not entry.weight > 0:
            raise ValueError(f"{name}.weight must be positive, got {entry.weight}")
    if config.degradation not in DEGRADATIONS:
        raise ValueError(f"data.degradation must be one of {DEGRADATIONS}, got {config.degradation!r}")
    if config.crop_size <= 0 or config.crop_size % config.scale:
        raise ValueError(
            f"data.crop_size ({config.crop_size}) must be a positive multiple of data.scale ({config.scale})"
        )
    if not 0.0 <= config.synthetic_prob <= 1.0:
        raise ValueError(f"data.synthetic_prob must be in [0, 1], got {config.synthetic_prob}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not a positive multiple of the process count {process_count}"
        )


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    tokenize: Callable[[list[str]], np.ndarray] | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of this process's batches: {"hq", "lq"} float32 (B, crop, crop, 3) in [-1, 1], plus
    "input_ids" int32 (B, T) when `tokenize` is given, else "prompt" (B,) str; B = global_batch_size //
    process_count. Checkpoint it with `get_state()` / `set_state()`.
    """
    _check(data_config, global_batch_size, process_index, process_count)
    local_batch = global_batch_size // process_count
    transform = make_transform(data_config)
    sources = [
        (grain.MapDataset.source(SOURCES[entry.source](entry)).seed(seed + i).shuffle().repeat(None), entry.weight)
        for i, (_, entry) in enumerate(components(data_config))
    ]
    dataset = (
        sources[0][0]
        if len(sources) == 1
        else grain.MapDataset.mix([d for d, _ in sources], [w for _, w in sources]).seed(seed)
    )
    dataset = _ProcessRows(
        dataset.random_map(transform), local_batch=local_batch, process_index=process_index, process_count=process_count
    )
    read = grain.ReadOptions(
        num_threads=data_config.read_threads,
        prefetch_buffer_size=max(1, data_config.read_threads, data_config.prefetch * local_batch),
    )
    # Records whose files fail to decode come out as None and are dropped here; if more than half of a window of
    # 1000 fail, grain raises instead of looping forever over a broken data set.
    examples = grain.experimental.WithOptionsIterDataset(
        dataset.to_iter_dataset(read), grain.experimental.DatasetOptions(filter_raise_threshold_ratio=0.5)
    )
    batches = examples.batch(local_batch, drop_remainder=True)
    if data_config.num_workers > 0:
        # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are still unparsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_config.num_workers, per_worker_buffer_size=max(1, data_config.prefetch)
            )
        )
    if tokenize is not None:
        batches = batches.map(_Tokenize(tokenize, local_batch))
    return iter(batches)
