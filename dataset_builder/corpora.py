"""Corpus readers: one utterance table per corpus.

:func:`read_corpus` turns a corpus folder (or a manifest, or the embedded synthetic corpus)
into a :class:`datasets.Dataset` with the columns of :data:`UTTERANCE_FEATURES`:
``id, path, speaker, emotion, original_label, corpus, duration, text``. ``emotion`` is the
canonical word (:mod:`dataset_builder.vocabulary`), ``original_label`` the corpus' own,
``text`` a key of the sentence spoken (the same for every utterance of one scripted sentence;
None where a corpus has no fixed sentences), which content-disjoint episodes compare.

Readers never stop halfway on a bad file: an unreadable file, an unknown label, a name
that does not follow the corpus' convention or a missing file is *skipped and reported*.
The report (a :class:`CorpusReport`) is logged as one warning summary, its summary is
stored in ``dataset.info.description``, and ``read_corpus(..., return_report=True)``
returns it next to the dataset. Durations come from the file header (``soundfile.info``),
so reading a corpus decodes no audio.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import datasets

from modeling_icl_ser.audio_utils import audio_duration

from .vocabulary import normalize_emotion

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: The columns of every utterance table.
UTTERANCE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "path": datasets.Value("string"),
        "speaker": datasets.Value("string"),
        "emotion": datasets.Value("string"),
        "original_label": datasets.Value("string"),
        "corpus": datasets.Value("string"),
        "duration": datasets.Value("float64"),
        "text": datasets.Value("string"),  # sentence key; None without fixed sentences
    }
)

#: Corpora whose readers give no ``text`` (no fixed sentences); a manifest has texts only
#: with a ``text`` column.
TEXTLESS_CORPORA = ("iemocap", "synthetic")

AUDIO_EXTENSIONS = (".wav", ".flac")

# Label maps of the fixed-vocabulary corpora (corpus label -> canonical word).
RAVDESS_EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happiness",
    "04": "sadness",
    "05": "anger",
    "06": "fear",
    "07": "disgust",
    "08": "surprise",
}
CREMAD_EMOTIONS = {
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happiness",
    "NEU": "neutral",
    "SAD": "sadness",
}
EMODB_EMOTIONS = {
    "W": "anger",  # Wut
    "L": "boredom",  # Langeweile
    "E": "disgust",  # Ekel
    "A": "fear",  # Angst
    "F": "happiness",  # Freude
    "T": "sadness",  # Trauer
    "N": "neutral",
}
# The usual IEMOCAP 4-class setup: excitement is merged into happiness.
IEMOCAP_EMOTIONS = {
    "neu": "neutral",
    "hap": "happiness",
    "exc": "happiness",
    "ang": "anger",
    "sad": "sadness",
}
ESD_EMOTIONS = {
    "angry": "anger",
    "happy": "happiness",
    "neutral": "neutral",
    "sad": "sadness",
    "surprise": "surprise",
}
# ASED: the emotion letter + folder number that starts each name (one file writes "S4").
ASED_EMOTIONS = {
    "n1": "neutral",
    "f2": "fear",
    "h3": "happiness",
    "s4": "sadness",
    "a5": "anger",
}
# RAVDESS: the statement field SS of MM-VV-EE-II-SS-RR-AA.
RAVDESS_STATEMENTS = {
    "01": "Kids are talking by the door",
    "02": "Dogs are sitting by the door",
}
#: ESD records the same sentences in every emotion block of this many files.
ESD_SENTENCES = 350
# emotiontts-ko: the hundreds digit of the file number (read off the scripts, see its README).
EMOTIONTTS_KO_EMOTIONS = {
    "0": "neutral",
    "1": "happiness",
    "2": "sadness",
    "3": "anger",
}


@dataclass(frozen=True)
class SkippedFile:
    """One file a reader left out: its path, a short kind and the full reason."""

    path: str
    kind: str  # unreadable | unknown_label | not_speech | bad_name | missing | duplicate | bad_row
    reason: str


@dataclass
class CorpusReport:
    """What a reader read and what it skipped (and why)."""

    corpus: str
    data_dir: str
    n_utterances: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts of read and skipped files, grouped by kind, with examples."""
        text = f"{self.corpus}: read {self.n_utterances} utterances from {self.data_dir}"
        if not self.skipped:
            return text + "; skipped none."
        kinds = Counter(item.kind for item in self.skipped)
        parts = []
        for kind, count in sorted(kinds.items()):
            example = next(item for item in self.skipped if item.kind == kind)
            parts.append(f"{count} {kind} (e.g. {example.path}: {example.reason})")
        return text + f"; skipped {len(self.skipped)}: " + "; ".join(parts)


