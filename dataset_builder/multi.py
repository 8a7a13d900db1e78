"""Several corpora at once: namespaced speakers, per-corpus splits and per-corpus label sets.

``--corpus ravdess,ased,emotiontts-ko --data_dir A,B,C`` reads each corpus and stacks the
tables. With more than one corpus:

* speaker ids are namespaced by corpus (``"ased/01"``), so two corpora's speaker ``"01"``
  never merge;
* the train/validation/test split is drawn within each corpus (speaker-disjoint there, every
  corpus contributes to every split), unless explicit (namespaced) speaker lists are given;
* an episode is one speaker's, so it never mixes corpora, and it carries ``labels``: its own
  corpus' label set, the candidates its instruction lists and that it is scored over.

A single corpus is a list of one and takes the same path (:func:`read_corpora` ->
:func:`split_corpora` -> :func:`episode_splits` / :func:`split_episodes`); it keeps its plain
speaker ids and no ``labels`` field, so earlier splits, episodes and checkpoints reproduce
exactly.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import datasets

from .corpora import check_corpus_name, read_corpus
from .episodes import build_pools, fixed_episodes, require_texts, usable_pools
from .splits import split_speakers
from .virtual_speakers import real_speaker

#: A corpus name and its folder (None for ``synthetic``).
CorpusSpec = tuple[str, Optional[str]]

_NAMESPACE = "/"


def parse_corpora(corpus: str, data_dir: Optional[str] = None, flags: str = "--corpus/--data_dir") -> list[CorpusSpec]:
    """``"ravdess,ased"`` + ``"A,B"`` as ``[("ravdess", "A"), ("ased", "B")]``.

    An empty place in ``data_dir`` (``"A,,C"``) means no folder (the synthetic corpus).

    Raises:
        ValueError: an empty or unknown name, a corpus named twice, or a ``data_dir`` list
            whose length differs from the corpus list's.
    """
    corpus_flag, dir_flag = flags.split("/")
    names = [name.strip() for name in str(corpus).split(",")]
    if not all(names):
        raise ValueError(f"{corpus_flag} {corpus!r} has an empty name; separate corpus names by commas, e.g. ravdess,ased.")
    for name in names:
        check_corpus_name(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{corpus_flag} names {repeated} more than once; name each corpus once.")
    if data_dir is None:
        folders: list[Optional[str]] = [None] * len(names)
    else:
        folders = [folder.strip() or None for folder in str(data_dir).split(",")]
        if len(folders) != len(names):
            raise ValueError(
                f"{corpus_flag} names {len(names)} corpora but {dir_flag} gives {len(folders)} folder(s); "
                "give one folder per corpus, comma-separated in the same order."
            )
    return list(zip(names, folders))


def corpus_specs(corpus: str, data_dir: Optional[str] = None) -> list[CorpusSpec]:
    """:func:`parse_corpora`, except that one corpus keeps its folder whole (a comma in a path
    is no separator there): ``"ravdess"`` + ``"A"`` -> ``[("ravdess", "A")]``."""
    if "," not in str(corpus):
        return [(check_corpus_name(str(corpus)), data_dir)]
    return parse_corpora(corpus, data_dir)


def namespaced(corpus: str, speaker: str) -> str:
    """The speaker id used when corpora are mixed: ``"ased/01"``."""
    return f"{corpus}{_NAMESPACE}{speaker}"


def corpus_of(speaker: str) -> str:
    """The corpus of a namespaced (possibly virtual) speaker id: ``"ased/01@v2"`` -> ``"ased"``."""
    return real_speaker(speaker).split(_NAMESPACE, 1)[0]


def read_corpora(specs: Sequence[CorpusSpec], **corpus_options: Any) -> datasets.Dataset:
    """One utterance table of all corpora (speakers namespaced when there is more than one).

    ``corpus_options`` go to the synthetic corpus only.
    """
    if len(specs) == 1:
        name, folder = specs[0]
        return read_corpus(name, folder, **corpus_options)
    tables = []
    for name, folder in specs:
        table = read_corpus(name, folder, **(corpus_options if name == "synthetic" else {}))
        speakers = [namespaced(name, speaker) for speaker in table["speaker"]]
        tables.append(table.remove_columns("speaker").add_column("speaker", speakers).select_columns(table.column_names))
    return datasets.concatenate_datasets(tables)


def label_sets(table: datasets.Dataset, specs: Sequence[CorpusSpec]) -> Optional[dict[str, list[str]]]:
    """``{corpus: its sorted emotions}`` when corpora are mixed; None for one corpus."""
    if len(specs) == 1:
        return None
    sets: dict[str, set[str]] = {}
    for speaker, emotion in zip(table["speaker"], table["emotion"]):
        sets.setdefault(corpus_of(speaker), set()).add(emotion)
    return {corpus: sorted(emotions) for corpus, emotions in sets.items()}


def with_labels(episode: Mapping[str, Any], sets: Optional[Mapping[str, list[str]]]) -> dict[str, Any]:
    """The episode with its corpus' label set as ``labels`` (unchanged for one corpus)."""
    if sets is None:
        return dict(episode)
    return {**episode, "labels": list(sets[corpus_of(episode["speaker"])])}


