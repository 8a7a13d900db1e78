"""`pipeline("icl-speech-emotion")`: label a speaker's utterances from a few labelled examples.

    pipe = pipeline("icl-speech-emotion", model="path/to/checkpoint", trust_remote_code=True)
    pipe("query.wav", enrollment=[("a.wav", "happiness"), ("b.wav", "sadness")])
    profile = pipe.enroll([("a.wav", "happiness"), ("b.wav", "sadness")])   # once per speaker
    pipe(["q1.wav", "q2.wav"], profile=profile, batch_size=8)              # cheap per query

A [`SpeakerProfile`] holds the language model's key/value cache of the speaker's prompt prefix
(instruction + enrollment lines). The query line that follows it has the same tokens for every
query, so queries run on top of the cached prefix and cost about as much as zero-shot ones.

Relative imports only: `model.save_pretrained` / `save_with_pipeline` copy this file next to the weights, and
`trust_remote_code=True` runs it where the package is not installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import AutoModel, Pipeline
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .audio_utils import AudioInput, Recording, check_chunking, check_not_silent, chunk_spans, load_audio, speech_ratio

TASK = "icl-speech-emotion"
PROFILE_FORMAT = "icl_ser-speaker-profile-v1"
# Per-call parameters: they describe one speaker, so they never belong to the constructor.
_CALL_ONLY = ("enrollment", "profile", "labels")
# Parameters that make a call label a long recording segment by segment (`stream`).
_LONG_ONLY = ("chunk_length_s", "stride_length_s", "vad_threshold_db", "vad_min_speech")


# ----------------------------------------------------------------------------- profiles
@dataclass
class SpeakerProfile:
    """A speaker's enrollment, encoded once: the LM key/value cache of the prompt prefix.

    Made by [`IclSpeechEmotionPipeline.enroll`]; pass it as `pipe(audio, profile=profile)`.
    Only valid for the checkpoint it was made with (`model_fingerprint`); the pipeline refuses
    a profile from another checkpoint.

    Attributes:
        labels: Candidate labels the prefix's instruction lists (the call's candidates).
        enrollment_labels: The K enrollment labels, in order.
        prefix_ids: Token ids of the prefix (instruction + enrollment lines).
        model_fingerprint: `model.fingerprint()` of the checkpoint that made it.
        keys, values: Per LM layer, `(1, kv_heads, prefix_len, head_dim)` cached states.
        enrollment_context: `(K, ...)` what the model's enrollment read-out keeps of the
            enrollment (`model.enrollment_context`); None for a model without one.
    """

    labels: list[str]
    enrollment_labels: list[str]
    prefix_ids: list[int]
    model_fingerprint: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    enrollment_context: Optional[torch.Tensor] = None

    @property
    def num_enrollment(self) -> int:
        """K, the number of enrollment utterances."""
        return len(self.enrollment_labels)

    def cache(self, batch_size: int, device: Union[str, torch.device]) -> DynamicCache:
        """A fresh cache holding the prefix for `batch_size` rows (classify extends it in place)."""
        return DynamicCache(
            ddp_cache_data=[
                (k.to(device).expand(batch_size, -1, -1, -1), v.to(device).expand(batch_size, -1, -1, -1))
                for k, v in zip(self.keys, self.values)
            ]
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the profile to one `.safetensors` file (tensors + JSON metadata), atomically."""
        path = os.fspath(path)
        meta = {"labels": self.labels, "enrollment_labels": self.enrollment_labels,
                "prefix_ids": self.prefix_ids, "model_fingerprint": self.model_fingerprint}
        tensors = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"keys.{i}"] = k.detach().to("cpu").contiguous()
            tensors[f"values.{i}"] = v.detach().to("cpu").contiguous()
        if self.enrollment_context is not None:
            tensors["enrollment_context"] = self.enrollment_context.detach().to("cpu").contiguous()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # Temp file in the same folder, then os.replace: readers never see a half-written profile.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".profile-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": PROFILE_FORMAT, "profile": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SpeakerProfile":
        """Read a profile written by `save` (tensors load on CPU)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No speaker profile at {path!r}.")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path!r} is not a readable safetensors file ({error}).") from None
        if metadata.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path!r} is not an icl-ser speaker profile (format {metadata.get('format')!r}, "
                             f"expected {PROFILE_FORMAT!r}).")
        meta = json.loads(metadata["profile"])
        n_layers = sum(name.startswith("keys.") for name in tensors)
        return cls(labels=list(meta["labels"]), enrollment_labels=list(meta["enrollment_labels"]),
                   prefix_ids=[int(i) for i in meta["prefix_ids"]], model_fingerprint=meta["model_fingerprint"],
                   keys=[tensors[f"keys.{i}"] for i in range(n_layers)],
                   values=[tensors[f"values.{i}"] for i in range(n_layers)],
                   enrollment_context=tensors.get("enrollment_context"))


@dataclass
class _Context:
    """One call's resolved speaker context: candidates and either decoded enrollment or a profile."""

    labels: list[str]
    enrollment: list[tuple[np.ndarray, str]]
    profile: Optional[SpeakerProfile] = None


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _is_profile(obj: Any) -> bool:
    # By name, not isinstance: the package's class and a checkpoint's remote-code copy are
    # different class objects with the same code, and either may make the profile.
    return type(obj).__name__ == "SpeakerProfile" and hasattr(obj, "model_fingerprint")


