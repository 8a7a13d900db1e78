"""The episodic-split dataset builder and :func:`build_episodes`.

:class:`IclSerEpisodes` is a :class:`datasets.GeneratorBasedBuilder` configured by
:class:`IclSerEpisodesConfig`; it reads one corpus or several (a list of one is the same
path), assigns their speakers to speaker-disjoint ``train``/``validation``/``test`` splits and
writes fixed, reproducible episodes for each, all through :mod:`dataset_builder.multi`.
:func:`build_episodes` is the one-call front door.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import datasets
from datasets.builder import Key

from .corpora import check_texts_known
from .episodes import check_mode, require_texts
from .multi import CorpusSpec, corpus_specs, episode_splits, read_corpora, split_corpora
from .splits import SPLITS
from .synthetic import default_cache_root

#: The columns of an episodes split.
EPISODE_FEATURES = datasets.Features(
    {
        "episode_id": datasets.Value("string"),
        "corpus": datasets.Value("string"),
        "speaker": datasets.Value("string"),
        "enrollment_ids": datasets.List(datasets.Value("string")),
        "enrollment_labels": datasets.List(datasets.Value("string")),
        "query_id": datasets.Value("string"),
        "emotion": datasets.Value("string"),
        "k": datasets.Value("int32"),
        "mode": datasets.Value("string"),
    }
)


@dataclass
class IclSerEpisodesConfig(datasets.BuilderConfig):
    """What episodes to build (every field keys the builder's cache).

    Attributes:
        corpus: A corpus name accepted by ``read_corpus``, or several comma-separated.
        data_dir: The corpus folder / manifest (``None`` for ``synthetic``), one per corpus
            comma-separated with several.
        k: Enrollment utterances per episode.
        mode: ``arbitrary``, ``balanced`` or ``exclude_query_class``.
        episodes_per_speaker: Episodes per speaker and split; ``None`` makes every
            eligible utterance the query once.
        seed: Seed of the speaker assignment and the episodes.
        validation_fraction, test_fraction: Speaker fractions held out (rounded, at least 1).
        validation_speakers, test_speakers: Explicit held-out speakers (override fractions).
        corpus_options: Generator options for ``synthetic`` (``SyntheticConfig`` fields).
        content_disjoint: No enrollment utterance has the query's ``text`` (sentence).
    """

    corpus: str = "synthetic"
    k: int = 4
    mode: str = "arbitrary"
    episodes_per_speaker: Optional[int] = None
    seed: int = 0
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    validation_speakers: Optional[tuple[str, ...]] = None
    test_speakers: Optional[tuple[str, ...]] = None
    corpus_options: Optional[dict[str, Any]] = None
    content_disjoint: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checked here so that bad settings fail before any corpus is read.
        specs = self.specs()
        check_mode(self.mode)
        if not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be an integer >= 0, got {self.k!r}.")
        if self.episodes_per_speaker is not None and self.episodes_per_speaker < 1:
            raise ValueError(f"episodes_per_speaker must be >= 1 or None, got {self.episodes_per_speaker}.")
        for name, folder in specs:
            if name != "synthetic" and folder is None:
                raise ValueError(f"Corpus {name!r} needs data_dir= (its folder or manifest).")
        if self.content_disjoint:
            check_texts_known(name for name, _ in specs)
        if len(specs) == 1 and specs[0][0] != "synthetic" and self.corpus_options:
            # (with several corpora the options go to the synthetic one, if any)
            raise ValueError("corpus_options apply to the synthetic corpus only.")

    def specs(self) -> list[CorpusSpec]:
        """The corpora this config names, each with its folder (a list of one for one corpus)."""
        return corpus_specs(self.corpus, self.data_dir)


class IclSerEpisodes(datasets.GeneratorBasedBuilder):
    """Speaker-disjoint episodic splits of one or several corpora (see :class:`IclSerEpisodesConfig`)."""

    BUILDER_CONFIG_CLASS = IclSerEpisodesConfig
    VERSION = datasets.Version("1.0.0")

    #: An utterance table to use instead of reading the corpus again (set by build_episodes).
    preloaded_utterances: Optional[datasets.Dataset] = None

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=(
                "icl-ser episodes: K enrollment (utterance id, emotion) pairs and one query utterance "
                "of the same speaker; train/validation/test are speaker-disjoint."
            ),
            features=episode_features(len(self.config.specs())),
        )

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        config: IclSerEpisodesConfig = self.config
        specs = config.specs()
        utterances = self.preloaded_utterances
        if utterances is None:
            utterances = read_corpora(specs, **(config.corpus_options or {}))
        assignment = split_corpora(
            utterances, specs,
            seed=config.seed,
            validation_fraction=config.validation_fraction,
            test_fraction=config.test_fraction,
            validation_speakers=config.validation_speakers,
            test_speakers=config.test_speakers,
        )
        episodes = episode_splits(utterances, specs, assignment, config.k, config.mode, config.seed,
                                  config.episodes_per_speaker, config.content_disjoint)
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"episodes": episodes[split]}) for split in SPLITS
        ]

    def _generate_examples(self, episodes: list[dict[str, Any]]) -> Iterator[tuple[Key, dict[str, Any]]]:
        for index, episode in enumerate(episodes):
            yield Key(0, index), episode


def episode_features(n_corpora: int = 1) -> datasets.Features:
    """:data:`EPISODE_FEATURES`, plus each episode's ``labels`` when corpora are mixed."""
    if n_corpora == 1:
        return EPISODE_FEATURES
    return datasets.Features({**EPISODE_FEATURES, "labels": datasets.List(datasets.Value("string"))})


def _table_fingerprint(utterances: datasets.Dataset, content_disjoint: bool = False) -> str:
    """A hash of the table's ids, speakers and labels (and texts, which content-disjoint
    episodes read): changes to the corpus rebuild the cache."""
    digest = hashlib.sha256()
    for column in ("id", "speaker", "emotion"):
        digest.update("\x00".join(utterances[column]).encode("utf-8"))
        digest.update(b"\x01")
    if content_disjoint:  # only then, so that earlier caches stay valid
        digest.update("\x00".join(text or "" for text in utterances["text"]).encode("utf-8"))
    return digest.hexdigest()[:16]


def build_episodes(
    corpus: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    k: int = 4,
    mode: str = "arbitrary",
    episodes_per_speaker: Optional[int] = None,
    seed: int = 0,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    validation_speakers: Optional[Sequence[str]] = None,
    test_speakers: Optional[Sequence[str]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    content_disjoint: bool = False,
    **corpus_options: Any,
) -> datasets.DatasetDict:
    """Build speaker-disjoint episodic ``train``/``validation``/``test`` splits of a corpus.

    Args:
        corpus: A corpus name (``ravdess, cremad, emodb, iemocap, esd, ased, emotiontts-ko,
            manifest, synthetic``), or several comma-separated (``"ravdess,ased"``).
        data_dir: The corpus folder (or manifest), one per corpus comma-separated; not needed
            for ``synthetic``.
        k: Enrollment utterances per episode (0 is allowed).
        mode: ``arbitrary``, ``balanced`` or ``exclude_query_class``.
        episodes_per_speaker: Episodes per speaker; ``None`` (default) makes each eligible
            utterance the query exactly once.
        seed: Seed of the speaker assignment and of the episodes.
        validation_fraction, test_fraction: Held-out speaker fractions (default 15%/15%,
            rounded, at least one speaker each).
        validation_speakers, test_speakers: Explicit held-out speakers instead.
        cache_dir: Where the builder keeps its Arrow files (default
            ``$ICL_SER_CACHE/episodes``).
        content_disjoint: No enrollment utterance has the query's ``text`` (the sentence): acted
            corpora repeat each sentence in every emotion, which real enrollment rarely does.
            Needs texts for every corpus (not ``iemocap``/``synthetic``; a manifest's ``text``).
        **corpus_options: Options of the synthetic generator (``SyntheticConfig`` fields).

    Returns:
        A :class:`datasets.DatasetDict` with columns ``episode_id, corpus, speaker,
        enrollment_ids, enrollment_labels, query_id, emotion, k, mode``.

    Speakers with too few utterances for ``k`` (fewer than K + 1, or in
    ``exclude_query_class`` fewer than K outside the query's emotion) are skipped with a
    warning; a ``k`` no speaker allows, or a split left without speakers, is a ``ValueError``
    (with ``content_disjoint``, too few counts those outside the query's sentence).

    Several corpora (see :mod:`dataset_builder.multi`): speakers are namespaced
    (``"ased/01"``), each corpus is split on its own, and every episode has a ``labels``
    column, its corpus' label set. One corpus is the same path with a list of one.
    """
    specs = corpus_specs(str(corpus), None if data_dir is None else os.fspath(data_dir))
    # Absolute folders: the cache key does not depend on the working directory.
    folders = ",".join("" if folder is None else os.path.abspath(folder) for _, folder in specs)
    config_kwargs: dict[str, Any] = dict(
        corpus=corpus,
        k=k,
        mode=mode,
        episodes_per_speaker=episodes_per_speaker,
        seed=seed,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        validation_speakers=tuple(validation_speakers) if validation_speakers is not None else None,
        test_speakers=tuple(test_speakers) if test_speakers is not None else None,
        corpus_options=dict(corpus_options) or None,
    )
    if content_disjoint:  # only then, so that the cache keys of earlier builds stay the same
        config_kwargs["content_disjoint"] = True
    if data_dir is not None:
        config_kwargs["data_dir"] = folders
    config = IclSerEpisodesConfig(**config_kwargs)  # validate every setting before reading the corpus
    utterances = read_corpora(config.specs(), **corpus_options)
    if content_disjoint:
        require_texts(utterances)  # e.g. a manifest without a text column
    builder = IclSerEpisodes(
        cache_dir=str(Path(cache_dir) if cache_dir is not None else default_cache_root() / "episodes"),
        dataset_name="icl_ser_episodes",
        hash=_table_fingerprint(utterances, content_disjoint),
        **config_kwargs,
    )
    builder.preloaded_utterances = utterances
    builder.download_and_prepare()
    return builder.as_dataset()
