"""Device prefetch: batches are put on the devices while the previous train step runs, and the checkpointed
position is that of the last batch handed out, not of the ones waiting in the buffer."""

import collections
import json
from collections.abc import Callable, Iterator
from typing import Any


class DevicePrefetch:
    """Wraps a grain iterator (anything with get_state/set_state); `to_device` turns a host batch into device
    arrays (e.g. `parallel.global_batch`). Call `fill()` after dispatching a step so the copies of the next
    `size` batches overlap it. grain's Orbax handler saves and restores this object like the iterator itself.
    """

    def __init__(self, iterator: Iterator, to_device: Callable[[Any], Any], size: int):
        if size < 1:
            raise ValueError(f"device prefetch size must be at least 1, got {size}")
        self._iterator = iterator
        self._to_device = to_device
        self._size = size
        self._buffer: collections.deque = collections.deque()
        self._consumed_state = iterator.get_state()
        # grain's own iterators have JSON-able dict states; other iterators (as grain's handler expects) bytes.
        self._bytes_state = isinstance(self._consumed_state, bytes)

    def fill(self) -> None:
        while len(self._buffer) < self._size:
            host = next(self._iterator)
            self._buffer.append((self._to_device(host), self._iterator.get_state()))

    def __iter__(self):
        return self

    def __next__(self):
        if not self._buffer:
            self.fill()
        batch, self._consumed_state = self._buffer.popleft()
        return batch

    def get_state(self) -> bytes:
        return self._consumed_state if self._bytes_state else json.dumps(self._consumed_state).encode()

    def set_state(self, state: bytes) -> None:
        self._buffer.clear()
        self._consumed_state = state if self._bytes_state else json.loads(state)
        self._iterator.set_state(self._consumed_state)

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; the buffer refills on the next `fill`."""