# ----------------------------------------------------------------------------- pipeline
class IclSpeechEmotionPipeline(Pipeline):
    """Few-shot, speaker-personalized speech emotion recognition with an icl-ser checkpoint.

    Call forms (audio is a file path, an array/tensor with `sampling_rate=`, or the Hugging Face
    audio dict `{"array", "sampling_rate"}`, as for the ASR pipeline):

    - `pipe(audio, enrollment=[(audio, "happiness"), ...])` → `[{"label", "score"}, ...]`,
      sorted by score; scores sum to 1 over the candidate labels. No enrollment (K = 0) gives
      the speaker-independent answer.
    - `pipe([audio, ...], ..., batch_size=8)` → one such list per query (same speaker context).
    - `profile = pipe.enroll([(audio, label), ...])`, then `pipe(audio, profile=profile)`: the
      enrollment is encoded once; a query then costs about as much as a zero-shot query.
    - `pipe(recording, profile=profile, chunk_length_s=4.0, stride_length_s=1.0)` → one
      `{"timestamp", "label", "score", "scores"}` per voiced segment of a long recording;
      `pipe.stream(...)` yields them one by one (see `stream`).
    - `pipe.embed(audio or [audio, ...])` → utterance embeddings (see `embed`).

    Call parameters:
        enrollment: The speaker's `(audio, label)` pairs (K >= 0).
        profile: A [`SpeakerProfile`] from `enroll` (instead of `enrollment`).
        labels: Candidate labels (default: the checkpoint's vocabulary). With a profile, they
            must be the ones it was enrolled with (its prompt lists them).
        top_k: Keep the `top_k` best labels (default: all).
        sampling_rate: Rate of raw arrays/tensors.

    Audio longer than the encoder window (30 s for Whisper) is refused with the limit in the
    message; it is never truncated. Every input problem raises `ValueError` before model work.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        misplaced = [name for name in _CALL_ONLY if name in kwargs]
        if misplaced:
            raise ValueError(f"{misplaced} describe one speaker; pass them to each call, e.g. "
                             "pipe(audio, enrollment=[...], labels=[...]), not to the constructor.")
        if kwargs.get("processor") is None:
            raise ValueError("IclSpeechEmotionPipeline needs the checkpoint's IclSerProcessor: pass processor=.")
        self._fingerprint: Optional[str] = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------ parameters
    def _sanitize_parameters(self, enrollment=None, profile=None, labels=None, top_k=None, sampling_rate=None):
        preprocess, postprocess = {}, {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if top_k is not None:
            postprocess["top_k"] = _positive_int("top_k", top_k)
        if sampling_rate is None:
            sampling_rate = getattr(self, "_preprocess_params", {}).get("sampling_rate")
        # Resolved (and the enrollment decoded) here, once per call, before any query work.
        context = self._context(enrollment, profile, labels, sampling_rate)
        postprocess["labels"] = context.labels
        return preprocess, {"context": context}, postprocess

    @property
    def model_fingerprint(self) -> str:
        """`model.fingerprint()`, computed once (profiles are tied to it)."""
        if self._fingerprint is None:
            self._fingerprint = self.model.fingerprint()
        return self._fingerprint

    def _load(self, audio: AudioInput, sampling_rate: Optional[int], where: str) -> np.ndarray:
        if isinstance(audio, dict) and "raw" in audio and "array" not in audio:
            audio = {**audio, "array": audio["raw"]}  # the ASR pipeline's dict spelling
        proc = self.processor
        try:
            samples = load_audio(audio, sampling_rate, proc.sampling_rate, proc.audio_limit_seconds)
            check_not_silent(samples, "the audio")
            return samples
        except ValueError as error:
            hint = ""
            if "at most" in str(error) and where == "query audio":
                hint = " For a long recording, pass chunk_length_s=4.0 to label it segment by segment."
            raise ValueError(f"{where}: {error}{hint}") from None

    def _context(self, enrollment, profile, labels, sampling_rate) -> _Context:
        proc = self.processor
        if profile is not None:
            if enrollment is not None:
                raise ValueError("Pass either enrollment= or profile=, not both.")
            return _Context(self._check_profile(profile, labels), [], profile)
        candidates = proc._check_labels(list(proc.labels) if labels is None else list(labels), "labels")
        pairs = proc._check_pairs([] if enrollment is None else enrollment, 0)
        proc._check_enrollment_labels([pairs], [None], candidates)
        audios = [self._load(audio, sampling_rate, f"enrollment audio {j}") for j, (audio, _) in enumerate(pairs)]
        return _Context(candidates, [(audio, label) for audio, (_, label) in zip(audios, pairs)])

    def _check_profile(self, profile, labels) -> list[str]:
        if not _is_profile(profile):
            raise ValueError(f"profile must be a SpeakerProfile (from pipe.enroll or SpeakerProfile.load), "
                             f"got {type(profile).__name__}.")
        if profile.model_fingerprint != self.model_fingerprint:
            raise ValueError(
                "This speaker profile was made with a different checkpoint (model fingerprint "
                f"{profile.model_fingerprint[:12]}… ≠ {self.model_fingerprint[:12]}…); its cached states do not "
                "fit this model. Enroll the speaker again with this pipeline: pipe.enroll([...])."
            )
        if labels is not None:
            labels = self.processor._check_labels(list(labels), "labels")
            outside = [label for label in profile.enrollment_labels if label not in labels]
            if outside:
                raise ValueError(f"The profile's enrollment labels {sorted(set(outside))} are not among labels={labels}; "
                                 "enroll again with labels that include them.")
            if labels != profile.labels:
                raise ValueError(f"The profile was enrolled with candidate labels {profile.labels} (its cached prompt "
                                 f"lists them), not {labels}; drop labels= or enroll again with labels={labels}.")
        if self.processor.prefix_ids(profile.enrollment_labels, profile.labels) != profile.prefix_ids:
            raise ValueError("The profile's prompt tokens differ from this processor's (another tokenizer or "
                             "prompt template); enroll the speaker again with this pipeline.")
        return list(profile.labels)

    # --------------------------------------------------------------------------- enroll
    def enroll(
        self, enrollment: Sequence, labels: Optional[Sequence[str]] = None, sampling_rate: Optional[int] = None
    ) -> SpeakerProfile:
        """Encode a speaker's enrollment once and keep the prompt prefix's key/value cache.

        Args:
            enrollment: `(audio, label)` pairs (K = 0 allowed: a speaker-independent profile).
            labels: Candidate labels (default: the checkpoint's vocabulary); fixed for the profile.
            sampling_rate: Rate of raw arrays/tensors.

        Returns:
            A [`SpeakerProfile`]; `pipe(audio, profile=profile)` then gives the same
            probabilities as `pipe(audio, enrollment=enrollment, labels=labels)`.
        """
        context = self._context(enrollment, None, labels, sampling_rate)
        proc = self.processor
        enrollment_labels = [label for _, label in context.enrollment]
        prefix = proc.prefix_ids(enrollment_labels, context.labels)
        inputs = {"input_ids": torch.tensor([prefix]), "attention_mask": torch.ones(1, len(prefix), dtype=torch.long)}
        enrollment_context = None
        with self.device_placement(), torch.no_grad():
            if context.enrollment:  # encoded once, for the prefix's cache and the read-out's memory
                audio = self._ensure_tensor_on_device(
                    {k: torch.from_numpy(v) for k, v in proc.audio_inputs([a for a, _ in context.enrollment]).items()},
                    self.device)
                hidden, mask = self.model.get_audio_features(audio["input_features"], audio["feature_attention_mask"])
                inputs.update(audio_hidden_states=hidden, audio_hidden_mask=mask)
                label_ids = torch.from_numpy(proc.audio_label_ids([enrollment_labels])[:-1]).to(hidden.device)
                enrollment_context = self.model.enrollment_context(
                    label_ids, audio_hidden_states=hidden, audio_hidden_mask=mask)
            out = self.model(**self._ensure_tensor_on_device(inputs, self.device), use_cache=True, logits_to_keep=1)
        cache = out.cache
        layers = getattr(cache, "layers", None)
        # A prefix can only be replayed from full-attention dynamic layers (a sliding window drops tokens).
        if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
            raise ValueError(f"Speaker profiles need a language model with a plain full-attention cache; this one "
                             f"uses {kinds}. Call the pipeline with enrollment= instead.")
        return SpeakerProfile(labels=list(context.labels), enrollment_labels=enrollment_labels, prefix_ids=prefix,
                              model_fingerprint=self.model_fingerprint,
                              keys=[layer.keys for layer in layers], values=[layer.values for layer in layers],
                              enrollment_context=enrollment_context)

    # ------------------------------------------------------------------------ run
    def __call__(self, inputs, **kwargs):
        """Label one query audio, or a list of them (see the class docstring for parameters).

        With `chunk_length_s=` the input is one long recording: the list of its segments'
        results (see `stream`)."""
        if any(name in kwargs for name in _LONG_ONLY):
            return list(self.stream(inputs, **kwargs))
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            raise ValueError("The query list is empty; pass at least one query audio.")
        return super().__call__(inputs, **kwargs)

    def stream(
        self,
        audio: AudioInput,
        *,
        enrollment: Optional[Sequence] = None,
        profile: Optional[SpeakerProfile] = None,
        labels: Optional[Sequence[str]] = None,
        sampling_rate: Optional[int] = None,
        chunk_length_s: float = 4.0,
        stride_length_s: float = 1.0,
        vad_threshold_db: Optional[float] = -50.0,
        vad_min_speech: float = 0.1,
        batch_size: int = 8,
        top_k: Optional[int] = None,
    ) -> Iterator[dict[str, Any]]:
        """Label a long recording segment by segment, yielding each segment's result in time order.

        `pipe(audio, chunk_length_s=..., ...)` is `list(pipe.stream(audio, ...))`. A file is read
        one segment at a time, so memory stays flat however long the recording is.

        Segments: `chunk_length_s` seconds long, consecutive ones overlapping by
        `stride_length_s` seconds (so each starts `chunk_length_s - stride_length_s` after the
        previous one). The last segment ends at the end of the recording, moved back to keep its
        full length; a recording shorter than one segment is one segment.

        Voice-activity gate: a segment is skipped (not yielded) unless at least `vad_min_speech`
        of its 30 ms frames have an RMS level of `vad_threshold_db` dBFS or more;
        `vad_threshold_db=None` switches the gate off (every segment is labelled).

        Speaker context as for a single query (`enrollment=` is enrolled once, as a profile).
        Voiced segments go through the encoder and the LM `batch_size` at a time.

        Yields:
            `{"timestamp": (start_s, end_s), "label", "score", "scores": {label: probability}}`
            (`label`/`score` the best; `scores` over all candidates, in candidate order, or the
            `top_k` best).

        Raises:
            ValueError: bad segment/stride lengths, gate settings or batch size, missing,
                empty or non-audio input (before any model work), or, at the end, a recording
                in which the gate found no speech.
        """
        proc = self.processor
        chunk_s, stride_s = check_chunking(chunk_length_s, stride_length_s, proc.audio_limit_seconds)
        if vad_threshold_db is not None and (isinstance(vad_threshold_db, bool) or not isinstance(vad_threshold_db, (int, float))
                                             or not vad_threshold_db <= 0):
            raise ValueError(f"vad_threshold_db must be a level in dBFS (<= 0, e.g. -50.0) or None to switch "
                             f"the voice-activity gate off, got {vad_threshold_db!r}.")
        if isinstance(vad_min_speech, bool) or not isinstance(vad_min_speech, (int, float)) or not 0 <= vad_min_speech <= 1:
            raise ValueError(f"vad_min_speech must be a share of frames in [0, 1], got {vad_min_speech!r}.")
        _positive_int("batch_size", batch_size)
        if top_k is not None:
            _positive_int("top_k", top_k)
        recording = Recording(audio, sampling_rate, proc.sampling_rate)  # checks the input, reads nothing yet
        return self._stream(recording, enrollment, profile, labels, sampling_rate, chunk_s, stride_s,
                            vad_threshold_db, vad_min_speech, batch_size, top_k)

    def _stream(self, recording, enrollment, profile, labels, sampling_rate, chunk_s, stride_s,
                vad_threshold_db, vad_min_speech, batch_size, top_k) -> Iterator[dict[str, Any]]:
        # A generator behind `stream`, so argument errors above are raised at the call, not at the first next().
        with recording:
            if profile is None and enrollment:  # enroll once: every segment then costs a zero-shot query
                try:
                    profile, enrollment = self.enroll(enrollment, labels=labels, sampling_rate=sampling_rate), None
                    labels = None
                except ValueError as error:
                    if "plain full-attention cache" not in str(error):
                        raise  # else: no profile for this LM, every segment reads the enrollment inline
            context = self._context(enrollment, profile, labels, sampling_rate)
            rate = recording.sampling_rate
            spans = chunk_spans(recording.num_samples, int(round(chunk_s * rate)),
                                int(round(chunk_s * rate)) - int(round(stride_s * rate)))
            batch, voiced = [], 0
            for index, (start, end) in enumerate(spans):
                samples = recording.read(start, end)
                if vad_threshold_db is None or speech_ratio(samples, self.processor.sampling_rate,
                                                            vad_threshold_db) >= max(vad_min_speech, 1e-9):
                    batch.append(((start / rate, end / rate), samples))
                if batch and (len(batch) == batch_size or index == len(spans) - 1):
                    voiced += len(batch)
                    yield from self._label_segments(batch, context, top_k)
                    batch = []
            if not voiced:
                raise ValueError(f"No speech found in {recording.source} ({recording.duration:.1f} s): every segment is "
                                 f"below the voice-activity gate (vad_threshold_db={vad_threshold_db}, vad_min_speech="
                                 f"{vad_min_speech}). Check the recording, lower vad_threshold_db, or pass "
                                 "vad_threshold_db=None to label every segment.")

    def _label_segments(self, batch, context: _Context, top_k: Optional[int]) -> Iterator[dict[str, Any]]:
        probs = self.forward({"audio": [samples for _, samples in batch]}, context=context)["probs"]
        for (timestamp, _), row in zip(batch, probs.tolist()):
            ranked = sorted(zip(context.labels, row), key=lambda pair: pair[1], reverse=True)
            keep = {label for label, _ in ranked[: top_k or len(ranked)]}
            yield {"timestamp": (round(timestamp[0], 3), round(timestamp[1], 3)), "label": ranked[0][0],
                   "score": ranked[0][1], "scores": {label: p for label, p in zip(context.labels, row) if label in keep}}

    def embed(self, audio, sampling_rate: Optional[int] = None, batch_size: int = 8) -> np.ndarray:
        """Utterance embeddings: one vector per clip, the pooled speech representation the model reads
        (`model.utterance_embeddings`: mean and std of the projector's encoder block over the clip).

        Args:
            audio: One clip, or a list of clips (any audio form the pipeline takes).
            sampling_rate: Rate of raw arrays/tensors.
            batch_size: Clips per encoder pass.

        Returns:
            `(dim,)` float32 for one clip, `(n_clips, dim)` for a list.
        """
        single = not isinstance(audio, (list, tuple))
        clips = [audio] if single else list(audio)
        if not clips:
            raise ValueError("The clip list is empty; pass at least one audio clip.")
        _positive_int("batch_size", batch_size)
        samples = [self._load(clip, sampling_rate, f"clip {i}") for i, clip in enumerate(clips)]  # all checked first
        vectors = []
        with self.device_placement(), torch.no_grad():
            for i in range(0, len(samples), batch_size):
                inputs = {k: torch.from_numpy(v) for k, v in self.processor.audio_inputs(samples[i:i + batch_size]).items()}
                inputs = self._ensure_tensor_on_device(inputs, self.device)
                vectors.append(self.model.utterance_embeddings(inputs["input_features"], inputs["feature_attention_mask"]).cpu())
        out = torch.cat(vectors).numpy()
        return out[0] if single else out

    def preprocess(self, inputs: AudioInput, sampling_rate: Optional[int] = None) -> dict[str, Any]:
        """Decode and check one query (mono, resampled, within the encoder's time limit)."""
        return {"audio": self._load(inputs, sampling_rate, "query audio")}

    @staticmethod
    def _collate(items: list[dict[str, Any]]) -> dict[str, list]:
        # Queries differ in length; the processor pads them in _forward, so batch them as a list.
        return {"audio": [item["audio"] for item in items]}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """As `Pipeline.get_iterator`, with this pipeline's collate function for every batch size."""
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:  # a generator streams: one worker keeps its order
            dataset, num_workers = PipelineIterator(inputs, self.preprocess, preprocess_params), min(num_workers, 1)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs: dict[str, Any], context: _Context) -> dict[str, torch.Tensor]:
        audios = model_inputs["audio"]
        audios = [audios] if isinstance(audios, np.ndarray) else list(audios)
        proc = self.processor
        if context.profile is None:
            batch = proc(query=audios, enrollment=[context.enrollment] * len(audios), labels=context.labels,
                         sampling_rate=proc.sampling_rate)
            probs = self.model.classify(**self._ensure_tensor_on_device(dict(batch), self.device))
            return {"probs": probs.float()}
        # Profile: only the query line runs, on top of the cached prefix. Every query line has the
        # same tokens (num_audio_tokens placeholders), so the batch needs no padding.
        profile, query = context.profile, proc.query_ids()
        inputs = {k: torch.from_numpy(v) for k, v in {**proc.audio_inputs(audios), **proc.candidate_inputs(context.labels)}.items()}
        inputs["input_ids"] = torch.tensor([query] * len(audios))
        inputs["attention_mask"] = torch.ones(len(audios), len(profile.prefix_ids) + len(query), dtype=torch.long)
        inputs = self._ensure_tensor_on_device(inputs, self.device)
        if profile.enrollment_context is not None:
            inputs["enrollment_context"] = profile.enrollment_context.to(self.device)[None].expand(len(audios), -1, -1)
        probs = self.model.classify(**inputs, cache=profile.cache(len(audios), self.device))
        return {"probs": probs.float()}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], labels: list[str], top_k: Optional[int] = None):
        """`[{"label", "score"}, ...]` sorted by score (descending), cut to `top_k`."""
        probs = model_outputs["probs"].reshape(-1).tolist()
        ranked = sorted(zip(labels, probs), key=lambda pair: pair[1], reverse=True)
        return [{"label": label, "score": score} for label, score in ranked[: top_k or len(ranked)]]

    # ------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Save weights, processor, model code and this pipeline's code, with `custom_pipelines`
        in config.json, so `pipeline("icl-speech-emotion", model=folder, trust_remote_code=True)`
        works where the package is not installed."""
        if not hasattr(type(self), "_registered_impl"):
            register_pipeline()  # e.g. a pipeline that was itself loaded from remote code
        config = self.model.config
        try:
            super().save_pretrained(save_directory, **kwargs)  # config with custom_pipelines, code, weights
        finally:
            # Only the folder that holds this file may name it; don't leak into later model saves.
            if hasattr(config, "custom_pipelines"):
                del config.custom_pipelines
        self.processor.save_pretrained(save_directory, **kwargs)


def plot_emotion_timeline(segments: Sequence[dict], ax=None, labels: Optional[Sequence[str]] = None, title: str = ""):
    """Plot each label's probability over time from long-recording results (`pipe(..., chunk_length_s=...)`).

    Each segment's probabilities are drawn at its middle; a gap (segments the voice-activity gate
    skipped) breaks the lines. Needs matplotlib (imported here, on first use).

    Args:
        segments: The segment dicts (`timestamp`, `scores`).
        ax: A matplotlib axis to draw on (default: a new figure).
        labels: Labels to draw (default: every label in the segments' `scores`).
        title: Axis title.

    Returns:
        The matplotlib `Figure`.
    """
    import matplotlib

    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 3.2))
    else:
        fig = ax.figure
    segments = list(segments)
    if not segments:
        raise ValueError("No segments to plot; label a recording first: pipe(audio, chunk_length_s=4.0, ...).")
    if labels is None:
        labels = list(dict.fromkeys(label for seg in segments for label in seg["scores"]))
    times, rows = [], []
    for i, seg in enumerate(segments):
        start, end = seg["timestamp"]
        if i and start > segments[i - 1]["timestamp"][1]:  # a skipped stretch: break the lines
            times.append(float("nan"))
            rows.append([float("nan")] * len(labels))
        times.append((start + end) / 2)
        rows.append([seg["scores"].get(label, float("nan")) for label in labels])
    values = np.asarray(rows, dtype=float)
    colors = matplotlib.colormaps["tab10"]
    for j, label in enumerate(labels):
        ax.plot(times, values[:, j], marker=".", label=label, color=colors(j % 10))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def register_pipeline() -> None:
    """Register `"icl-speech-emotion"` with `transformers.pipeline` (done on package import)."""
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=IclSpeechEmotionPipeline, pt_model=AutoModel,
                                        type="multimodal")


def save_with_pipeline(model, processor, save_directory: Union[str, os.PathLike], **kwargs) -> None:
    """Save a checkpoint that carries the `"icl-speech-emotion"` pipeline (what training's export calls).

    Writes the weights (safetensors), the processor, the model and pipeline code files, and
    `custom_pipelines` in config.json: what `model.save_pretrained` + `processor.save_pretrained`
    write too, in one call. `kwargs` go to `save_pretrained` (e.g. `safe_serialization`).
    """
    IclSpeechEmotionPipeline(model=model, processor=processor, device=model.device).save_pretrained(
        save_directory, **kwargs
    )


__all__ = ["IclSpeechEmotionPipeline", "SpeakerProfile", "plot_emotion_timeline", "register_pipeline", "save_with_pipeline",
           "TASK"]
