"""LMDB-backed store for derived artifacts (kNN lists, induced edges, item graphs).

An artifact is a dict of numpy arrays, stored under a key that is the SHA-256 of everything it depends
on (a JSON-serialisable dict: dataset fingerprint, k, normalisation flavour, ...). Every value carries a
checksum of its payload; an entry that fails to decode or to verify is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

_MAP_SIZE = 1 << 40  # virtual address space only; the file grows with what is written
_OPEN_ENVS: dict[str, object] = {}  # LMDB allows one open handle per path and process: share it


def key_digest(namespace: str, key: dict) -> str:
    """Stable digest of an artifact's dependencies."""
    blob = json.dumps({"ns": namespace, **key}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _encode(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    return hashlib.sha256(payload).digest() + payload


def _decode(raw: bytes) -> dict[str, np.ndarray]:
    digest, payload = raw[:32], raw[32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch")
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


class ArtifactCache:
    """`get_or_build(namespace, key, build)` returns cached arrays or builds and stores them."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        self._env = None
        self.hits = 0
        self.misses = 0

    def _open(self):
        if self._env is None and self.root is not None:
            import lmdb

            self.root.mkdir(parents=True, exist_ok=True)
            path = str((self.root / "artifacts.lmdb").resolve())
            if path not in _OPEN_ENVS:
                _OPEN_ENVS[path] = lmdb.open(path, map_size=_MAP_SIZE, subdir=True, readahead=False, lock=True)
            self._env = _OPEN_ENVS[path]
        return self._env

    def get(self, namespace: str, key: dict) -> dict[str, np.ndarray] | None:
        env = self._open()
        if env is None:
            return None
        digest = key_digest(namespace, key).encode()
        with env.begin() as txn:
            raw = txn.get(digest)
        if raw is None:
            return None
        try:
            return _decode(bytes(raw))
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            log.warning("cache entry %s/%s is corrupt (%s): rebuilding", namespace, digest[:12].decode(), err)
            return None

    def put(self, namespace: str, key: dict, arrays: dict[str, np.ndarray]) -> None:
        env = self._open()
        if env is None:
            return
        digest = key_digest(namespace, key).encode()
        with env.begin(write=True) as txn:
            txn.put(digest, _encode(arrays))

    def get_or_build(self, namespace: str, key: dict,
                     build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        cached = self.get(namespace, key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        arrays = {name: np.ascontiguousarray(a) for name, a in build().items()}
        self.put(namespace, key, arrays)
        return arrays

    def close(self) -> None:
        """Forget the handle (the shared environment stays open for other users in this process)."""
        self._env = None