def split_corpora(
    table: datasets.Dataset,
    specs: Sequence[CorpusSpec],
    seed: int = 0,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    validation_speakers: Optional[Sequence[str]] = None,
    test_speakers: Optional[Sequence[str]] = None,
) -> dict[str, list[str]]:
    """Speaker-disjoint ``train/validation/test`` speakers, drawn within each corpus.

    One corpus: exactly :func:`split_speakers`. Several: explicit lists (namespaced ids) are
    applied to the whole pool; otherwise each corpus is split with the fractions and seed.
    """
    options = dict(validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed)
    if len(specs) == 1 or validation_speakers is not None or test_speakers is not None:
        return split_speakers(table["speaker"], validation_speakers=validation_speakers, test_speakers=test_speakers, **options)
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for name, _ in specs:
        speakers = [s for s in set(table["speaker"]) if corpus_of(s) == name]
        for split, members in split_speakers(speakers, **options).items():
            splits[split] += members
    return {split: sorted(members) for split, members in splits.items()}


def episode_splits(
    table: datasets.Dataset,
    specs: Sequence[CorpusSpec],
    splits: Mapping[str, Sequence[str]],
    k: int,
    mode: str,
    seed: int = 0,
    episodes_per_speaker: Optional[int] = None,
    content_disjoint: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """The fixed episodes of every split at once (what :func:`build_episodes` stores).

    Speakers too small for ``k`` are skipped with one warning for the whole table; each
    split's episodes are then those :func:`split_episodes` gives for its speakers. With
    ``content_disjoint`` no enrollment utterance has the query's ``text``.

    Raises:
        ValueError: no speaker allows ``k`` in ``mode``, a split is left without one, or
            ``content_disjoint`` with a corpus that has no texts.
    """
    if content_disjoint:
        require_texts(table)
    usable = usable_pools(build_pools(table), k, mode, content_disjoint=content_disjoint)
    episodes = {}
    for split, speakers in splits.items():
        split_pools = {s: usable[s] for s in speakers if s in usable}
        if not split_pools:
            raise ValueError(
                f"The {split} split is empty: none of its speakers {list(speakers)} has enough utterances "
                f"for k={k} in mode {mode!r}. Lower k or choose other {split} speakers."
            )
        episodes[split] = _numbered_episodes(split_pools, table, specs, split, k, mode, seed, episodes_per_speaker,
                                             content_disjoint)
    return episodes


def split_episodes(
    table: datasets.Dataset,
    specs: Sequence[CorpusSpec],
    speakers: Sequence[str],
    split: str,
    k: int,
    mode: str,
    seed: int = 0,
    episodes_per_speaker: Optional[int] = None,
    content_disjoint: bool = False,
    query_k: Optional[int] = None,
) -> list[dict[str, Any]]:
    """The fixed episodes of ``speakers`` (one split), as :func:`build_episodes` makes them.

    ``query_k``: draw the queries among those eligible at this K (the sweep's largest), so every
    K of a sweep has the same queries (:func:`fixed_episodes`).

    For one corpus these are the episodes of ``build_episodes(...)[split]`` with the same split
    (same seed, same speakers); with several, each also carries its corpus' ``labels``. With
    ``content_disjoint`` no enrollment utterance has the query's ``text``.

    Raises:
        ValueError: no speaker, no speaker with enough utterances for ``k`` in ``mode``, or
            ``content_disjoint`` with a corpus that has no texts.
    """
    if not speakers:
        raise ValueError(f"The {split} split has no speaker; choose {split} speakers.")
    if content_disjoint:
        require_texts(table)
    pools = build_pools(table)
    usable = usable_pools({s: pools[s] for s in speakers}, max(k, query_k or 0), mode, context=f" ({split} speakers)",
                          content_disjoint=content_disjoint)
    return _numbered_episodes(usable, table, specs, split, k, mode, seed, episodes_per_speaker, content_disjoint, query_k)


def _numbered_episodes(pools, table, specs, split, k, mode, seed, episodes_per_speaker,
                       content_disjoint=False, query_k=None) -> list[dict[str, Any]]:
    """:func:`fixed_episodes` of ``pools`` with ids (``split/speaker/00000``), corpus and labels."""
    sets = label_sets(table, specs)
    episodes, counters = [], {}
    for episode in fixed_episodes(pools, k, mode, seed, episodes_per_speaker, content_disjoint, query_k):
        number = counters[episode["speaker"]] = counters.get(episode["speaker"], -1) + 1
        corpus = corpus_of(episode["speaker"]) if sets is not None else specs[0][0]
        identity = {"episode_id": f"{split}/{episode['speaker']}/{number:05d}", "corpus": corpus}
        episodes.append(with_labels({**identity, **episode}, sets))
    return episodes
