"""The LMDB artifact cache: hits, key sensitivity, and corrupt entries rebuilt rather than trusted."""
import numpy as np

from mmrec.cache import ArtifactCache, key_digest


def test_get_or_build_hits_and_key_sensitivity(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5), "b": np.ones((2, 3), np.float32)}

    first = cache.get_or_build("knn", {"k": 10, "features": "abc"}, build)
    second = cache.get_or_build("knn", {"features": "abc", "k": 10}, build)  # key order irrelevant
    assert len(calls) == 1 and np.array_equal(first["a"], second["a"]) and second["b"].dtype == np.float32
    cache.get_or_build("knn", {"k": 11, "features": "abc"}, build)  # any dependency change -> rebuild
    cache.get_or_build("other", {"k": 10, "features": "abc"}, build)
    assert len(calls) == 3
    cache.close()
    reopened = ArtifactCache(tmp_path)
    reopened.get_or_build("knn", {"k": 10, "features": "abc"}, build)
    assert len(calls) == 3


def test_corrupt_entry_is_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path)
    key = {"k": 3}
    cache.put("knn", key, {"x": np.arange(4)})
    env = cache._open()
    digest = key_digest("knn", key).encode()
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(digest))
        raw[-5] ^= 0xFF  # flip a payload byte
        txn.put(digest, bytes(raw))
    assert cache.get("knn", key) is None
    out = cache.get_or_build("knn", key, lambda: {"x": np.arange(7)})
    assert out["x"].shape == (7,) and cache.get("knn", key)["x"].shape == (7,)


def test_disabled_cache_always_builds():
    cache = ArtifactCache(None)
    n = []
    cache.get_or_build("a", {}, lambda: n.append(1) or {"x": np.zeros(1)})
    cache.get_or_build("a", {}, lambda: n.append(1) or {"x": np.zeros(1)})
    assert len(n) == 2


def test_two_caches_on_one_folder_share_the_store(tmp_path):
    a, b = ArtifactCache(tmp_path), ArtifactCache(tmp_path)
    a.put("x", {"k": 1}, {"v": np.arange(3)})
    assert b.get("x", {"k": 1})["v"].tolist() == [0, 1, 2]
