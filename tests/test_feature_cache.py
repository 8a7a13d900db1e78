"""FeatureCache: hits and misses, corrupt and stale entries, atomic writes, batch encoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import dataset_builder.feature_cache as feature_cache_module
from dataset_builder import FeatureCache, content_key_for_file, content_key_for_samples, encode_paths


def entry(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(7, 4, generator=generator), "mask": torch.ones(7, dtype=torch.bool)}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]


def test_hit_and_miss(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "encoder-a")
    key = content_key_for_samples(np.zeros(100, dtype=np.float32), 16000)
    assert cache.get(key) is None and cache.misses == 1
    cache.put(key, entry())
    got = cache.get(key)
    assert cache.hits == 1
    assert set(got) == {"features", "mask"}
    assert torch.equal(got["features"], entry()["features"]) and got["mask"].dtype == torch.bool
    calls = []
    assert torch.equal(cache.get_or_compute(key, lambda: calls.append(1) or entry(1))["features"], entry()["features"])
    assert calls == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_entry_is_recomputed(tmp_path: Path, damage: str) -> None:
    cache = FeatureCache(tmp_path, "encoder-a")
    key = "ab" * 32
    cache.put(key, entry())
    path = cache.path_for(key)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\xff" * 40, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    assert cache.get(key) is None
    assert not path.exists()  # the bad file is removed
    calls = []
    result = cache.get_or_compute(key, lambda: calls.append(1) or entry(2))
    assert calls == [1] and torch.equal(result["features"], entry(2)["features"])
    assert torch.equal(cache.get(key)["features"], entry(2)["features"])


def test_stale_encoder_is_separate(tmp_path: Path) -> None:
    old, new = FeatureCache(tmp_path, "encoder-a"), FeatureCache(tmp_path, "encoder-b")
    key = "cd" * 32
    old.put(key, entry())
    assert new.get(key) is None  # another encoder never sees it
    assert old.get(key) is not None
    # A file copied under the wrong encoder's folder (or key) is detected by its metadata.
    new.path_for(key).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(old.path_for(key), new.path_for(key))
    assert new.get(key) is None and not new.path_for(key).exists()
    other_key = "ef" * 32
    old.path_for(other_key).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(old.path_for(key), old.path_for(other_key))
    assert old.get(other_key) is None


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path, "encoder-a")
    key = "12" * 32

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(feature_cache_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.put(key, entry())
    assert not cache.path_for(key).exists()
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    cache.put(key, entry())  # an earlier good entry survives a later failed overwrite
    monkeypatch.setattr(feature_cache_module, "save_file", crash)
    with pytest.raises(OSError):
        cache.put(key, entry(3))
    assert torch.equal(cache.get(key)["features"], entry()["features"])
    assert leftovers(tmp_path) == []


def test_bad_keys_and_values(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "encoder-a")
    with pytest.raises(ValueError, match="content key"):
        cache.get("../../etc")
    with pytest.raises(ValueError, match="torch.Tensor"):
        cache.put("ab" * 32, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="encoder_id"):
        FeatureCache(tmp_path, "")


def write(path: Path, seed: int, rate: int = 16000) -> Path:
    rng = np.random.default_rng(seed)
    soundfile.write(path, (0.1 * rng.standard_normal(rate // 4)).astype(np.float32), rate)
    return path


def test_encode_paths_uses_the_cache(tmp_path: Path) -> None:
    paths = [write(tmp_path / f"u{i}.wav", i) for i in range(5)]
    paths.append(write(tmp_path / "stereo44k.flac", 9, rate=44100))
    batches: list[int] = []

    def encode(arrays: list[np.ndarray]) -> list[torch.Tensor]:
        batches.append(len(arrays))
        return [torch.tensor([[float(a.sum()), float(len(a))]]) for a in arrays]

    cache = FeatureCache(tmp_path / "cache", "toy-encoder")
    first = encode_paths(cache, paths + [paths[0]], encode, batch_size=4)
    assert batches == [4, 2]  # the repeated path is encoded once
    assert torch.equal(first[0], first[-1]) and first[-2][0, 1] == 4000  # resampled to 16 kHz
    batches.clear()
    second = encode_paths(cache, paths, encode, batch_size=4)
    assert batches == [] and all(torch.equal(a, b) for a, b in zip(first, second))
    # Same bytes under another name hit; edited content misses.
    shutil.copy(paths[1], tmp_path / "renamed.wav")
    write(paths[2], 100)
    third = encode_paths(cache, [tmp_path / "renamed.wav", paths[2]], encode)
    assert batches == [1] and torch.equal(third[0], first[1]) and not torch.equal(third[1], first[2])
    assert content_key_for_file(paths[1]) == content_key_for_file(tmp_path / "renamed.wav")
    batches.clear()
    encode_paths(None, paths, encode, batch_size=8)  # no cache: everything encoded
    assert batches == [6]
    with pytest.raises(ValueError, match="one per audio"):
        encode_paths(None, paths, lambda arrays: [])
