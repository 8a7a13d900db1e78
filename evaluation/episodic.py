"""Episodes → model inputs, shared by train.py and eval.py.

An episode (from :mod:`dataset_builder`) names utterances by id. This module turns episodes
into examples for :class:`IclSerDataCollator` — with cached frozen-encoder outputs when the
encoder is frozen, or with audio paths when it is trained — and scores them with
``model.classify``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_icl_ser import IclSerDataCollator, IclSerForConditionalGeneration, IclSerProcessor

if TYPE_CHECKING:
    import datasets


def native_bf16_available(device: Union[str, torch.device] = "cpu") -> bool:
    """True where bf16 matrix work runs natively (recent GPUs; CPUs with AVX512-BF16/AMX).

    There, bf16 autocast roughly halves the time of training and scoring steps (measured 2.2x
    on this project's AVX512-BF16 CPU for the LM's matmuls).
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class EncodedUtterances:
    """Frozen-encoder outputs of a corpus' utterances, looked up by utterance id.

    Encodes every utterance of ``utterances`` once (through the on-disk
    :class:`dataset_builder.FeatureCache` when ``cache_dir`` is given, so a later run or
    another process reuses them) and keeps the valid frames of each in memory.

    Args:
        model: The model whose audio encoder produces the features.
        processor: Its processor (feature extraction).
        utterances: Rows with ``id`` and ``path`` (the table from ``read_corpus``).
        cache_dir: Root of the on-disk feature cache; ``None`` keeps features in memory only.
        batch_size: Utterances encoded per encoder call.
        show_progress: Show a progress bar while encoding.
    """

    def __init__(
        self,
        model: IclSerForConditionalGeneration,
        processor: IclSerProcessor,
        utterances: Iterable[Mapping[str, Any]],
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        batch_size: int = 16,
        show_progress: bool = True,
    ) -> None:
        from dataset_builder import FeatureCache, encode_paths

        rows = list(utterances)
        self.encoder_id = model.audio_encoder_fingerprint()
        cache = FeatureCache(cache_dir, self.encoder_id) if cache_dir is not None else None
        paths = [row["path"] for row in rows]
        progress = tqdm(total=len(paths), desc="encoding utterances", disable=not show_progress)

        @torch.no_grad()
        def encode(arrays: list[np.ndarray]) -> list[torch.Tensor]:
            inputs = processor.audio_inputs(arrays)
            device = next(model.parameters()).device
            hidden, mask = model.get_audio_features(
                torch.as_tensor(inputs["input_features"], device=device),
                torch.as_tensor(inputs["feature_attention_mask"], device=device),
            )
            progress.update(len(arrays))
            return [h[m].float().cpu() for h, m in zip(hidden, mask)]

        features = encode_paths(cache, paths, encode, batch_size=batch_size, sampling_rate=processor.sampling_rate)
        progress.close()
        self.features: dict[str, torch.Tensor] = {row["id"]: f for row, f in zip(rows, features)}

    def __getitem__(self, utterance_id: str) -> torch.Tensor:
        return self.features[utterance_id]

    def __len__(self) -> int:
        return len(self.features)


def episode_example(
    episode: Mapping[str, Any],
    paths: Mapping[str, str],
    encoded: Optional[EncodedUtterances] = None,
) -> dict[str, Any]:
    """One episode as an :class:`IclSerDataCollator` example.

    With ``encoded``, the example carries cached encoder outputs; otherwise audio paths. An
    episode's own ``labels`` (its corpus' label set, when corpora are mixed) become the
    example's ``candidate_labels``.
    """
    enrollment_ids, labels = list(episode["enrollment_ids"]), list(episode["enrollment_labels"])
    own = {"candidate_labels": list(episode["labels"])} if episode.get("labels") else {}
    if encoded is not None:
        return {
            "query_hidden_states": encoded[episode["query_id"]],
            "enrollment_hidden_states": [encoded[i] for i in enrollment_ids],
            "enrollment_labels": labels,
            "answer": episode["emotion"],
            **own,
        }
    return {
        "query": paths[episode["query_id"]],
        "enrollment": [(paths[i], label) for i, label in zip(enrollment_ids, labels)],
        "answer": episode["emotion"],
        **own,
    }