# A reader's candidate rows before the header check: id, path, speaker, emotion,
# original_label and, where known, text (corpus is added by the caller; duration after the
# header check).
_Candidate = dict[str, Optional[str]]
_ScanResult = tuple[list[_Candidate], list[SkippedFile]]


def _audio_files(root: Path) -> list[Path]:
    """All WAV/FLAC files below ``root``, in a stable order."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(AUDIO_EXTENSIONS) and not name.startswith("._"):
                found.append(Path(folder) / name)
    return found


def _stem(path: Path) -> str:
    return path.name.rsplit(".", 1)[0]


def _scan_ravdess(root: Path) -> _ScanResult:
    pattern = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
    rows, skipped = [], []
    for path in _audio_files(root):
        match = pattern.match(_stem(path))
        if not match:
            skipped.append(SkippedFile(str(path), "bad_name", "name is not MM-VV-EE-II-SS-RR-AA"))
            continue
        modality, channel, emotion, _, statement, _, actor = match.groups()
        if modality != "03" or channel != "01":
            # 01/02 are the video files, vocal channel 02 is song.
            skipped.append(
                SkippedFile(
                    str(path),
                    "not_speech",
                    f"modality {modality} / vocal channel {channel} is not audio-only speech (03/01)",
                )
            )
            continue
        if emotion not in RAVDESS_EMOTIONS:
            skipped.append(SkippedFile(str(path), "unknown_label", f"unknown emotion code {emotion!r}"))
            continue
        speaker = f"Actor_{actor}"
        rows.append(
            {
                "id": f"ravdess/{speaker}/{_stem(path)}",
                "path": str(path),
                "speaker": speaker,
                "emotion": RAVDESS_EMOTIONS[emotion],
                "original_label": emotion,
                "text": RAVDESS_STATEMENTS.get(statement, f"ravdess statement {statement}"),
            }
        )
    return rows, skipped


def _scan_cremad(root: Path) -> _ScanResult:
    pattern = re.compile(r"^(\d{4})_([A-Za-z]{3})_([A-Za-z]{3})_([A-Za-z]{2})$")
    rows, skipped = [], []
    for path in _audio_files(root):
        match = pattern.match(_stem(path))
        if not match:
            skipped.append(SkippedFile(str(path), "bad_name", "name is not SSSS_SEN_EMO_LV"))
            continue
        speaker, sentence, label, _ = match.groups()
        if label.upper() not in CREMAD_EMOTIONS:
            skipped.append(SkippedFile(str(path), "unknown_label", f"unknown emotion code {label!r}"))
            continue
        rows.append(
            {
                "id": f"cremad/{_stem(path)}",
                "path": str(path),
                "speaker": speaker,
                "emotion": CREMAD_EMOTIONS[label.upper()],
                "original_label": label.upper(),
                "text": f"cremad sentence {sentence.upper()}",
            }
        )
    return rows, skipped


def _scan_emodb(root: Path) -> _ScanResult:
    # 03a01Fa: speaker 03, text a01, emotion letter F (6th character), version a.
    pattern = re.compile(r"^(\d\d)([a-z]\d\d)([A-Za-z])([a-z]?)$")
    rows, skipped = [], []
    for path in _audio_files(root):
        match = pattern.match(_stem(path))
        if not match:
            skipped.append(SkippedFile(str(path), "bad_name", "name is not SSTTTEv (e.g. 03a01Fa)"))
            continue
        speaker, text, letter, _ = match.groups()
        if letter not in EMODB_EMOTIONS:
            skipped.append(SkippedFile(str(path), "unknown_label", f"unknown emotion letter {letter!r}"))
            continue
        rows.append(
            {
                "id": f"emodb/{_stem(path)}",
                "path": str(path),
                "speaker": speaker,
                "emotion": EMODB_EMOTIONS[letter],
                "original_label": letter,
                "text": f"emodb text {text}",
            }
        )
    return rows, skipped


_IEMOCAP_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(\S+)\s+(\S+)\s+\[")


def _scan_iemocap(root: Path) -> _ScanResult:
    rows, skipped = [], []
    sessions = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"Session\d+", p.name))
    for session in sessions:
        evaluation_dir = session / "dialog" / "EmoEvaluation"
        if not evaluation_dir.is_dir():
            continue
        for evaluation in sorted(evaluation_dir.glob("*.txt")):
            for line in evaluation.read_text(encoding="utf-8", errors="replace").splitlines():
                match = _IEMOCAP_LINE.match(line)
                if not match:
                    continue  # header lines, annotator lines (C-E1: ...), blank lines
                utterance, label = match.groups()
                dialog = utterance.rsplit("_", 1)[0]
                wav_dir = session / "sentences" / "wav" / dialog
                path = next(
                    (wav_dir / (utterance + ext) for ext in AUDIO_EXTENSIONS if (wav_dir / (utterance + ext)).is_file()),
                    wav_dir / (utterance + ".wav"),
                )
                if label not in IEMOCAP_EMOTIONS:
                    skipped.append(
                        SkippedFile(str(path), "unknown_label", f"label {label!r} is not in the 4-class map")
                    )
                    continue
                if not path.is_file():
                    skipped.append(SkippedFile(str(path), "missing", f"no audio for {utterance} listed in {evaluation.name}"))
                    continue
                # Ses01F_impro01_M003: session 01, the utterance's own speaker is the M.
                speaker = utterance[:5] + utterance.rsplit("_", 1)[1][0]
                rows.append(
                    {
                        "id": f"iemocap/{utterance}",
                        "path": str(path),
                        "speaker": speaker,
                        "emotion": IEMOCAP_EMOTIONS[label],
                        "original_label": label,
                    }
                )
    return rows, skipped


def _scan_esd(root: Path) -> _ScanResult:
    # <speaker>/<Emotion>/[any split folders/]<file>.wav
    rows, skipped = [], []
    for path in _audio_files(root):
        parts = path.relative_to(root).parts
        if len(parts) < 3:
            skipped.append(SkippedFile(str(path), "bad_name", "not inside <speaker>/<Emotion>/"))
            continue
        speaker, folder = parts[0], parts[1]
        if folder.lower() not in ESD_EMOTIONS:
            skipped.append(SkippedFile(str(path), "unknown_label", f"unknown emotion folder {folder!r}"))
            continue
        rows.append(
            {
                "id": "esd/" + path.relative_to(root).with_suffix("").as_posix(),
                "path": str(path),
                "speaker": speaker,
                "emotion": ESD_EMOTIONS[folder.lower()],
                "original_label": folder,
                "text": _esd_sentence(_stem(path)),
            }
        )
    return rows, skipped


def _esd_sentence(stem: str) -> Optional[str]:
    """``0011_000351`` -> ``"esd sentence 001"``: each emotion block of 350 files repeats the
    same sentences in order; None for a name without the six-digit index."""
    match = re.fullmatch(r".*_(\d{6})", stem)
    if not match or int(match.group(1)) < 1:
        return None
    return f"esd sentence {(int(match.group(1)) - 1) % ESD_SENTENCES + 1:03d}"


def _scan_ased(root: Path) -> _ScanResult:
    # 0E<Emotion>/xn-yy-aa-gg-bb: emotion code, sentence, repetition, gender, speaker.
    pattern = re.compile(r"^([A-Za-z]\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
    rows, skipped = [], []
    for path in _audio_files(root):
        match = pattern.match(_stem(path))
        if not match:
            skipped.append(SkippedFile(str(path), "bad_name", "name is not xn-yy-aa-gg-bb (e.g. n1-01-01-01-01)"))
            continue
        code, sentence, _, _, speaker = match.groups()
        if code.lower() not in ASED_EMOTIONS:
            skipped.append(SkippedFile(str(path), "unknown_label", f"unknown emotion code {code!r}"))
            continue
        # Speakers on bb alone: five speakers carry both gender codes in the release.
        rows.append(
            {
                "id": f"ased/{_stem(path)}",
                "path": str(path),
                "speaker": speaker,
                "emotion": ASED_EMOTIONS[code.lower()],
                "original_label": code,
                "text": f"ased sentence {sentence}",  # the words are not given; a key per sentence
            }
        )
    return rows, skipped


def _scan_emotiontts_ko(root: Path) -> _ScanResult:
    # <subset>/<speaker>/<speaker><NNNNN>.flac; the emotion is the hundreds digit of NNNNN.
    rows, skipped = [], []
    for path in _audio_files(root):
        parts = path.relative_to(root).parts
        if len(parts) != 3:
            skipped.append(SkippedFile(str(path), "bad_name", "not inside <subset>/<speaker>/"))
            continue
        subset, speaker = parts[0], parts[1]
        match = re.fullmatch(re.escape(speaker) + r"(\d{5})", _stem(path))
        if not match:
            skipped.append(SkippedFile(str(path), "bad_name", f"name is not {speaker}NNNNN"))
            continue
        code = match.group(1)[:3]
        if code[:2] != "00" or code[2] not in EMOTIONTTS_KO_EMOTIONS:
            skipped.append(SkippedFile(str(path), "unknown_label", f"unknown emotion code {code!r}"))
            continue
        rows.append(
            {
                "id": f"emotiontts-ko/{subset}/{speaker}/{_stem(path)}",
                "path": str(path),
                "speaker": speaker,
                "emotion": EMOTIONTTS_KO_EMOTIONS[code[2]],
                "original_label": code,
                # Which scripts repeat is not documented: each file number is its own sentence.
                "text": match.group(1),
            }
        )
    return rows, skipped


MANIFEST_COLUMNS = ("path", "speaker", "emotion")
_MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")


def find_manifest(data_dir: PathLike) -> Path:
    """The manifest file ``data_dir`` names: the file itself, or the one manifest in a folder.

    A folder may hold ``manifest.csv|tsv|jsonl`` or exactly one ``.csv/.tsv/.jsonl`` file.

    Raises:
        ValueError: if no single manifest can be identified.
    """
    path = Path(data_dir)
    if path.is_file():
        if path.suffix.lower() not in _MANIFEST_SUFFIXES:
            raise ValueError(f"Manifest {path} must be a .csv, .tsv or .jsonl file.")
        return path
    for suffix in _MANIFEST_SUFFIXES:
        if (path / f"manifest{suffix}").is_file():
            return path / f"manifest{suffix}"
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _MANIFEST_SUFFIXES)
    if len(candidates) != 1:
        raise ValueError(
            f"Folder {path} holds {len(candidates)} .csv/.tsv/.jsonl files; pass the manifest file "
            "itself as data_dir, or name it manifest.csv|tsv|jsonl."
        )
    return candidates[0]


def _read_manifest_rows(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; checks the required columns before returning."""
    if manifest.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest}:{number} is not valid JSON ({error}); fix or remove the line.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{manifest}:{number} must be a JSON object with {', '.join(MANIFEST_COLUMNS)}.")
            rows.append((number, row))
        columns = set().union(*(row.keys() for _, row in rows)) if rows else set()
        # Every row must carry the required keys, not just some row.
        for number, row in rows:
            missing = [c for c in MANIFEST_COLUMNS if c not in row]
            if missing:
                raise ValueError(
                    f"{manifest}:{number} lacks {missing}; every manifest row needs the columns "
                    f"{', '.join(MANIFEST_COLUMNS)} (has {sorted(row)})."
                )
    else:
        delimiter = "\t" if manifest.suffix.lower() == ".tsv" else ","
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = {name.strip() for name in (reader.fieldnames or [])}
            rows = [(number, {k.strip(): v for k, v in row.items() if k}) for number, row in enumerate(reader, start=2)]
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"Manifest {manifest} lacks the column(s) {missing}; it needs {', '.join(MANIFEST_COLUMNS)} "
            f"(found {sorted(columns)}). Add the column(s) to the header."
        )
    return rows


