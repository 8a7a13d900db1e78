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

import os
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import AutoModel, Pipeline
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .audio_utils import AudioInput, Recording, check_not_silent, load_audio
from .modeling_icl_ser import IclSerContextReadout
from .profile_icl_ser import PROFILE_FORMAT, SpeakerProfile, is_profile
from .recording_icl_ser import MIN_UNLABELLED, check_options, label_recording
from .recording_outputs_icl_ser import plot_emotion_timeline
from .segmentation_icl_ser import SileroVad
from .speaker_check_icl_ser import load_speaker_encoder, speaker_embedding
from .speaker_routes import speaker_statistics

TASK = "icl-speech-emotion"
# Per-call parameters: they describe one speaker, so they never belong to the constructor.
_CALL_ONLY = ("enrollment", "profile", "labels", "unlabelled")
# Parameters that make a call label a long recording segment by segment (`stream`).
_LONG_ONLY = ("chunk_length_s", "stride_length_s", "vad_threshold_db", "vad_min_speech", "segmentation",
              "min_silence_s", "max_segment_s", "min_speech_s", "vad_threshold", "target_speaker", "speaker_threshold",
              "min_unlabelled")


# ----------------------------------------------------------------------------- call context
@dataclass
class _Context:
    """One call's resolved speaker context: candidates and either decoded enrollment or a profile,
    and the `(U, F)` summaries of the speaker's unlabelled speech (None when there is none)."""

    labels: list[str]
    enrollment: list[tuple[np.ndarray, str]]
    profile: Optional[SpeakerProfile] = None
    unlabelled: Optional[torch.Tensor] = None


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


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
    - `pipe(recording, profile=profile, segmentation="vad")` → one
      `{"timestamp", "speaker", "label", "score", "scores"}` per utterance of a long recording
      (`target_speaker=True`: only the enrolled speaker's are labelled; `chunk_length_s=4.0`:
      fixed windows instead); `pipe.stream(...)` yields them one by one (see `stream`).
    - `pipe.enroll(enrollment, unlabelled=[audio, ...])`: unlabelled speech of the speaker adds
      to the statistics of speaker normalization (also `pipe(audio, unlabelled=[...])`).
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
    def _sanitize_parameters(self, enrollment=None, profile=None, labels=None, top_k=None, sampling_rate=None,
                             unlabelled=None):
        preprocess, postprocess = {}, {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if top_k is not None:
            postprocess["top_k"] = _positive_int("top_k", top_k)
        if sampling_rate is None:
            sampling_rate = getattr(self, "_preprocess_params", {}).get("sampling_rate")
        # Resolved (and the enrollment decoded) here, once per call, before any query work.
        context = self._context(enrollment, profile, labels, sampling_rate, unlabelled)
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
                hint = (" For a long recording, pass segmentation='vad' to label it utterance by utterance "
                        "(or chunk_length_s=4.0 for fixed windows).")
            raise ValueError(f"{where}: {error}{hint}") from None

    def _context(self, enrollment, profile, labels, sampling_rate, unlabelled=None) -> _Context:
        proc = self.processor
        if profile is not None:
            if enrollment is not None:
                raise ValueError("Pass either enrollment= or profile=, not both.")
            candidates = self._check_profile(profile, labels)
            summaries = self._unlabelled_inputs(unlabelled, sampling_rate, voices=False)[0]
            if profile.unlabelled is not None:
                summaries = profile.unlabelled if summaries is None else torch.cat([profile.unlabelled, summaries])
            return _Context(candidates, [], profile, summaries)
        candidates = proc._check_labels(list(proc.labels) if labels is None else list(labels), "labels")
        pairs = proc._check_pairs([] if enrollment is None else enrollment, 0)
        proc._check_enrollment_labels([pairs], [None], candidates)
        audios = [self._load(audio, sampling_rate, f"enrollment audio {j}") for j, (audio, _) in enumerate(pairs)]
        summaries = self._unlabelled_inputs(unlabelled, sampling_rate, voices=False)[0]
        return _Context(candidates, [(audio, label) for audio, (_, label) in zip(audios, pairs)], None, summaries)

    def _unlabelled_inputs(self, clips, sampling_rate, voices: bool = True
                           ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """`(U, F)` summaries of unlabelled clips (None for none) and, with `voices` and the speaker
        encoder installed, their `(U, 256)` speaker embeddings. Every clip is checked first."""
        if clips is None:
            return None, None
        if isinstance(clips, (str, os.PathLike, dict, np.ndarray, torch.Tensor)) or not isinstance(clips, (list, tuple)):
            raise ValueError(f"unlabelled must be a list of audio clips of the speaker (no labels), got "
                             f"{type(clips).__name__}; e.g. unlabelled=['call1.wav', 'call2.wav'].")
        if any(isinstance(clip, tuple) and len(clip) == 2 and isinstance(clip[1], str) for clip in clips):
            raise ValueError("unlabelled takes audio clips without labels; pass labelled (audio, label) pairs as "
                             "enrollment= instead.")
        samples = [self._load(clip, sampling_rate, f"unlabelled audio {j}") for j, clip in enumerate(clips)]
        if not samples:
            return None, None
        summaries = torch.from_numpy(np.atleast_2d(self.embed(samples, sampling_rate=self.processor.sampling_rate)))
        encoder = load_speaker_encoder() if voices else None
        return summaries, (None if encoder is None else torch.from_numpy(encoder.embed(samples)))

    def _vad_model(self) -> Optional[SileroVad]:
        """The VAD, loaded once per pipeline (None when silero-vad is not installed)."""
        if not hasattr(self, "_vad"):
            self._vad = SileroVad.from_package()
        return self._vad

    def _check_profile(self, profile, labels) -> list[str]:
        if not is_profile(profile):
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
        self, enrollment: Optional[Sequence] = None, labels: Optional[Sequence[str]] = None,
        sampling_rate: Optional[int] = None, unlabelled: Optional[Sequence] = None,
    ) -> SpeakerProfile:
        """Encode a speaker's enrollment once and keep the prompt prefix's key/value cache.

        Args:
            enrollment: `(audio, label)` pairs (K = 0 allowed: a speaker-independent profile,
                or, with `unlabelled`, one that carries only unlabelled speech).
            labels: Candidate labels (default: the checkpoint's vocabulary); fixed for the profile.
            sampling_rate: Rate of raw arrays/tensors.
            unlabelled: Other clips of the same speaker, without labels: speaker normalization
                takes its statistics from the enrollment plus these (more can be added later
                with `profile.add_unlabelled(clips, pipe)`).

        Returns:
            A [`SpeakerProfile`]; `pipe(audio, profile=profile)` then gives the same
            probabilities as `pipe(audio, enrollment=enrollment, labels=labels, unlabelled=unlabelled)`.
            With the speaker encoder installed (`resemblyzer`, see offline-weights.txt) it also
            holds the speaker's voice print, for `target_speaker=True` on a recording.
        """
        context = self._context(enrollment, None, labels, sampling_rate)
        summaries, voices = self._unlabelled_inputs(unlabelled, sampling_rate)
        proc = self.processor
        enrollment_labels = [label for _, label in context.enrollment]
        prefix = proc.prefix_ids(enrollment_labels, context.labels)
        inputs = {"input_ids": torch.tensor([prefix]), "attention_mask": torch.ones(1, len(prefix), dtype=torch.long)}
        enrollment_context = statistics = None
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
                statistics = self._audio_statistics(hidden, mask, summaries)
                if statistics is not None:  # the prefix's audio tokens, normalized as an inline call's
                    inputs["audio_statistics"] = [statistics]
            out = self.model(**self._ensure_tensor_on_device(inputs, self.device), use_cache=True, logits_to_keep=1)
        cache = out.cache
        layers = getattr(cache, "layers", None)
        # A prefix can only be replayed from full-attention dynamic layers (a sliding window drops tokens).
        if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
            raise ValueError(f"Speaker profiles need a language model with a plain full-attention cache; this one "
                             f"uses {kinds}. Call the pipeline with enrollment= instead.")
        encoder = load_speaker_encoder()
        if encoder is not None and context.enrollment:
            enrolled = torch.from_numpy(encoder.embed([a for a, _ in context.enrollment]))
            voices = enrolled if voices is None else torch.cat([enrolled, voices])
        return SpeakerProfile(labels=list(context.labels), enrollment_labels=enrollment_labels, prefix_ids=prefix,
                              model_fingerprint=self.model_fingerprint,
                              keys=[layer.keys for layer in layers], values=[layer.values for layer in layers],
                              enrollment_context=enrollment_context, unlabelled=summaries, speaker_embeddings=voices,
                              audio_statistics=statistics)

    def _audio_statistics(self, hidden, mask, unlabelled) -> Optional[torch.Tensor]:
        """`(2, F)` statistics of the enrollment frames plus `unlabelled` summaries that normalize a
        profile's LM input (`speaker_normalized_audio_tokens`); None for other models."""
        config = self.model.config
        if not getattr(config, "speaker_normalized_audio_tokens", False):
            return None
        summaries = IclSerContextReadout.summarize(hidden, mask)
        if unlabelled is not None:
            summaries = torch.cat([summaries, unlabelled.to(summaries.device, summaries.dtype)])
        return torch.stack(speaker_statistics(summaries, float(config.speaker_variance_floor)))

    # ------------------------------------------------------------------------ run
    def __call__(self, inputs, **kwargs):
        """Label one query audio, or a list of them (see the class docstring for parameters).

        With any long-recording parameter (`segmentation=`, `chunk_length_s=`, `target_speaker=`,
        `unlabelled="recording"`, ...) the input is one long recording: the list of its
        segments' results (see `stream`)."""
        if any(name in kwargs for name in _LONG_ONLY) or kwargs.get("unlabelled") == "recording":
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
        segmentation: Optional[str] = None,
        min_silence_s: float = 0.3,
        max_segment_s: float = 12.0,
        min_speech_s: float = 0.25,
        vad_threshold: float = 0.5,
        chunk_length_s: Optional[float] = None,
        stride_length_s: Optional[float] = None,
        vad_threshold_db: Optional[float] = -50.0,
        vad_min_speech: float = 0.1,
        target_speaker: bool = False,
        speaker_threshold: Optional[float] = None,
        unlabelled: Optional[str] = "recording",
        min_unlabelled: int = MIN_UNLABELLED,
        batch_size: int = 8,
        top_k: Optional[int] = None,
    ) -> Iterator[dict[str, Any]]:
        """Label a long recording utterance by utterance, yielding each result in time order.

        `pipe(audio, segmentation="vad", ...)` (or any other parameter below) is
        `list(pipe.stream(audio, ...))`. A file is read 30 s at a time and each utterance is
        labelled once the pause after it is heard, so memory stays flat however long it is.

        Segments (`segmentation`; default "vad", or "fixed" when `chunk_length_s` or
        `stride_length_s` is given):
            "vad": utterances found by Silero VAD (the `silero-vad` package; without it, the
            energy gate below scores the frames, with a logged warning). An utterance ends after
            `min_silence_s` of pause; a turn longer than `max_segment_s` is split at its quietest
            point; utterances shorter than `min_speech_s` are dropped; `vad_threshold` is the
            speech probability a frame needs.
            "fixed": windows of `chunk_length_s` (default 4) seconds overlapping by
            `stride_length_s` (default 1), the last one moved back to end at the end; a window is
            skipped unless `vad_min_speech` of its 30 ms frames reach `vad_threshold_db` dBFS
            (`None` labels every window).

        Speaker:
            target_speaker: Check each segment's voice against the profile's speaker (needs a
                profile or `enrollment`, and the speaker encoder, see offline-weights.txt): the
                call's segments so far are split into the enrolled speaker's and the other's
                (`speaker_check_icl_ser.TargetSpeakerTracker`). Only the enrolled speaker's
                segments are labelled; the others come back with `"speaker": "other"` and no label.
            speaker_threshold: Cosine similarity to the enrolled voice print at or above which a
                segment starts out as theirs (default `speaker_check_icl_ser.DEFAULT_THRESHOLD`).
            unlabelled: "recording" (default): speaker normalization also takes its statistics
                from the recording's own speech (the enrolled speaker's segments with
                `target_speaker`), once `min_unlabelled` segments have been heard (the first
                ones wait until then); a shorter recording is labelled without them. None: only
                the profile's enrollment and unlabelled clips.

        Speaker context as for a single query (`enrollment=` is enrolled once, as a profile).
        Segments go through the encoder and the LM `batch_size` at a time.

        Yields:
            `{"timestamp": (start_s, end_s), "speaker", "label", "score", "scores"}`: `speaker`
            is "target" or "other" with `target_speaker` (plus `speaker_score`, the cosine
            similarity), else None; `label`/`score` the best label; `scores` over all candidates
            in candidate order, or the `top_k` best. Another speaker's segment has label and
            score None and empty scores.

        Raises:
            ValueError: bad settings (e.g. `max_segment_s <= min_speech_s`), a missing, empty or
                non-audio input, a profile from another checkpoint, `target_speaker` without a
                profile or without the speaker encoder (all before any model work), or, once the
                recording is read, no speech found in it.
        """
        proc = self.processor
        options = check_options(proc.audio_limit_seconds, segmentation, chunk_length_s, stride_length_s,
                                min_silence_s=min_silence_s, max_segment_s=max_segment_s, min_speech_s=min_speech_s,
                                vad_threshold=vad_threshold, vad_threshold_db=vad_threshold_db,
                                vad_min_speech=vad_min_speech, target_speaker=target_speaker,
                                speaker_threshold=speaker_threshold, unlabelled=unlabelled,
                                min_unlabelled=min_unlabelled, batch_size=batch_size, top_k=top_k)
        if profile is not None:
            self._check_profile(profile, labels)
        encoder = None
        if options.target_speaker:
            if profile is None and not enrollment:
                raise ValueError("target_speaker=True picks the enrolled speaker's segments, so it needs a profile "
                                 "(profile=pipe.enroll([...])) or enrollment=[...] of that speaker.")
            encoder = load_speaker_encoder(required=True, why="target_speaker=True needs the speaker encoder")
            if profile is not None and profile.speaker_embedding is None:
                raise ValueError("This profile holds no voice print (it was made without the speaker encoder); "
                                 "enroll the speaker again with it installed to use target_speaker=True.")
        recording = Recording(audio, sampling_rate, proc.sampling_rate)  # checks the input, reads nothing yet
        return self._stream(recording, enrollment, profile, labels, sampling_rate, options, encoder)

    def _stream(self, recording, enrollment, profile, labels, sampling_rate, options, encoder) -> Iterator[dict[str, Any]]:
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
            reference = None
            if encoder is not None:
                reference = (profile.speaker_embedding if profile is not None
                             else speaker_embedding(encoder, [a for a, _ in context.enrollment]))
            yield from label_recording(self, recording, context, options, reference, encoder)

    def _encode(self, audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder frames, their mask and the `(N, F)` summaries of a batch of clips (one encoder pass)."""
        inputs = {k: torch.from_numpy(v) for k, v in self.processor.audio_inputs(audios).items()}
        with self.device_placement(), torch.no_grad():
            inputs = self._ensure_tensor_on_device(inputs, self.device)
            hidden, mask = self.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
            return hidden, mask, IclSerContextReadout.summarize(hidden, mask.to(hidden.device))

    def _classify(self, context: _Context, audios: list[np.ndarray], encoded=None, unlabelled=None) -> torch.Tensor:
        """`(N, C)` probabilities of a batch of clips under `context`, with `unlabelled` `(U, F)`
        summaries as the speaker's unlabelled speech (default: the context's)."""
        inputs = {"audio": audios, "encoded": encoded}
        context = _Context(context.labels, context.enrollment, context.profile,
                           context.unlabelled if unlabelled is None else unlabelled)
        with self.device_placement(), torch.no_grad():
            return self.forward(inputs, context=context)["probs"]

    @staticmethod
    def _result(timestamp, row, labels, top_k, who) -> dict[str, Any]:
        """One segment's result dict (`row` None: another speaker's segment, not labelled)."""
        speaker, similarity = who
        result = {"timestamp": (round(timestamp[0], 3), round(timestamp[1], 3)), "speaker": speaker,
                  "label": None, "score": None, "scores": {}}
        if similarity is not None:
            result["speaker_score"] = round(similarity, 4)
        if row is not None:
            ranked = sorted(zip(labels, row), key=lambda pair: pair[1], reverse=True)
            keep = {label for label, _ in ranked[: top_k or len(ranked)]}
            result.update(label=ranked[0][0], score=ranked[0][1],
                          scores={label: p for label, p in zip(labels, row) if label in keep})
        return result

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
        extra = {}
        if context.unlabelled is not None:  # the same speaker in every row
            extra["unlabelled_summaries"] = [context.unlabelled.to(self.device)] * len(audios)
        if context.profile is None:
            batch = proc(query=audios, enrollment=[context.enrollment] * len(audios), labels=context.labels,
                         sampling_rate=proc.sampling_rate)
            probs = self.model.classify(**self._ensure_tensor_on_device(dict(batch), self.device), **extra)
            return {"probs": probs.float()}
        # Profile: only the query line runs, on top of the cached prefix. Every query line has the
        # same tokens (num_audio_tokens placeholders), so the batch needs no padding.
        profile, query = context.profile, proc.query_ids()
        inputs = {k: torch.from_numpy(v) for k, v in proc.candidate_inputs(context.labels).items()}
        inputs["input_ids"] = torch.tensor([query] * len(audios))
        inputs["attention_mask"] = torch.ones(len(audios), len(profile.prefix_ids) + len(query), dtype=torch.long)
        inputs = self._ensure_tensor_on_device(inputs, self.device)
        hidden, mask, _ = model_inputs.get("encoded") or self._encode(audios)  # encoded once (a recording's batch)
        inputs.update(audio_hidden_states=hidden, audio_hidden_mask=mask)
        if profile.enrollment_context is not None:
            inputs["enrollment_context"] = profile.enrollment_context.to(self.device)[None].expand(len(audios), -1, -1)
        if profile.audio_statistics is not None:
            inputs["audio_statistics"] = [profile.audio_statistics.to(self.device)] * len(audios)
        probs = self.model.classify(**inputs, **extra, cache=profile.cache(len(audios), self.device))
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


__all__ = ["IclSpeechEmotionPipeline", "PROFILE_FORMAT", "SpeakerProfile", "plot_emotion_timeline", "register_pipeline",
           "save_with_pipeline", "TASK"]
