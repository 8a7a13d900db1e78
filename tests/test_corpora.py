"""Corpus readers on generated fixture folders (each corpus' naming) and the real RAVDESS."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from dataset_builder import CANONICAL_EMOTIONS, CORPORA, UTTERANCE_FEATURES, normalize_emotion, read_corpus


def write_audio(path: Path, seconds: float = 0.2, rate: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    """A short noisy tone as WAV or FLAC (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * rate)
    rng = np.random.default_rng(seed)
    mono = 0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / rate) + 0.01 * rng.standard_normal(n)
    samples = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    soundfile.write(path, samples.astype(np.float32), rate)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF\x00\x00not really audio at all")
    return path


def kinds(report) -> Counter:
    return Counter(item.kind for item in report.skipped)


# ----------------------------------------------------------------------------- RAVDESS
@pytest.fixture
def ravdess_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ravdess"
    write_audio(root / "Actor_01" / "03-01-01-01-01-01-01.wav")
    write_audio(root / "Actor_01" / "03-01-05-02-01-02-01.flac", channels=2)  # stereo
    write_audio(root / "Actor_01" / "03-01-03-01-02-01-01.wav", rate=44100, seconds=0.5)  # 44.1 kHz
    write_audio(root / "Actor_02" / "03-01-08-01-01-01-02.flac")
    write_audio(root / "Actor_02" / "03-01-06-01-01-01-02.wav")
    write_garbage(root / "Actor_02" / "03-01-04-01-01-01-02.wav")  # unreadable
    write_audio(root / "Actor_02" / "03-01-09-01-01-01-02.wav")  # unknown emotion code 09
    write_audio(root / "Actor_02" / "03-02-04-01-01-01-02.wav")  # song, not speech
    write_audio(root / "Actor_02" / "notes.wav")  # not a RAVDESS name
    (root / "README.txt").write_text("ignored")
    return root