def _scan_manifest(manifest: Path, corpus: str = "manifest") -> _ScanResult:
    rows, skipped = [], []
    base = manifest.parent
    for number, row in _read_manifest_rows(manifest):
        where = f"{manifest.name}:{number}"
        raw_path = str(row.get("path") or "").strip()
        speaker = str(row.get("speaker") or "").strip()
        label = str(row.get("emotion") or "").strip()
        if not raw_path or not speaker:
            skipped.append(SkippedFile(where, "bad_row", "empty path or speaker"))
            continue
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = base / path  # relative paths resolve against the manifest's folder
        if not label:
            skipped.append(SkippedFile(str(path), "unknown_label", f"empty emotion at {where}"))
            continue
        if not path.is_file():
            skipped.append(SkippedFile(str(path), "missing", f"file listed at {where} does not exist"))
            continue
        row_corpus = str(row.get("corpus") or corpus).strip()
        utterance_id = str(row.get("id") or "").strip()
        if not utterance_id:
            try:
                relative = path.relative_to(base).with_suffix("").as_posix()
            except ValueError:  # outside the manifest's folder: keep the absolute path
                relative = path.with_suffix("").as_posix().lstrip("/")
            utterance_id = f"{row_corpus}/{relative}"
        rows.append(
            {
                "id": utterance_id,
                "path": str(path),
                "speaker": speaker,
                "emotion": normalize_emotion(label),
                "original_label": label,
                "corpus": row_corpus,
                "text": str(row.get("text") or "").strip() or None,  # optional column
            }
        )
    return rows, skipped


