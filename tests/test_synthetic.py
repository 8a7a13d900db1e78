"""The embedded synthetic corpus: shape, determinism, caching and the per-speaker mapping."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile

from dataset_builder import SyntheticConfig, generate_corpus, read_corpus
from dataset_builder.synthetic import _speaker_voice, prosodic_target, synthesize_utterance

SMALL = dict(n_speakers=3, emotions=("neutral", "anger", "sadness"), utterances_per_emotion=2)


def test_small_corpus_table(tmp_path: Path) -> None:
    table = read_corpus("synthetic", tmp_path, **SMALL)
    assert table.num_rows == 3 * 3 * 2
    assert sorted(set(table["speaker"])) == ["spk00", "spk01", "spk02"]
    assert set(table["emotion"]) == {"neutral", "anger", "sadness"}
    assert set(table["corpus"]) == {"synthetic"}
    assert "synthetic/spk01/anger_01" in table["id"]
    assert set(table["text"]) == {None}  # tones, no sentences
    for path, duration in zip(table["path"], table["duration"]):
        info = soundfile.info(path)
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert 0.8 < duration < 3.0


def test_default_config_is_24x6x10() -> None:
    config = SyntheticConfig()
    assert (config.n_speakers, len(config.emotions), config.utterances_per_emotion) == (24, 6, 10)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    first = generate_corpus(SyntheticConfig(**SMALL), tmp_path / "a")
    again = generate_corpus(SyntheticConfig(**SMALL), tmp_path / "b")
    other = generate_corpus(SyntheticConfig(**SMALL, seed=1), tmp_path / "a")
    name = "spk02/sadness_01.flac"
    a, b, c = (soundfile.read(folder / name)[0] for folder in (first, again, other))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[: min(len(a), len(c))], c[: min(len(a), len(c))])
    assert first != other  # parameters key the cache folder


def test_cache_reuse_and_repair(tmp_path: Path) -> None:
    config = SyntheticConfig(**SMALL)
    folder = generate_corpus(config, tmp_path)
    target = folder / "spk00" / "anger_00.flac"
    stamp = target.stat().st_mtime_ns
    assert generate_corpus(config, tmp_path) == folder
    assert target.stat().st_mtime_ns == stamp  # reused, not rewritten
    target.unlink()  # an incomplete folder is regenerated in full
    assert generate_corpus(config, tmp_path) == folder
    assert target.is_file()
    # Nothing half-written is left next to it: only the finished folder.
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [folder.name]


def test_env_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICL_SER_CACHE", str(tmp_path / "env"))
    folder = generate_corpus(SyntheticConfig(**{**SMALL, "utterances_per_emotion": 1}))
    assert folder.parent == tmp_path / "env" / "synthetic"


def test_speaker_specific_mapping() -> None:
    """Each speaker's emotions are distinct; the knob moves how much speakers disagree."""
    emotions = ("neutral", "happiness", "sadness", "anger", "fear", "disgust")
    disagreement = {}
    for specificity in (0.0, 0.6, 1.0):
        config = SyntheticConfig(emotions=emotions, speaker_specificity=specificity, n_speakers=12)
        voices = [_speaker_voice(config, s) for s in range(config.n_speakers)]
        targets = np.array([[prosodic_target(config, v, e) - v.offset for e in range(len(emotions))] for v in voices])
        # Within a speaker, emotions stay well apart at every setting.
        for speaker in targets:
            gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(speaker, 2)]
            assert min(gaps) > 1.0
        # Across speakers, the same emotion's (offset-free) pattern spreads with the knob.
        disagreement[specificity] = float(np.mean(targets.std(axis=0)))
    assert disagreement[0.0] == pytest.approx(0.0, abs=1e-9)
    assert disagreement[0.0] < disagreement[0.6] < disagreement[1.0]


def test_emotions_change_the_audio() -> None:
    """Same speaker and utterance index: emotions differ in level/pitch, so features differ."""
    config = SyntheticConfig(n_speakers=2, speaker_specificity=0.0)
    loud = synthesize_utterance(config, 0, config.emotions.index("anger"), 0)
    quiet = synthesize_utterance(config, 0, config.emotions.index("sadness"), 0)
    assert np.sqrt(np.mean(loud**2)) > 2 * np.sqrt(np.mean(quiet**2))
    assert np.abs(loud).max() <= 1.0 and loud.dtype == np.float32


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="speaker_specificity"):
        SyntheticConfig(speaker_specificity=1.5)
    with pytest.raises(ValueError, match="two distinct"):
        SyntheticConfig(emotions=("anger",))
    with pytest.raises(ValueError, match="audio_format"):
        SyntheticConfig(audio_format="mp3")