def test_ravdess_fixture(ravdess_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        table, report = read_corpus("ravdess", ravdess_dir, return_report=True)
    assert table.features == UTTERANCE_FEATURES
    assert table.num_rows == 5 == report.n_utterances
    rows = {row["id"]: row for row in table}
    assert set(rows) == {
        "ravdess/Actor_01/03-01-01-01-01-01-01",
        "ravdess/Actor_01/03-01-05-02-01-02-01",
        "ravdess/Actor_01/03-01-03-01-02-01-01",
        "ravdess/Actor_02/03-01-08-01-01-01-02",
        "ravdess/Actor_02/03-01-06-01-01-01-02",
    }
    assert rows["ravdess/Actor_01/03-01-05-02-01-02-01"]["emotion"] == "anger"
    assert rows["ravdess/Actor_01/03-01-05-02-01-02-01"]["original_label"] == "05"
    assert rows["ravdess/Actor_01/03-01-03-01-02-01-01"]["emotion"] == "happiness"
    assert rows["ravdess/Actor_02/03-01-08-01-01-01-02"]["emotion"] == "surprise"
    assert rows["ravdess/Actor_02/03-01-06-01-01-01-02"]["emotion"] == "fear"
    assert rows["ravdess/Actor_01/03-01-03-01-02-01-01"]["duration"] == pytest.approx(0.5, abs=1e-3)
    # The statement field SS: 01 kids, 02 dogs.
    assert rows["ravdess/Actor_01/03-01-05-02-01-02-01"]["text"] == "Kids are talking by the door"
    assert rows["ravdess/Actor_01/03-01-03-01-02-01-01"]["text"] == "Dogs are sitting by the door"
    assert set(table["speaker"]) == {"Actor_01", "Actor_02"}
    assert set(table["corpus"]) == {"ravdess"}
    assert kinds(report) == {"unreadable": 1, "unknown_label": 1, "not_speech": 1, "bad_name": 1}
    assert "skipped 4" in table.info.description
    assert any("skipped 4" in record.getMessage() for record in caplog.records)
    # The readable stereo and 44.1 kHz files decode through the shared loader.
    from modeling_icl_ser.audio_utils import load_audio

    assert load_audio(rows["ravdess/Actor_01/03-01-05-02-01-02-01"]["path"]).ndim == 1


def test_ids_are_stable_and_sorted(ravdess_dir: Path) -> None:
    first, second = read_corpus("ravdess", ravdess_dir), read_corpus("ravdess", ravdess_dir)
    assert first["id"] == second["id"] == sorted(first["id"])
    assert len(set(first["id"])) == first.num_rows


def test_duplicate_wav_and_flac_is_reported(tmp_path: Path) -> None:
    write_audio(tmp_path / "Actor_01" / "03-01-01-01-01-01-01.wav")
    write_audio(tmp_path / "Actor_01" / "03-01-01-01-01-01-01.flac")
    table, report = read_corpus("ravdess", tmp_path, return_report=True)
    assert table.num_rows == 1
    assert kinds(report) == {"duplicate": 1}


# ----------------------------------------------------------------------------- CREMA-D
def test_cremad(tmp_path: Path) -> None:
    audio = tmp_path / "AudioWAV"
    write_audio(audio / "1001_DFA_ANG_XX.wav")
    write_audio(audio / "1001_IEO_HAP_HI.flac", rate=44100)
    write_audio(audio / "1002_DFA_NEU_XX.wav", channels=2)
    write_audio(audio / "1002_DFA_XYZ_XX.wav")  # unknown label
    write_garbage(audio / "1002_IEO_SAD_LO.wav")  # unreadable
    table, report = read_corpus("cremad", tmp_path, return_report=True)
    assert dict(zip(table["id"], table["emotion"])) == {
        "cremad/1001_DFA_ANG_XX": "anger",
        "cremad/1001_IEO_HAP_HI": "happiness",
        "cremad/1002_DFA_NEU_XX": "neutral",
    }
    assert sorted(set(table["speaker"])) == ["1001", "1002"]
    assert kinds(report) == {"unknown_label": 1, "unreadable": 1}
    assert dict(zip(table["id"], table["text"])) == {
        "cremad/1001_DFA_ANG_XX": "cremad sentence DFA",
        "cremad/1001_IEO_HAP_HI": "cremad sentence IEO",
        "cremad/1002_DFA_NEU_XX": "cremad sentence DFA",
    }


# ----------------------------------------------------------------------------- EmoDB
def test_emodb(tmp_path: Path) -> None:
    wav = tmp_path / "wav"
    write_audio(wav / "03a01Fa.wav")
    write_audio(wav / "08b02Wb.wav")
    write_audio(wav / "10a05La.flac", rate=44100)
    write_audio(wav / "10a05Xa.wav")  # unknown letter
    table, report = read_corpus("emodb", tmp_path, return_report=True)
    rows = {row["id"]: row for row in table}
    assert rows["emodb/03a01Fa"]["emotion"] == "happiness" and rows["emodb/03a01Fa"]["speaker"] == "03"
    assert rows["emodb/08b02Wb"]["emotion"] == "anger" and rows["emodb/08b02Wb"]["original_label"] == "W"
    assert rows["emodb/10a05La"]["emotion"] == "boredom"
    assert [rows[i]["text"] for i in ("emodb/03a01Fa", "emodb/08b02Wb", "emodb/10a05La")] == [
        "emodb text a01", "emodb text b02", "emodb text a05"]
    assert kinds(report) == {"unknown_label": 1}


# ----------------------------------------------------------------------------- IEMOCAP
def test_iemocap(tmp_path: Path) -> None:
    session = tmp_path / "Session1"
    evaluation = session / "dialog" / "EmoEvaluation"
    evaluation.mkdir(parents=True)
    (evaluation / "Ses01F_impro01.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\n"
        "[10.0100 - 11.3925]\tSes01F_impro01_M001\tfru\t[2.5000, 3.5000, 3.0000]\n"
        "[14.8872 - 18.0175]\tSes01F_impro01_M002\tang\t[2.0000, 3.5000, 3.5000]\n"
        "[19.2000 - 21.0000]\tSes01F_impro01_F003\texc\t[3.5000, 3.5000, 3.0000]\n"
        "[22.0000 - 24.0000]\tSes01F_impro01_M004\tsad\t[1.5000, 2.0000, 2.0000]\n"
    )
    (evaluation / "Categorical").mkdir()  # sub-folders are not evaluation files
    (evaluation / "Categorical" / "Ses01F_impro01_e1_cat.txt").write_text("Ses01F_impro01_F000 :Neutral state; ()\n")
    wav = session / "sentences" / "wav" / "Ses01F_impro01"
    write_audio(wav / "Ses01F_impro01_F000.wav")
    write_audio(wav / "Ses01F_impro01_M001.wav")
    write_audio(wav / "Ses01F_impro01_F003.wav", rate=44100)
    write_audio(wav / "Ses01F_impro01_M004.flac", channels=2)
    # M002 (ang) has no audio file.
    table, report = read_corpus("iemocap", tmp_path, return_report=True)
    rows = {row["id"]: row for row in table}
    assert set(rows) == {"iemocap/Ses01F_impro01_F000", "iemocap/Ses01F_impro01_F003", "iemocap/Ses01F_impro01_M004"}
    assert rows["iemocap/Ses01F_impro01_F003"]["emotion"] == "happiness"
    assert rows["iemocap/Ses01F_impro01_F003"]["original_label"] == "exc"
    assert rows["iemocap/Ses01F_impro01_M004"]["speaker"] == "Ses01M"
    assert set(table["text"]) == {None}  # improvised and scripted dialogues: no repeated sentences
    assert rows["iemocap/Ses01F_impro01_F000"]["speaker"] == "Ses01F"
    assert kinds(report) == {"unknown_label": 1, "missing": 1}


# ----------------------------------------------------------------------------- ESD
def test_esd(tmp_path: Path) -> None:
    write_audio(tmp_path / "0011" / "Angry" / "0011_000351.wav")
    write_audio(tmp_path / "0011" / "Happy" / "train" / "0011_000701.wav")  # nested split folder
    write_audio(tmp_path / "0012" / "Sad" / "evaluation" / "0012_001051.flac", rate=44100)
    write_audio(tmp_path / "0012" / "Surprise" / "0012_001401.wav", channels=2)
    write_audio(tmp_path / "0012" / "Bored" / "0012_001801.wav")  # unknown emotion folder
    (tmp_path / "0011" / "0011.txt").write_text("0011_000351\tsome text\tAngry\n")
    table, report = read_corpus("esd", tmp_path, return_report=True)
    rows = {row["id"]: row for row in table}
    assert set(rows) == {
        "esd/0011/Angry/0011_000351",
        "esd/0011/Happy/train/0011_000701",
        "esd/0012/Sad/evaluation/0012_001051",
        "esd/0012/Surprise/0012_001401",
    }
    assert [rows[i]["emotion"] for i in sorted(rows)] == ["anger", "happiness", "sadness", "surprise"]
    assert rows["esd/0012/Sad/evaluation/0012_001051"]["speaker"] == "0012"
    # 351, 701, 1051, 1401: the first sentence of each emotion block of 350.
    assert set(table["text"]) == {"esd sentence 001"}
    assert kinds(report) == {"unknown_label": 1}


# ----------------------------------------------------------------------------- manifests
def _manifest_audio(root: Path) -> list[Path]:
    return [
        write_audio(root / "audio" / "a.wav"),
        write_audio(root / "audio" / "b.flac", rate=44100, channels=2),
        write_audio(root / "elsewhere.wav"),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_manifest_formats(tmp_path: Path, suffix: str) -> None:
    a, b, elsewhere = _manifest_audio(tmp_path)
    folder = tmp_path / "meta"
    folder.mkdir()
    manifest = folder / f"list{suffix}"
    rows = [
        {"path": "../audio/a.wav", "speaker": "s1", "emotion": "Angry"},  # relative to the manifest
        {"path": str(b), "speaker": "s1", "emotion": "joy"},  # absolute
        {"path": "../elsewhere.wav", "speaker": "s2", "emotion": "Pride"},  # kept as given, lower-cased
        {"path": "../audio/missing.wav", "speaker": "s2", "emotion": "sad"},
        {"path": "../audio/a.wav", "speaker": "s3", "emotion": ""},
    ]
    if suffix == ".jsonl":
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        manifest.write_text("path" + sep + "speaker" + sep + "emotion\n" + "".join(
            sep.join([row["path"], row["speaker"], row["emotion"]]) + "\n" for row in rows
        ))
    for data_dir in (manifest, folder):  # the file itself, or the folder holding the only one
        table, report = read_corpus("manifest", data_dir, return_report=True)
        assert table.num_rows == 3
        assert sorted(zip(table["speaker"], table["emotion"], table["original_label"])) == [
            ("s1", "anger", "Angry"), ("s1", "happiness", "joy"), ("s2", "pride", "Pride"),
        ]
        assert {Path(p).resolve() for p in table["path"]} == {a.resolve(), b.resolve(), elsewhere.resolve()}
        assert kinds(report) == {"missing": 1, "unknown_label": 1}
        assert len(set(table["id"])) == 3
        assert set(table["text"]) == {None}  # no text column


def test_manifest_missing_column(tmp_path: Path) -> None:
    write_audio(tmp_path / "a.wav")
    (tmp_path / "manifest.csv").write_text("path,emotion\na.wav,happy\n")
    with pytest.raises(ValueError, match=r"speaker"):
        read_corpus("manifest", tmp_path)
    (tmp_path / "manifest.csv").unlink()
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav", "speaker": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"emotion"):
        read_corpus("manifest", tmp_path / "m.jsonl")


def test_manifest_id_and_corpus_columns(tmp_path: Path) -> None:
    write_audio(tmp_path / "a.wav")
    (tmp_path / "manifest.csv").write_text("id,path,speaker,emotion,corpus\nmine/1,a.wav,s,calm,mycorpus\n")
    table = read_corpus("manifest", tmp_path)
    assert table[0]["id"] == "mine/1" and table[0]["corpus"] == "mycorpus" and table[0]["emotion"] == "calm"


def test_manifest_text_column(tmp_path: Path) -> None:
    write_audio(tmp_path / "a.wav")
    write_audio(tmp_path / "b.wav")
    (tmp_path / "manifest.csv").write_text("path,speaker,emotion,text\na.wav,s,calm, Hello there \nb.wav,s,anger,\n")
    table = read_corpus("manifest", tmp_path)
    assert table.features == UTTERANCE_FEATURES
    assert table["text"] == ["Hello there", None]  # stripped; empty is None


# ----------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown corpus 'tess'"):
        read_corpus("tess", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        read_corpus("ravdess", tmp_path / "nope")
    with pytest.raises(ValueError, match="needs data_dir"):
        read_corpus("cremad")
    with pytest.raises(ValueError, match="no readable emodb utterances"):
        read_corpus("emodb", tmp_path)
    write_garbage(tmp_path / "wav" / "03a01Fa.wav")
    with pytest.raises(ValueError, match="unreadable"):  # all skipped: the report is in the error
        read_corpus("emodb", tmp_path)
    with pytest.raises(ValueError, match="synthetic corpus only"):
        read_corpus("emodb", tmp_path, n_speakers=3)
    (tmp_path / "a.csv").write_text("path,speaker,emotion\n")
    (tmp_path / "b.csv").write_text("path,speaker,emotion\n")
    with pytest.raises(ValueError, match="pass the manifest file"):
        read_corpus("manifest", tmp_path)
    assert set(CORPORA) == {"ravdess", "cremad", "emodb", "iemocap", "esd", "ased", "emotiontts-ko", "manifest", "synthetic"}


def test_normalize_emotion() -> None:
    assert normalize_emotion(" Angry ") == "anger"
    assert normalize_emotion("FEARFUL") == "fear"
    assert normalize_emotion("neu") == "neutral"
    assert normalize_emotion("Pride") == "pride"
    with pytest.raises(ValueError):
        normalize_emotion("  ")


# ----------------------------------------------------------------------------- shared copies
def shared_root(name: str, marker: str) -> Path | None:
    """The shared copy of corpus ``name`` ($ICL_SER_<NAME>, or ../shared/data/<name>), if it holds ``marker``."""
    variable = "ICL_SER_" + name.upper().replace("-", "_")
    candidates = [os.environ.get(variable), f"/work/shared/data/{name}",
                  Path(__file__).resolve().parents[2] / "shared" / "data" / name]
    for candidate in candidates:
        if candidate and (Path(candidate) / marker).is_dir():
            return Path(candidate)
    return None


def ravdess_root() -> Path | None:
    return shared_root("ravdess", "Actor_01")


# ----------------------------------------------------------------------------- ASED
def test_ased(tmp_path: Path) -> None:
    root = tmp_path / "ased"
    write_audio(root / "01Neutral" / "n1-01-01-01-01.flac")
    write_audio(root / "02Fearful" / "f2-03-02-02-01.flac")
    write_audio(root / "04Sad" / "S4-04-02-01-29.flac")  # the release's one upper-case code
    write_audio(root / "05Angry" / "a5-01-01-02-09.flac")  # speaker 09, male code
    write_audio(root / "05Angry" / "a5-01-02-01-09.flac")  # speaker 09, female code: same speaker
    write_audio(root / "03Happy" / "x9-01-01-01-01.flac")  # unknown emotion code
    write_audio(root / "03Happy" / "h3-01-01-01.flac")  # not xn-yy-aa-gg-bb
    table, report = read_corpus("ased", root, return_report=True)
    rows = {row["id"]: row for row in table}
    assert set(rows) == {"ased/n1-01-01-01-01", "ased/f2-03-02-02-01", "ased/S4-04-02-01-29",
                         "ased/a5-01-01-02-09", "ased/a5-01-02-01-09"}
    assert {r["speaker"] for r in rows.values()} == {"01", "09", "29"}
    assert rows["ased/S4-04-02-01-29"]["emotion"] == "sadness"
    assert rows["ased/S4-04-02-01-29"]["original_label"] == "S4"
    assert rows["ased/f2-03-02-02-01"]["emotion"] == "fear"
    assert {rows[i]["speaker"] for i in ("ased/a5-01-01-02-09", "ased/a5-01-02-01-09")} == {"09"}
    assert rows["ased/f2-03-02-02-01"]["text"] == "ased sentence 03"
    assert rows["ased/a5-01-01-02-09"]["text"] == rows["ased/n1-01-01-01-01"]["text"] == "ased sentence 01"
    assert kinds(report) == Counter({"unknown_label": 1, "bad_name": 1})
    assert set(table["corpus"]) == {"ased"}


# ----------------------------------------------------------------------------- emotiontts-ko
def test_emotiontts_ko(tmp_path: Path) -> None:
    root = tmp_path / "emotiontts-ko"
    write_audio(root / "plain-to-emotional" / "ema" / "ema00001.flac")
    write_audio(root / "plain-to-emotional" / "ema" / "ema00105.flac")
    write_audio(root / "emotional-to-emotional" / "nea" / "nea00201.flac")
    write_audio(root / "emotional-to-emotional" / "nea" / "nea00305.flac")
    write_audio(root / "emotional-to-emotional" / "nea" / "nea00401.flac")  # no emotion 4
    write_audio(root / "emotional-to-emotional" / "nea" / "neb00001.flac")  # another speaker's name
    write_audio(root / "loose00001.flac")  # not inside <subset>/<speaker>/
    table, report = read_corpus("emotiontts-ko", root, return_report=True)
    rows = {row["id"]: row for row in table}
    assert set(rows) == {"emotiontts-ko/plain-to-emotional/ema/ema00001", "emotiontts-ko/plain-to-emotional/ema/ema00105",
                         "emotiontts-ko/emotional-to-emotional/nea/nea00201",
                         "emotiontts-ko/emotional-to-emotional/nea/nea00305"}
    assert [rows[i]["emotion"] for i in sorted(rows)] == ["sadness", "anger", "neutral", "happiness"]
    assert rows["emotiontts-ko/emotional-to-emotional/nea/nea00305"]["original_label"] == "003"
    assert set(table["speaker"]) == {"ema", "nea"}
    # Each file number is its own script (the README does not say which repeat).
    assert rows["emotiontts-ko/plain-to-emotional/ema/ema00105"]["text"] == "00105"
    assert len(set(table["text"])) == table.num_rows
    assert kinds(report) == Counter({"unknown_label": 1, "bad_name": 2})


@pytest.mark.skipif(shared_root("ased", "01Neutral") is None, reason="shared ASED not found (set ICL_SER_ASED)")
def test_real_ased() -> None:
    table, report = read_corpus("ased", shared_root("ased", "01Neutral"), return_report=True)
    assert report.skipped == []
    assert table.num_rows == 2470 and len(set(table["id"])) == 2470
    assert len(set(table["speaker"])) == 65
    assert set(table["emotion"]) == {"neutral", "fear", "happiness", "sadness", "anger"}
    counts = Counter(table["speaker"]).values()
    assert (min(counts), max(counts)) == (4, 70)  # the README's range


@pytest.mark.skipif(shared_root("emotiontts-ko", "plain-to-emotional") is None,
                    reason="shared emotiontts-ko not found (set ICL_SER_EMOTIONTTS_KO)")
def test_real_emotiontts_ko() -> None:
    table, report = read_corpus("emotiontts-ko", shared_root("emotiontts-ko", "plain-to-emotional"), return_report=True)
    assert report.skipped == []
    assert table.num_rows == 300
    assert len(set(table["speaker"])) == 15
    assert set(table["emotion"]) == {"neutral", "happiness", "sadness", "anger"}
    # 20 per speaker, 5 per emotion.
    assert set(Counter(zip(table["speaker"], table["emotion"])).values()) == {5}


# ----------------------------------------------------------------------------- real RAVDESS


@pytest.mark.skipif(ravdess_root() is None, reason="real RAVDESS not found (set ICL_SER_RAVDESS)")
def test_real_ravdess() -> None:
    table, report = read_corpus("ravdess", ravdess_root(), return_report=True)
    assert table.num_rows == 1440
    assert len(set(table["speaker"])) == 24
    assert set(table["emotion"]) == {"neutral", "calm", "happiness", "sadness", "anger", "fear", "disgust", "surprise"}
    assert set(table["emotion"]) <= set(CANONICAL_EMOTIONS)
    assert report.skipped == []
    assert len(set(table["id"])) == 1440
    assert Counter(table["speaker"]).most_common()[-1][1] == 60
    assert min(table["duration"]) > 1.0
    # Two statements, each spoken by every actor in every emotion.
    texts = Counter(zip(table["speaker"], table["text"]))
    assert set(texts.values()) == {30} and {text for _, text in texts} == {
        "Kids are talking by the door", "Dogs are sitting by the door"}