# name -> (scanner, what the folder should hold, for error messages)
_SCANNERS: dict[str, tuple[Callable[[Path], _ScanResult], str]] = {
    "ravdess": (_scan_ravdess, "Actor_NN/03-01-EE-II-SS-RR-NN.wav|.flac files"),
    "cremad": (_scan_cremad, "AudioWAV/1001_DFA_ANG_XX.wav files"),
    "emodb": (_scan_emodb, "wav/03a01Fa.wav files"),
    "iemocap": (_scan_iemocap, "Session1..5/dialog/EmoEvaluation/*.txt and Session*/sentences/wav/"),
    "esd": (_scan_esd, "<speaker>/<Angry|Happy|Neutral|Sad|Surprise>/*.wav files"),
    "ased": (_scan_ased, "0E<Emotion>/xn-yy-aa-gg-bb.flac files"),
    "emotiontts-ko": (_scan_emotiontts_ko, "<subset>/<speaker>/<speaker>NNNNN.flac files"),
    "manifest": (_scan_manifest, "a manifest .csv/.tsv/.jsonl with path, speaker, emotion columns"),
}

#: Names accepted by :func:`read_corpus`.
CORPORA: tuple[str, ...] = tuple(_SCANNERS) + ("synthetic",)


def check_corpus_name(name: str) -> str:
    """Return ``name`` if it is a known corpus; raise ``ValueError`` listing them otherwise."""
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; use one of {', '.join(CORPORA)} (for any other corpus, write a manifest).")
    return name


