"""Processor (feature extractor + tokenizer) and Trainer collator for icl-ser.

The processor turns a query utterance and a speaker's enrollment (utterance, label) pairs into
one left-padded prompt (see docs/ARCHITECTURE.md, "Sequence format"):

    <bos?>Classify the speaker's emotion as one of: anger, calm, ....
    Speech: <a>...<a> Emotion: happiness
    Speech: <a>...<a> Emotion:

Every template segment is tokenized on its own and the ids concatenated, so a label's tokens are
identical in the context, in a training answer and among the candidates scored by `classify`.
"""

import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from transformers import AddedToken, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .audio_utils import AudioInput, describe, load_audio
from .configuration_icl_ser import (
    DEFAULT_ANSWER,
    DEFAULT_AUDIO_TOKEN,
    DEFAULT_ENROLLMENT,
    DEFAULT_INSTRUCTION,
    DEFAULT_LABELS,
    DEFAULT_QUERY,
)
_MARKERS = re.compile(r"(\{audio\}|\{answer\})")


class IclSerProcessor(ProcessorMixin):
    r"""Builds icl-ser model inputs from audio and labels.

    Args:
        feature_extractor: `WhisperFeatureExtractor` (log-mel, for Whisper encoders) or
            `Wav2Vec2FeatureExtractor` (normalized waveform, for wav2vec2/HuBERT/WavLM). Either way
            the model input is called `input_features`.
        tokenizer: The LM's tokenizer; `audio_token` is added to it as a special token if missing.
        labels: Default candidate label vocabulary.
        num_audio_tokens: Placeholders per utterance (must equal the model's).
        audio_token: The placeholder token.
        instruction_template, enrollment_template, query_template, answer_template, label_separator:
            Prompt pieces, as in `IclSerConfig`.
        max_audio_seconds: Longest utterance accepted (Whisper: at most 30 s).
    """

    feature_extractor_class = "AutoFeatureExtractor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        labels: Optional[list[str]] = None,
        num_audio_tokens: int = 8,
        audio_token: str = DEFAULT_AUDIO_TOKEN,
        instruction_template: str = DEFAULT_INSTRUCTION,
        enrollment_template: str = DEFAULT_ENROLLMENT,
        query_template: str = DEFAULT_QUERY,
        answer_template: str = DEFAULT_ANSWER,
        label_separator: str = ", ",
        max_audio_seconds: float = 30.0,
        chat_template: Optional[str] = None,
    ):
        if audio_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(audio_token, special=True, normalized=False)], special_tokens=True)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        self.labels = list(labels) if labels is not None else list(DEFAULT_LABELS)
        self.num_audio_tokens = int(num_audio_tokens)
        self.audio_token = audio_token
        self.instruction_template = instruction_template
        self.enrollment_template = enrollment_template
        self.query_template = query_template
        self.answer_template = answer_template
        self.label_separator = label_separator
        self.max_audio_seconds = float(max_audio_seconds)
        self._piece_cache: dict[str, list[int]] = {}
        self._check_labels(self.labels, "labels")

    @classmethod
    def from_model_config(cls, feature_extractor, tokenizer, config) -> "IclSerProcessor":
        """A processor whose labels, template and audio settings match an `IclSerConfig`."""
        names = ("labels", "num_audio_tokens", "audio_token", "instruction_template", "enrollment_template",
                 "query_template", "answer_template", "label_separator", "max_audio_seconds")
        return cls(feature_extractor, tokenizer, **{name: getattr(config, name) for name in names})

    # ------------------------------------------------------------------------ properties
    @property
    def audio_token_id(self) -> int:
        """Id of the audio placeholder token in the tokenizer (set it as `config.audio_token_id`)."""
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    @property
    def is_whisper(self) -> bool:
        """True for a log-mel (Whisper) feature extractor, False for a waveform one."""
        return hasattr(self.feature_extractor, "hop_length") and hasattr(self.feature_extractor, "n_samples")

    @property
    def sampling_rate(self) -> int:
        """The rate the feature extractor expects; audio is resampled to it."""
        return int(self.feature_extractor.sampling_rate)

    @property
    def audio_limit_seconds(self) -> float:
        """Longest utterance accepted: `max_audio_seconds`, capped by Whisper's 30 s window."""
        if self.is_whisper:
            return min(self.max_audio_seconds, self.feature_extractor.n_samples / self.sampling_rate)
        return self.max_audio_seconds

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "feature_attention_mask", "audio_label_ids",
                "candidate_input_ids", "candidate_attention_mask"]

    # ---------------------------------------------------------------------------- __call__
    def __call__(
        self,
        query: Union[AudioInput, Sequence[AudioInput], None] = None,
        enrollment: Optional[Sequence] = None,
        labels: Optional[Sequence[str]] = None,
        answer: Union[str, Sequence[Optional[str]], None] = None,
        sampling_rate: Optional[int] = None,
        return_tensors: Optional[str] = "pt",
        label_enrollment: bool = False,
        row_labels: Optional[Sequence[Sequence[str]]] = None,
        unlabelled: Optional[Sequence] = None,
    ) -> BatchFeature:
        """Build a batch for `forward`, `classify` and `generate`.

        Args:
            query: One audio (path, array/tensor with `sampling_rate`, or `{"array", "sampling_rate"}`)
                or a list of them (batched call).
            enrollment: A list of `(audio, label)` pairs (K = 0 allowed), or for a batched call a
                list of such lists, one per query.
            labels: Candidate labels for `classify` and the instruction (default: `self.labels`).
                Enrollment labels and answers must be among them.
            answer: The query's label (a list of them when batched): appends the answer tokens and
                returns `labels` (-100 everywhere except the answer tokens) for training.
            sampling_rate: Rate of raw arrays/tensors.
            return_tensors: `"pt"` (default), `"np"`, or None.
            label_enrollment: With `answer`, make the enrollment labels' tokens targets too.
            row_labels: One candidate list per sample (e.g. episodes of several corpora in one
                training batch): each sample's instruction lists its own, and its enrollment
                labels and answer must be among them; `labels` stays what `classify` scores.
            unlabelled: Other clips of the query's speaker, without labels (a list of audios; for
                a batched call one such list, or None, per query). Speaker normalization takes
                its statistics from the enrollment plus these; they add no prompt tokens.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` (left-padded), `input_features`,
            `feature_attention_mask`, `audio_label_ids` (each audio's label tokens; see
            `audio_label_ids`), `candidate_input_ids`, `candidate_attention_mask`, with `answer`,
            `labels` and, with `unlabelled`, `unlabelled_input_features`,
            `unlabelled_feature_attention_mask` and `unlabelled_row_index` (each clip's sample).

        Raises:
            ValueError: bad structure, labels or audio, before any feature extraction.
        """
        queries, enrollments, answers = self._normalize_batch(query, enrollment, answer)
        candidates = self._check_labels(self.labels if labels is None else list(labels), "labels")
        rows = self._check_row_labels(row_labels, len(queries))
        enroll_labels = self._check_enrollment_labels(enrollments, answers, candidates, rows)
        unlabelled_rows = self._check_unlabelled(unlabelled, len(queries), isinstance(query, (list, tuple)))
        audios = self._load_audios(queries, enrollments, sampling_rate)
        extra = self._unlabelled_inputs(unlabelled_rows, sampling_rate)
        text = self.text_inputs(enroll_labels, answers, candidates, label_enrollment, rows)
        return BatchFeature({**text, **self.audio_inputs(audios), **extra}, tensor_type=return_tensors)

    @staticmethod
    def _check_unlabelled(unlabelled, n_samples: int, batched: bool) -> Optional[list[list]]:
        """`unlabelled` as one list of clips per sample (None when not given); ValueError on a bad shape."""
        if unlabelled is None:
            return None
        if isinstance(unlabelled, (str, dict, np.ndarray, torch.Tensor)) or not isinstance(unlabelled, (list, tuple)):
            raise ValueError(f"unlabelled must be a list of audio clips of the speaker (no labels), got "
                             f"{type(unlabelled).__name__}; e.g. unlabelled=['call1.wav', 'call2.wav'].")
        per_sample = list(unlabelled) if batched else [unlabelled]
        if batched and len(per_sample) != n_samples:
            raise ValueError(f"Batched call: unlabelled must be a list with one list of clips (or None) per query "
                             f"({n_samples}), got {len(per_sample)}.")
        checked = []
        for i, clips in enumerate(per_sample):
            clips = [] if clips is None else clips
            if isinstance(clips, (str, dict, np.ndarray, torch.Tensor)) or not isinstance(clips, (list, tuple)):
                raise ValueError(f"unlabelled of sample {i} must be a list of audio clips of the speaker (no labels), "
                                 f"got {type(clips).__name__}; e.g. unlabelled=[['call1.wav'], None] for two queries.")
            if any(isinstance(clip, tuple) and len(clip) == 2 and isinstance(clip[1], str) for clip in clips):
                raise ValueError(f"unlabelled of sample {i} takes audio clips without labels; pass labelled "
                                 "(audio, label) pairs as enrollment= instead.")
            checked.append(list(clips))
        return checked

    def _unlabelled_inputs(self, per_sample: Optional[list[list]], sampling_rate) -> dict[str, np.ndarray]:
        """Features of every unlabelled clip, padded among themselves, and each clip's sample."""
        if per_sample is None or not any(per_sample):
            return {}
        audios, index = [], []
        for i, clips in enumerate(per_sample):
            for j, clip in enumerate(clips):
                try:
                    audios.append(load_audio(clip, sampling_rate, self.sampling_rate, self.audio_limit_seconds))
                except ValueError as error:
                    raise ValueError(f"unlabelled audio {j} of sample {i}: {error}") from None
                index.append(i)
        inputs = self.audio_inputs(audios)
        return {"unlabelled_input_features": inputs["input_features"],
                "unlabelled_feature_attention_mask": inputs["feature_attention_mask"],
                "unlabelled_row_index": np.array(index, dtype=np.int64)}

    # ------------------------------------------------------------------------ validation
    def _normalize_batch(self, query, enrollment, answer) -> tuple[list, list[list], list[Optional[str]]]:
        if query is None:
            raise ValueError("Pass query= (one audio, or a list of audios for a batch).")
        if isinstance(query, (list, tuple)):
            queries = list(query)
            if not queries:
                raise ValueError("query is an empty list; pass at least one query audio.")
            enrollments = [[] for _ in queries] if enrollment is None else enrollment
            if not isinstance(enrollments, (list, tuple)) or len(enrollments) != len(queries):
                raise ValueError(
                    f"Batched call: enrollment must be a list with one list of (audio, label) pairs per query "
                    f"({len(queries)}), got "
                    f"{len(enrollments) if isinstance(enrollments, (list, tuple)) else type(enrollments).__name__}."
                )
            answers = [None] * len(queries) if answer is None else answer
            if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or len(answers) != len(queries):
                raise ValueError(f"Batched call: answer must be a list with one label per query ({len(queries)}).")
            return queries, [self._check_pairs(e, i) for i, e in enumerate(enrollments)], list(answers)
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"answer must be a label string for a single query, got {type(answer).__name__}.")
        return [query], [self._check_pairs([] if enrollment is None else enrollment, 0)], [answer]

    @staticmethod
    def _check_pairs(pairs, sample: int) -> list[tuple]:
        if isinstance(pairs, dict) and set(pairs) >= {"audio", "label"}:
            if len(pairs["audio"]) != len(pairs["label"]):
                raise ValueError(f"enrollment of sample {sample}: 'audio' and 'label' lists differ in length.")
            pairs = list(zip(pairs["audio"], pairs["label"]))
        if not isinstance(pairs, (list, tuple)):
            raise ValueError(
                f"enrollment of sample {sample} must be a list of (audio, label) pairs, got {type(pairs).__name__}."
            )
        for j, item in enumerate(pairs):
            if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], str):
                raise ValueError(
                    f"enrollment item {j} of sample {sample} is not an (audio, label) pair (got "
                    f"{describe(item)}); pass a list of (audio, label_string) tuples."
                )
        return [tuple(item) for item in pairs]

    def _check_labels(self, labels: list, name: str) -> list[str]:
        if not labels:
            raise ValueError(f"{name} is empty; pass at least one candidate label.")
        if any(not isinstance(label, str) for label in labels):
            raise ValueError(f"{name} must be strings, got {labels!r}.")
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"{name} has duplicated labels {duplicates}; pass each label once.")
        for label in labels:
            if not label.strip() or not self.tokenizer(label, add_special_tokens=False)["input_ids"]:
                raise ValueError(f"Label {label!r} tokenizes to nothing; use a non-empty label word.")
            if "\n" in label or self.audio_token in label:
                raise ValueError(f"Label {label!r} contains a newline or the audio token; use a plain label word.")
        return list(labels)

    def _check_row_labels(self, row_labels, n_samples: int) -> Optional[list[list[str]]]:
        if row_labels is None:
            return None
        if isinstance(row_labels, str) or len(row_labels) != n_samples:
            raise ValueError(f"row_labels must hold one candidate list per sample ({n_samples}).")
        return [self._check_labels(list(row), f"row_labels[{i}]") for i, row in enumerate(row_labels)]

    @staticmethod
    def _check_enrollment_labels(enrollments, answers, candidates, row_labels=None) -> list[list[str]]:
        # The instruction lists the candidates, so a context or answer label outside them is
        # almost always a typo ("happy" vs "happiness") that would silently hurt accuracy.
        for i, (pairs, answer) in enumerate(zip(enrollments, answers)):
            allowed = set(candidates if row_labels is None else row_labels[i])
            candidates_i = candidates if row_labels is None else row_labels[i]
            for _, label in pairs:
                if label not in allowed:
                    raise ValueError(
                        f"Enrollment label {label!r} of sample {i} is not among the candidate labels {candidates_i}; "
                        "fix the label or pass labels=[...] including it."
                    )
            if answer is not None and answer not in allowed:
                raise ValueError(
                    f"answer {answer!r} of sample {i} is not among the candidate labels {candidates_i}; "
                    "fix the answer or pass labels=[...] including it."
                )
        return [[label for _, label in pairs] for pairs in enrollments]

    def _load_audios(self, queries, enrollments, sampling_rate) -> list[np.ndarray]:
        """Decode and check every audio (enrollment then query, sample after sample)."""
        audios = []
        for i, (query, pairs) in enumerate(zip(queries, enrollments)):
            items = [(f"enrollment audio {j} of sample {i}", audio) for j, (audio, _) in enumerate(pairs)]
            for where, audio in items + [(f"query audio of sample {i}", query)]:
                try:
                    audios.append(load_audio(audio, sampling_rate, self.sampling_rate, self.audio_limit_seconds))
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
        return audios

    # ------------------------------------------------------------------------------ text
    def _piece(self, text: str) -> list[int]:
        if text not in self._piece_cache:
            self._piece_cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._piece_cache[text]

    def _render(self, template: str, answer: list[int]) -> tuple[list[int], list[int]]:
        """Tokenize a template segment by segment, with placeholders and answer ids spliced in.

        Returns the ids and, aligned with them, the answer's ids as targets (-100 elsewhere).
        """
        ids: list[int] = []
        targets: list[int] = []
        for part in _MARKERS.split(template):
            if part == "{audio}":
                piece = [self.audio_token_id] * self.num_audio_tokens
            elif part == "{answer}":
                piece = answer
            else:
                piece = self._piece(part) if part else []
            ids += piece
            targets += piece if part == "{answer}" else [-100] * len(piece)
        return ids, targets

    def answer_ids(self, label: str) -> list[int]:
        """Token ids of a label's answer text (`answer_template`), as scored by `classify`."""
        return self._piece(self.answer_template.format(label=label))

    def prompt_ids(self, enrollment_labels: list[str], candidates: list[str]) -> list[int]:
        """Token ids of one sample's prompt: instruction, enrollment lines, query line."""
        return self._prompt(enrollment_labels, candidates)[0]

    def prefix_ids(self, enrollment_labels: list[str], candidates: list[str]) -> list[int]:
        """Token ids of the speaker-specific prompt prefix: instruction and enrollment lines.

        `prompt_ids(...) == prefix_ids(...) + query_ids()`, so the prefix's key/value cache can
        be computed once per speaker and reused for every query (see the pipeline's profiles).
        """
        return self._prefix(enrollment_labels, candidates)[0]

    def query_ids(self) -> list[int]:
        """Token ids of the query line; the same for every query (`num_audio_tokens` placeholders)."""
        return self._render(self.query_template, [])[0]

    def _prefix(self, enrollment_labels: list[str], candidates: list[str]) -> tuple[list[int], list[int]]:
        """Prefix ids and the enrollment answers' ids as targets (-100 elsewhere)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = bos + self._piece(self.instruction_template.format(labels=self.label_separator.join(candidates)))
        targets = [-100] * len(ids)
        for label in enrollment_labels:
            line, line_targets = self._render(self.enrollment_template, self.answer_ids(label))
            ids, targets = ids + line, targets + line_targets
        return ids, targets

    def _prompt(self, enrollment_labels: list[str], candidates: list[str]) -> tuple[list[int], list[int]]:
        """Prompt ids and the enrollment answers' ids as targets (-100 elsewhere)."""
        ids, targets = self._prefix(enrollment_labels, candidates)
        query, query_targets = self._render(self.query_template, [])
        return ids + query, targets + query_targets

    def text_inputs(
        self,
        enrollment_labels: list[list[str]],
        answers: list[Optional[str]],
        candidates: list[str],
        label_enrollment: bool = False,
        row_candidates: Optional[list[list[str]]] = None,
    ) -> dict[str, np.ndarray]:
        """Left-padded prompt ids/mask, candidate ids/mask and, if any answer is given, labels.

        With `label_enrollment`, the enrollment labels' tokens are training targets too (an
        auxiliary loss: the model also learns to label the context utterances). With
        `row_candidates`, row i's instruction lists `row_candidates[i]` instead of `candidates`
        (the candidate ids are always `candidates`').
        """
        pad = self._pad_id()
        rows, targets = [], []
        for i, (labels_i, answer) in enumerate(zip(enrollment_labels, answers)):
            listed = candidates if row_candidates is None else row_candidates[i]
            prompt, prompt_targets = self._prompt(labels_i, listed)
            answer_part = self.answer_ids(answer) if answer is not None else []
            rows.append(prompt + answer_part)
            context = prompt_targets if label_enrollment else [-100] * len(prompt)
            targets.append(context + answer_part)
        width = max(len(row) for row in rows)
        out = {
            "input_ids": np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64),
            "attention_mask": np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64),
        }
        if any(answer is not None for answer in answers):
            if any(answer is None for answer in answers):
                raise ValueError("Give an answer for every sample of a training batch, or for none.")
            out["labels"] = np.array([[-100] * (width - len(t)) + t for t in targets], dtype=np.int64)
        out["audio_label_ids"] = self.audio_label_ids(enrollment_labels)
        return {**out, **self.candidate_inputs(candidates)}

    def audio_label_ids(self, enrollment_labels: list[list[str]]) -> np.ndarray:
        """`(n_audio, L)` answer ids of each audio's label in audio order (sample after sample:
        its enrollment, then its query), -100 padded; the query's row is all -100 (unlabelled)."""
        rows = []
        for labels_i in enrollment_labels:
            rows += [self.answer_ids(label) for label in labels_i] + [[]]
        width = max(1, max(len(row) for row in rows))
        return np.array([row + [-100] * (width - len(row)) for row in rows], dtype=np.int64)

    def candidate_inputs(self, candidates: list[str]) -> dict[str, np.ndarray]:
        """Right-padded answer ids of the candidate labels (`candidate_input_ids`/`_attention_mask`)."""
        pad = self._pad_id()
        cands = [self.answer_ids(label) for label in candidates]
        cand_width = max(len(c) for c in cands)
        return {
            "candidate_input_ids": np.array([c + [pad] * (cand_width - len(c)) for c in cands], dtype=np.int64),
            "candidate_attention_mask": np.array(
                [[1] * len(c) + [0] * (cand_width - len(c)) for c in cands], dtype=np.int64
            ),
        }

    def _pad_id(self) -> int:
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    # ----------------------------------------------------------------------------- audio
    def _features(self, samples: np.ndarray) -> np.ndarray:
        """One utterance → (n_mels, frames) log-mel or (samples,) normalized waveform."""
        extractor = self.feature_extractor
        if self.is_whisper:
            # "longest" on a single utterance keeps its own length (no padding to 30 s); an even
            # frame count matches the encoder's stride-2 conv exactly.
            out = extractor(samples, sampling_rate=self.sampling_rate, padding="longest",
                            pad_to_multiple_of=2 * extractor.hop_length, return_tensors="np")
            return out["input_features"][0]
        out = extractor(samples, sampling_rate=self.sampling_rate, padding=False, return_tensors="np")
        return out["input_values"][0]

    def audio_inputs(self, audios: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Extract features one utterance at a time (so padding never changes them) and pad."""
        feats = [self._features(audio) for audio in audios]
        lengths = [f.shape[-1] for f in feats]
        width = max(lengths)
        padded = np.zeros((len(feats), *feats[0].shape[:-1], width), dtype=np.float32)
        mask = np.zeros((len(feats), width), dtype=np.int64)
        for i, (feat, length) in enumerate(zip(feats, lengths)):
            padded[i, ..., :length] = feat
            mask[i, :length] = 1
        return {"input_features": padded, "feature_attention_mask": mask}


class IclSerDataCollator:
    """Collates episodes for `transformers.Trainer` (use `remove_unused_columns=False`).

    Each example is a dict with:
        - `"query"`: the query audio (anything `load_audio` takes),
        - `"enrollment"`: a list of `(audio, label)` pairs or `{"audio": [...], "label": [...]}`,
        - `"answer"` (or `"emotion"`): the query's label.
    Or, with precomputed (frozen) encoder outputs instead of audio:
        - `"query_hidden_states"`: `(T, D)` array, `"enrollment_hidden_states"`: list of `(T_j, D)`,
        - `"enrollment_labels"`: list of labels, and `"answer"`/`"emotion"`;
    these give `audio_hidden_states`/`audio_hidden_mask` instead of `input_features`.
    Optionally `"candidate_labels"`: the example's own candidate labels (episodes of several
    corpora, each with its corpus' label set). Its instruction lists them; `classify` scores the
    batch's shared set when all examples agree, else their union in order of appearance (so
    batch examples of one label set together for `classify`, as `predict_episodes` does).

    Args:
        processor: The `IclSerProcessor`.
        labels: Candidate labels (default: the processor's).
        sampling_rate: Rate of raw audio arrays in the examples.
        label_enrollment: Also train on the enrollment labels' tokens (auxiliary loss).
    """

    def __init__(self, processor: IclSerProcessor, labels: Optional[list[str]] = None,
                 sampling_rate: Optional[int] = None, label_enrollment: bool = False):
        self.processor = processor
        self.labels = labels
        self.sampling_rate = sampling_rate
        self.label_enrollment = label_enrollment

    @staticmethod
    def _answer(example: dict) -> str:
        answer = example.get("answer", example.get("emotion"))
        if answer is None:
            raise ValueError('Each training example needs its query label as "answer" (or "emotion").')
        return answer

    def _candidates(self, examples: list[dict[str, Any]]) -> tuple[Optional[list[str]], Optional[list[list[str]]]]:
        """(labels `classify` scores, per-example instruction labels or None)."""
        own = [ex.get("candidate_labels") for ex in examples]
        if all(labels is None for labels in own):
            return self.labels, None
        if any(labels is None for labels in own):
            raise ValueError('Give "candidate_labels" for every example of a batch, or for none.')
        rows = [list(labels) for labels in own]
        return list(dict.fromkeys(label for row in rows for label in row)), rows

    def __call__(self, examples: list[dict[str, Any]]) -> BatchFeature:
        if not examples:
            raise ValueError("The collator got an empty list of examples.")
        if "query_hidden_states" in examples[0]:
            return self._collate_hidden(examples)
        labels, rows = self._candidates(examples)
        return self.processor(
            query=[ex["query"] for ex in examples],
            enrollment=[ex.get("enrollment") or [] for ex in examples],
            answer=[self._answer(ex) for ex in examples],
            labels=labels,
            sampling_rate=self.sampling_rate,
            label_enrollment=self.label_enrollment,
            row_labels=rows,
        )

    def _collate_hidden(self, examples: list[dict[str, Any]]) -> BatchFeature:
        proc = self.processor
        labels, rows = self._candidates(examples)
        candidates = proc._check_labels(proc.labels if labels is None else list(labels), "labels")
        rows = proc._check_row_labels(rows, len(examples))
        enrollments = [list(ex.get("enrollment_labels") or []) for ex in examples]
        answers = [self._answer(ex) for ex in examples]
        hidden = []
        for i, ex in enumerate(examples):
            states = list(ex.get("enrollment_hidden_states") or [])
            if len(states) != len(enrollments[i]):
                raise ValueError(f"Example {i}: {len(states)} enrollment_hidden_states but "
                                 f"{len(enrollments[i])} enrollment_labels.")
            hidden += [torch.as_tensor(np.asarray(s), dtype=torch.float32) for s in states + [ex["query_hidden_states"]]]
        proc._check_enrollment_labels([[(None, lab) for lab in e] for e in enrollments], answers, candidates, rows)
        text = proc.text_inputs(enrollments, answers, candidates, self.label_enrollment, rows)
        width = max(h.shape[0] for h in hidden)
        states = torch.zeros(len(hidden), width, hidden[0].shape[-1])
        mask = torch.zeros(len(hidden), width, dtype=torch.long)
        for i, h in enumerate(hidden):
            if h.ndim != 2 or h.shape[0] == 0:
                raise ValueError(f"Precomputed hidden states must be non-empty (T, D) arrays; got {tuple(h.shape)}.")
            states[i, : h.shape[0]] = h
            mask[i, : h.shape[0]] = 1
        batch = BatchFeature(text, tensor_type="pt")
        batch["audio_hidden_states"], batch["audio_hidden_mask"] = states, mask
        return batch


__all__ = ["IclSerProcessor", "IclSerDataCollator"]
