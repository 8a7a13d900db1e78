"""Virtual speakers: one consistent, audible voice transform per virtual speaker."""

import numpy as np
import pytest
import soundfile as sf

from dataset_builder.virtual_speakers import VoiceTransform, add_virtual_speakers, virtual_speaker_transforms

RATE = 16000


def tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * RATE / samples.size)


@pytest.mark.parametrize("ratio, tempo", [(1.1, 1.0), (0.9, 1.0), (1.0, 0.85), (1.125, 1.12)])
def test_transform_scales_pitch_by_the_ratio_and_length_by_the_tempo(ratio, tempo):
    out = VoiceTransform(spectral_ratio=ratio, tempo=tempo).apply(tone(200.0), RATE)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.size == pytest.approx(RATE / tempo, rel=0.01)
    middle = out[out.size // 4 : 3 * out.size // 4]
    assert peak_hz(middle) == pytest.approx(200.0 * ratio, abs=4.0)


def test_eq_boost_never_clips_and_bad_input_is_refused():
    loud = 0.98 * tone(1000.0) / 0.3
    out = VoiceTransform(eq_center_hz=1000.0, eq_gain_db=8.0).apply(loud, RATE)
    assert np.abs(out).max() <= 0.99 + 1e-6
    with pytest.raises(ValueError, match="mono"):
        VoiceTransform().apply(np.zeros((100, 2), dtype=np.float32), RATE)


def test_transforms_are_seeded_per_speaker_and_differ():
    one = virtual_speaker_transforms(["a", "b"], 3, seed=0)
    assert list(one) == ["a@v1", "a@v2", "a@v3", "b@v1", "b@v2", "b@v3"]
    assert virtual_speaker_transforms(["b"], 3, seed=0)["b@v2"] == one["b@v2"]  # independent of the others
    assert len(set(one.values())) == 6
    assert virtual_speaker_transforms(["a"], 1, seed=1)["a@v1"] != one["a@v1"]
    with pytest.raises(ValueError, match="already virtual"):
        virtual_speaker_transforms(["a@v1"], 1)


def test_table_gets_rendered_rows_for_the_listed_speakers_only(tmp_path):
    rows = []
    for speaker in ("s1", "s2"):
        for i, emotion in enumerate(("anger", "sadness")):
            path = tmp_path / f"{speaker}_{i}.wav"
            sf.write(path, tone(150.0 + 40 * i, 0.5), RATE)
            rows.append({"id": f"{speaker}_{i}", "path": str(path), "speaker": speaker, "emotion": emotion,
                         "original_label": emotion, "corpus": "toy", "duration": 0.5})
    table = add_virtual_speakers(rows, ["s1"], 2, cache_dir=tmp_path / "virtual")
    assert len(table) == 4 + 2 * 2
    added = [row for row in table if "@v" in row["speaker"]]
    assert {row["speaker"] for row in added} == {"s1@v1", "s1@v2"}
    assert {row["id"] for row in added} == {"s1_0@v1", "s1_1@v1", "s1_0@v2", "s1_1@v2"}
    assert all(row["emotion"] in ("anger", "sadness") and sf.info(row["path"]).samplerate == RATE for row in added)
    assert not list((tmp_path / "virtual").glob(".virtual-*"))  # no temporary left behind
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "virtual").glob("*.flac")}
    add_virtual_speakers(rows, ["s1"], 2, cache_dir=tmp_path / "virtual")  # second call: from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "virtual").glob("*.flac")} == mtimes
    with pytest.raises(ValueError, match="Unknown speakers"):
        add_virtual_speakers(rows, ["nobody"], 1, cache_dir=tmp_path / "virtual")


def test_virtual_speakers_keep_the_source_text(tmp_path):
    from datasets import Dataset

    from dataset_builder import UTTERANCE_FEATURES

    rows = []
    for i, emotion in enumerate(("anger", "sadness")):
        path = tmp_path / f"s1_{i}.wav"
        sf.write(path, tone(150.0 + 40 * i, 0.5), RATE)
        rows.append({"id": f"s1_{i}", "path": str(path), "speaker": "s1", "emotion": emotion,
                     "original_label": emotion, "corpus": "toy", "duration": 0.5, "text": f"sentence {i}"})
    table = add_virtual_speakers(Dataset.from_list(rows, features=UTTERANCE_FEATURES), ["s1"], 1,
                                 cache_dir=tmp_path / "virtual")
    assert dict(zip(table["id"], table["text"])) == {"s1_0": "sentence 0", "s1_1": "sentence 1",
                                                     "s1_0@v1": "sentence 0", "s1_1@v1": "sentence 1"}
    # A corpus without sentences keeps a string column of None (not a null-typed one).
    textless = Dataset.from_list([{**row, "text": None} for row in rows], features=UTTERANCE_FEATURES)
    table = add_virtual_speakers(textless, ["s1"], 1, cache_dir=tmp_path / "virtual")
    assert table.features == UTTERANCE_FEATURES and set(table["text"]) == {None}