def check_texts_known(names) -> None:
    """Raise ``ValueError`` for a corpus whose reader gives no ``text`` (content-disjoint
    episodes need one), before anything is read."""
    textless = [name for name in names if name in TEXTLESS_CORPORA]
    if textless:
        with_texts = ", ".join(name for name in CORPORA if name not in TEXTLESS_CORPORA)
        raise ValueError(
            f"content_disjoint needs each utterance's sentence (`text`), but {', '.join(map(repr, textless))} "
            f"has no fixed sentences; corpora with texts: {with_texts} (a manifest needs a `text` column). "
            "Drop content_disjoint or choose such a corpus."
        )


def read_corpus(
    name: str,
    data_dir: Optional[PathLike] = None,
    *,
    return_report: bool = False,
    **synthetic_options: Any,
) -> Union[datasets.Dataset, tuple[datasets.Dataset, CorpusReport]]:
    """Read a corpus into an utterance table.

    Args:
        name: One of :data:`CORPORA` (``ravdess, cremad, emodb, iemocap, esd, ased,
            emotiontts-ko, manifest, synthetic``).
        data_dir: The corpus folder; for ``manifest`` the manifest file or a folder holding
            one; for ``synthetic`` optional, the cache root to generate into (default
            ``$ICL_SER_CACHE`` or ``~/.cache/icl_ser``).
        return_report: Also return the :class:`CorpusReport` of skipped files.
        **synthetic_options: Generator parameters for ``synthetic`` (fields of
            :class:`dataset_builder.synthetic.SyntheticConfig`); not accepted for others.

    Returns:
        A :class:`datasets.Dataset` sorted by ``id`` with the columns of
        :data:`UTTERANCE_FEATURES` (and the report if ``return_report``).

    Raises:
        ValueError: unknown corpus, missing/nonexistent ``data_dir``, a manifest without a
            required column, or a folder with no readable utterance of that corpus.
    """
    check_corpus_name(name)
    if name != "synthetic" and synthetic_options:
        raise ValueError(f"Options {sorted(synthetic_options)} apply to the synthetic corpus only, not {name!r}.")
    if name == "synthetic":
        from .synthetic import SyntheticConfig, generate_corpus

        folder = generate_corpus(SyntheticConfig(**synthetic_options), cache_root=data_dir)
        root = folder / "manifest.jsonl"
        rows, skipped = _scan_manifest(root, corpus="synthetic")
    else:
        if data_dir is None:
            raise ValueError(f"Corpus {name!r} needs data_dir=: the folder holding its {_SCANNERS[name][1]}.")
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise ValueError(f"data_dir {str(root)!r} does not exist; pass the folder holding the {name} {_SCANNERS[name][1]}.")
        if name == "manifest":
            root = find_manifest(root)
            rows, skipped = _scan_manifest(root)
        else:
            if not root.is_dir():
                raise ValueError(f"data_dir {str(root)!r} is not a folder; "
                                 f"pass the folder holding the {name} {_SCANNERS[name][1]}.")
            rows, skipped = _SCANNERS[name][0](root)

    table: dict[str, list[Any]] = {column: [] for column in UTTERANCE_FEATURES}
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            skipped.append(SkippedFile(row["path"], "duplicate", f"id {row['id']!r} already read (e.g. .wav and .flac)"))
            continue
        try:
            duration = audio_duration(row["path"])
        except Exception as error:  # soundfile raises several types for corrupt files
            skipped.append(SkippedFile(row["path"], "unreadable", f"{type(error).__name__}: {error}".strip()[:200]))
            continue
        if duration <= 0:
            skipped.append(SkippedFile(row["path"], "unreadable", "no audio frames"))
            continue
        seen.add(row["id"])
        table["corpus"].append(row.get("corpus", name))
        table["duration"].append(duration)
        table["text"].append(row.get("text"))  # None where the corpus has no fixed sentences
        for column in ("id", "path", "speaker", "emotion", "original_label"):
            table[column].append(row[column])

    report = CorpusReport(corpus=name, data_dir=str(root), n_utterances=len(table["id"]), skipped=skipped)
    if skipped:
        logger.warning(report.summary())
    if not table["id"]:
        raise ValueError(
            f"{root} holds no readable {name} utterances (expected {_SCANNERS.get(name, ('', 'generated files'))[1]}). "
            f"Check data_dir and the corpus name. {report.summary()}"
        )
    order = sorted(range(len(table["id"])), key=table["id"].__getitem__)  # stable ids, stable order
    table = {column: [values[i] for i in order] for column, values in table.items()}
    info = datasets.DatasetInfo(description=report.summary(), features=UTTERANCE_FEATURES)
    dataset = datasets.Dataset.from_dict(table, features=UTTERANCE_FEATURES, info=info)
    return (dataset, report) if return_report else dataset