@torch.no_grad()
def predict_episodes(
    model: IclSerForConditionalGeneration,
    collator: IclSerDataCollator,
    episodes: Sequence[Mapping[str, Any]],
    paths: Mapping[str, str],
    labels: Sequence[str],
    encoded: Optional[EncodedUtterances] = None,
    batch_size: int = 8,
    show_progress: bool = False,
    description: str = "episodes",
    return_routes: bool = False,
) -> Union[np.ndarray, dict[str, Optional[np.ndarray]]]:
    """Class probabilities ``(n_episodes, len(labels))`` of ``model.classify`` on episodes.

    With ``return_routes``, a dict of such arrays per route instead (``classify(...,
    return_routes=True)``: "lm", "si", "prototype"; None for a route the model lacks, NaN rows
    where a route cannot score), for ``evaluation.route_weights``.

    An episode with its own ``labels`` (episodes of several corpora) is scored over those only:
    episodes are batched by label set, and the columns of ``labels`` outside an episode's set
    are 0 in its row. Episodes with ``unlabelled_ids`` (``dataset_builder.attach_unlabelled``)
    pass those utterances' summaries as the rows' unlabelled speech (needs ``encoded``).

    Raises:
        ValueError: an episode's query or enrollment label is not in its label set, or its label
            set is not within ``labels``.
    """
    labels = list(labels)
    for episode in episodes:
        own = list(episode.get("labels") or labels)
        used = {episode["emotion"], *episode["enrollment_labels"]}
        unknown = sorted((used - set(own)) | (set(own) - set(labels)))
        if unknown:
            raise ValueError(
                f"Episodes use labels {unknown} that are not in the label set {own if set(own) <= set(labels) else labels}; "
                "pass --labels including them (or evaluate on a corpus with this label set)."
            )
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, episode in enumerate(episodes):
        groups.setdefault(tuple(episode.get("labels") or labels), []).append(index)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    routes: dict[str, Optional[np.ndarray]] = {}
    batches = [(group, indices[start : start + batch_size])
               for group, indices in groups.items() for start in range(0, len(indices), batch_size)]
    for group, indices in tqdm(batches, desc=description, disable=not show_progress):
        batch = collator([episode_example(episodes[i], paths, encoded) for i in indices])
        batch = {name: value.to(device) for name, value in batch.items()}
        columns = [labels.index(label) for label in group]
        unlabelled = unlabelled_summaries([episodes[i] for i in indices], encoded, device)
        scored = model.classify(**batch, return_routes=return_routes, unlabelled_summaries=unlabelled)
        for name, value in (scored.items() if return_routes else [("mixed", scored)]):
            if value is None:
                routes.setdefault(name, None)
                continue
            if routes.get(name) is None:
                routes[name] = np.zeros((len(episodes), len(labels)), dtype=np.float32)
            routes[name][np.ix_(indices, columns)] = value.float().cpu().numpy()
    model.train(was_training)
    if return_routes:
        return routes
    return routes.get("mixed", np.zeros((len(episodes), len(labels)), dtype=np.float32))


def unlabelled_summaries(episodes: Sequence[Mapping[str, Any]], encoded: Optional[EncodedUtterances],
                         device: Union[str, torch.device] = "cpu") -> Optional[list[Optional[torch.Tensor]]]:
    """Per episode, the ``(U, F)`` summaries of its ``unlabelled_ids`` (None without any); None
    when no episode has unlabelled speech."""
    if not any(episode.get("unlabelled_ids") for episode in episodes):
        return None
    if encoded is None:
        raise ValueError("Unlabelled speech in episodes needs cached encoder features (encoded=...).")
    rows = []
    for episode in episodes:
        ids = episode.get("unlabelled_ids") or []
        rows.append(torch.stack([utterance_summary(encoded[i]) for i in ids]).to(device) if ids else None)
    return rows


def utterance_summary(frames: torch.Tensor) -> torch.Tensor:
    """The model's summary vector (`IclSerContextReadout.summarize`: mean and std) of one
    utterance's cached `(T, D)` encoder frames."""
    from modeling_icl_ser.readout import IclSerContextReadout

    return IclSerContextReadout.summarize(frames[None].float(), torch.ones(1, len(frames), dtype=torch.bool))[0]


def with_audio_paths(episodes: "datasets.Dataset", utterances: "datasets.Dataset") -> "datasets.Dataset":
    """Add collator fields to an episodic split: ``query`` (path), ``enrollment``, ``answer``.

    The result feeds ``transformers.Trainer`` with ``IclSerDataCollator`` (set
    ``remove_unused_columns=False``)::

        train = with_audio_paths(build_episodes("synthetic")["train"], read_corpus("synthetic"))
        Trainer(model, args, train_dataset=train, data_collator=IclSerDataCollator(processor))
    """
    paths = dict(zip(utterances["id"], utterances["path"]))

    def attach(episode: dict) -> dict:
        return {
            "query": paths[episode["query_id"]],
            "enrollment": {"audio": [paths[i] for i in episode["enrollment_ids"]], "label": episode["enrollment_labels"]},
            "answer": episode["emotion"],
        }

    return episodes.map(attach)
