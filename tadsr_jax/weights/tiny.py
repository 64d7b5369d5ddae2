"""Tiny offline stand-ins for pretrained assets, for tests, CI and the demo (nothing can be downloaded there)."""

from __future__ import annotations

import json
import os


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's printable stand-in for each of the 256 byte values, in byte order of their ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


_TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("o", "f</w>"))


def write_tiny_clip_tokenizer(folder: str) -> int:
    """Write an offline CLIP tokenizer folder with a byte-level vocabulary and a few merges; return its size.

    Every string is representable (one token per byte, `</w>` marking word ends), so it tokenises like
    CLIP's own tokenizer in structure, with far fewer ids: a tiny text model needs `vocab_size >=` the
    returned size. The special tokens come last, as in CLIP's vocabulary.
    """
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _TINY_MERGES),
              "<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES))
    tokenizer = CLIPTokenizer(vocab_file, merges_file)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)
