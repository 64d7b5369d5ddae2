"""Random-access sources of training records: (HR, LR or None, prompt), checked when built.

File sources (a paired list, a folder) only list examples; pixels are read later, per example, by
`transforms.MakeTrainPair`. Every file is opened once here (header only, no decoding) so that missing, empty or
non-image files are dropped up front with one log line each, and a source with nothing readable fails at once
instead of at the first batch. Files whose header is fine but whose pixels are corrupt (e.g. truncated) are dropped
when they are first read. A tfds source hands out decoded pixels (tfds decodes them as it reads a record).

Lists, caption files, folders and images may be local or URLs (gs://...): see `tadsr_jax.storage`.
"""

import dataclasses
import logging
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from tadsr_jax import storage
from tadsr_jax.images import IMAGE_EXTENSIONS, read_captions

logger = logging.getLogger(__name__)

# What PIL raises for unreadable, truncated or absurd files (DecompressionBombError is not an OSError).
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example: image file paths, or decoded HWC uint8 pixels (tfds). `lr` is None when the LR is
    synthesised from the HR."""

    hr: str | np.ndarray
    lr: str | np.ndarray | None
    prompt: str


def failure_reason(path: str, err: BaseException) -> str:
    """A short human reason for an image that could not be read."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if storage.isfile(path) and storage.size(path) == 0:
        return "empty file"
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format"
    return f"{type(err).__name__}: {err}"


def unreadable_reason(path: str) -> str | None:
    """None if the file opens as an image (header only), else why not."""
    try:
        with storage.open_seekable(path) as f, Image.open(f):
            return None
    except READ_ERRORS as err:
        return failure_reason(path, err)


def _keep_readable(records: list[Record]) -> list[Record]:
    kept = []
    for record in records:
        reasons = [(p, unreadable_reason(p)) for p in (record.hr, record.lr) if p is not None]
        bad = [(p, r) for p, r in reasons if r is not None]
        for path, reason in bad:
            logger.warning("skipping unreadable image %s: %s", path, reason)
        if not bad:
            kept.append(record)
    return kept


class _RecordSource:
    """A grain RandomAccessDataSource over a fixed list of records."""

    def __init__(self, path: str, records: list[Record]):
        self.path = path
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, size={len(self)})"


def parse_paired_list(list_path: str) -> list[Record]:
    """Parses `HR_path LR_path prompt words...` lines (the reference's format).

    Tokens are whitespace-separated; tokens 3.. re-joined with single spaces are the prompt (two tokens: empty
    prompt). Blank lines are ignored; a line with one token is skipped with a warning. Relative paths are relative
    to the list file's folder (a URL's folder for a list on an object store); URLs are taken as they are.
    """
    base = os.path.dirname(storage.absolute(list_path))
    records = []
    with storage.open_file(list_path) as f:
        for number, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                logger.warning(
                    "%s:%d: skipping line with fewer than 2 fields (HR_path LR_path prompt...)", list_path, number
                )
                continue
            hr, lr = (p if storage.is_url(p) else os.path.join(base, p) for p in tokens[:2])
            records.append(Record(hr=hr, lr=lr, prompt=" ".join(tokens[2:])))
    return records


class PairedListSource(_RecordSource):
    """Pre-computed (HR, LR) pairs with prompts from a list file, as the reference trains."""

    def __init__(self, list_path: str):
        if not storage.isfile(list_path):
            raise FileNotFoundError(f"paired list file not found: {list_path}")
        super().__init__(list_path, _keep_readable(parse_paired_list(list_path)))
        if not self.records:
            raise ValueError(f"no readable HR/LR image pair in list {list_path}")


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive), as sorted paths relative to it."""
    return [name for name in storage.files_under(folder) if name.lower().endswith(IMAGE_EXTENSIONS)]


class HRFolderSource(_RecordSource):
    """HR images from a folder tree; the LR is synthesised from each crop. Prompts from an optional captions file."""

    def __init__(self, folder: str, captions_path: str):
        if not storage.isdir(folder):
            raise FileNotFoundError(f"HR image folder not found: {folder}")
        captions = read_captions(captions_path) if captions_path else {}
        records = [
            Record(hr=os.path.join(folder, name), lr=None, prompt=captions.get(os.path.normpath(name), ""))
            for name in list_images(folder)
        ]
        super().__init__(folder, _keep_readable(records))
        if not self.records:
            raise ValueError(f"no readable image in folder {folder}")


class TfdsSource:
    """Images of a tfds dataset split, read by index through `tfds.data_source` (ArrayRecord files, no TensorFlow
    graph). `image_key` is the HR feature; `lr_key` an optional paired LR feature; `prompt_key` an optional text
    feature (else empty prompts)."""

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str,
        image_key: str,
        lr_key: str,
        prompt_key: str,
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("tfds sources need tensorflow-datasets: pip install 'tadsr-jax[train]'") from None
        self.path = f"{name}:{split}"
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as err:  # tfds raises many types for unknown, unprepared or non-ArrayRecord datasets
            raise ValueError(
                f"tfds dataset {self.path} cannot be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); it must be prepared in data_dir with "
                f"file_format=array_record (tfds build {name} --file_format=array_record)"
            ) from None
        features = self._source.dataset_info.features
        for role, key in (("image_key", image_key), ("lr_key", lr_key), ("prompt_key", prompt_key)):
            if key and key not in features:
                raise ValueError(f"tfds dataset {self.path} has no feature {key!r} ({role}); it has {sorted(features)}")
        if len(self._source) == 0:
            raise ValueError(f"tfds dataset {self.path} is empty")
        self.image_key, self.lr_key, self.prompt_key = image_key, lr_key, prompt_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        example = self._source[index]
        prompt = example[self.prompt_key] if self.prompt_key else ""
        if isinstance(prompt, bytes | np.ndarray):
            prompt = np.asarray(prompt).item()
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        return Record(hr=example[self.image_key], lr=example[self.lr_key] if self.lr_key else None, prompt=prompt)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, size={len(self)})"
