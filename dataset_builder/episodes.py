"""Episodes: K enrollment (utterance, label) pairs and one query, all of one speaker.

An episode references utterances by id (no audio is copied)::

    {"speaker": "Actor_03", "enrollment_ids": [...], "enrollment_labels": [...],
     "query_id": "...", "emotion": "<the query's emotion>", "k": 4, "mode": "balanced"}

The query never appears among its own enrollment utterances. Enrollment modes:

* ``arbitrary`` - K utterances drawn at random from the speaker's other utterances (labels
  need not cover all emotions);
* ``balanced`` - one utterance per emotion, cycling through the speaker's emotions in a
  random order, so K enrollments cover ``min(K, n_emotions)`` emotions;
* ``exclude_query_class`` - like ``arbitrary``, but no enrollment has the query's emotion.

Orthogonal to the mode, ``content_disjoint=True`` keeps every enrollment utterance whose
``text`` (the sentence spoken) equals the query's out of the enrollment: acted corpora record
each sentence in every emotion, and pooled encoder features cluster by sentence, so an
enrollment holding the query's sentence lets nearest-neighbour matching follow the words.

Evaluation uses fixed episodes (:func:`fixed_episodes`); training draws fresh ones on the
fly with :class:`EpisodeSampler`. Both are deterministic functions of the seed: episode
``i`` of a sampler and the episodes of a speaker each have their own random generator, so
they do not depend on what else was drawn.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

MODES = ("arbitrary", "balanced", "exclude_query_class")

# Salts keep the random streams of different uses apart for the same seed.
_FIXED_SALT = 1_000_003
_SAMPLER_SALT = 2_000_003
_PERMUTATION_SALT = 3_000_017


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is an enrollment mode; raise ``ValueError`` naming them otherwise."""
    if mode not in MODES:
        raise ValueError(f"Unknown enrollment mode {mode!r}; use one of {', '.join(MODES)}.")
    return mode


def _speaker_seed(speaker: str) -> int:
    return zlib.crc32(speaker.encode("utf-8"))


TEXTS_HINT = (
    "content-disjoint episodes need every utterance's sentence (the `text` column): ravdess, cremad, "
    "emodb, esd, ased and emotiontts-ko have it, iemocap and synthetic do not; for a manifest add a "
    "`text` column. Or drop content_disjoint."
)


def require_texts(utterances: Iterable[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming the corpora whose utterances lack a ``text``.

    Content-disjoint episodes compare sentences, so every utterance needs one.
    """
    if hasattr(utterances, "column_names"):
        if "text" not in utterances.column_names:
            raise ValueError(f"The utterance table has no `text` column; {TEXTS_HINT}")
        corpora = utterances["corpus"] if "corpus" in utterances.column_names else [None] * utterances.num_rows
        pairs = zip(corpora, utterances["text"])
    else:
        pairs = ((row.get("corpus"), row.get("text")) for row in utterances)
    missing = Counter(corpus or "?" for corpus, text in pairs if text is None)
    if missing:
        named = ", ".join(f"{corpus!r} ({count} utterances)" for corpus, count in sorted(missing.items()))
        raise ValueError(f"Utterances without text in corpus {named}; {TEXTS_HINT}")


@dataclass(frozen=True)
class SpeakerPool:
    """One speaker's utterances (ids sorted), their emotions and their texts (sentence keys,
    None where unknown; empty when not given)."""

    speaker: str
    ids: tuple[str, ...]
    emotions: tuple[str, ...]
    texts: tuple[Optional[str], ...] = ()
    # mode -> _candidate_counts (the sampler asks once per episode)
    _counts: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def _candidate_counts(self, mode: str) -> np.ndarray:
        """For each utterance as the query: how many content-disjoint enrollment candidates it has."""
        if mode not in self._counts:
            if len(self.texts) != len(self.ids) or any(text is None for text in self.texts):
                raise ValueError(f"Speaker {self.speaker!r} has utterances without text; {TEXTS_HINT}")
            texts, emotions = np.array(self.texts, dtype=object), np.array(self.emotions, dtype=object)
            allowed = texts[:, None] != texts[None, :]  # also excludes the query itself
            if mode == "exclude_query_class":
                allowed &= emotions[:, None] != emotions[None, :]
            self._counts[mode] = allowed.sum(axis=1)
        return self._counts[mode]

    def max_k(self, mode: str, content_disjoint: bool = False) -> int:
        """The largest K for which this speaker can form at least one episode in ``mode``."""
        if content_disjoint:
            return int(self._candidate_counts(mode).max(initial=0))
        if mode == "exclude_query_class":
            counts = Counter(self.emotions)
            return len(self.ids) - min(counts.values())  # query from the rarest emotion
        return len(self.ids) - 1

    def query_candidates(self, k: int, mode: str, content_disjoint: bool = False) -> np.ndarray:
        """Indices of the utterances that can be the query of a K-shot episode."""
        if content_disjoint:
            return np.flatnonzero(self._candidate_counts(mode) >= k).astype(int)
        if mode == "exclude_query_class":
            counts = Counter(self.emotions)
            return np.array([i for i, e in enumerate(self.emotions) if len(self.ids) - counts[e] >= k], dtype=int)
        return np.arange(len(self.ids)) if len(self.ids) > k else np.array([], dtype=int)


def build_pools(utterances: Iterable[Mapping[str, Any]]) -> dict[str, SpeakerPool]:
    """Group an utterance table (rows with ``id``, ``speaker``, ``emotion``, optional ``text``) by speaker."""
    if hasattr(utterances, "column_names"):  # a datasets.Dataset: read the columns at once
        texts = utterances["text"] if "text" in utterances.column_names else [None] * utterances.num_rows
        rows: Iterable[Mapping[str, Any]] = (
            {"id": i, "speaker": s, "emotion": e, "text": t}
            for i, s, e, t in zip(utterances["id"], utterances["speaker"], utterances["emotion"], texts)
        )
    else:
        rows = utterances
    grouped: dict[str, list[tuple[str, str, Optional[str]]]] = {}
    for row in rows:
        grouped.setdefault(row["speaker"], []).append((row["id"], row["emotion"], row.get("text")))
    pools = {}
    for speaker, items in sorted(grouped.items()):
        items.sort(key=lambda item: item[:2])  # by (id, emotion), as before texts existed
        pools[speaker] = SpeakerPool(
            speaker, tuple(i for i, _, _ in items), tuple(e for _, e, _ in items), tuple(t for _, _, t in items)
        )
    return pools


def draw_enrollment(
    pool: SpeakerPool, query: int, k: int, mode: str, rng: np.random.Generator, content_disjoint: bool = False
) -> list[int]:
    """Indices of K enrollment utterances for ``query`` (never the query itself; with
    ``content_disjoint``, none with the query's text)."""
    if mode == "exclude_query_class":
        candidates = [i for i in range(len(pool.ids)) if pool.emotions[i] != pool.emotions[query]]
    else:
        candidates = [i for i in range(len(pool.ids)) if i != query]
    if content_disjoint:
        candidates = [i for i in candidates if pool.texts[i] != pool.texts[query]]
    if k > len(candidates):
        raise ValueError(
            f"Speaker {pool.speaker!r} has {len(candidates)} possible enrollment utterances for this query, "
            f"fewer than k={k}; lower k."
        )
    if mode != "balanced":
        return [int(i) for i in rng.choice(candidates, size=k, replace=False)]
    # Balanced: shuffle each emotion's utterances, visit emotions in a random order, and
    # take one from each in turn until K are chosen.
    by_emotion: dict[str, list[int]] = {}
    for i in candidates:
        by_emotion.setdefault(pool.emotions[i], []).append(i)
    order = [sorted(by_emotion)[j] for j in rng.permutation(len(by_emotion))]
    queues = {e: [by_emotion[e][j] for j in rng.permutation(len(by_emotion[e]))] for e in order}
    chosen: list[int] = []
    while len(chosen) < k:
        for emotion in order:
            if queues[emotion] and len(chosen) < k:
                chosen.append(queues[emotion].pop())
    return [chosen[j] for j in rng.permutation(len(chosen))]  # no emotion order in the prompt


def make_episode(
    pool: SpeakerPool, query: int, k: int, mode: str, rng: np.random.Generator, content_disjoint: bool = False
) -> dict[str, Any]:
    """One episode dict for ``query`` (an index into ``pool``)."""
    enrollment = draw_enrollment(pool, query, k, mode, rng, content_disjoint)
    return {
        "speaker": pool.speaker,
        "enrollment_ids": [pool.ids[i] for i in enrollment],
        "enrollment_labels": [pool.emotions[i] for i in enrollment],
        "query_id": pool.ids[query],
        "emotion": pool.emotions[query],
        "k": k,
        "mode": mode,
    }


def permute_labels(episode: Mapping[str, Any], words: Sequence[str], rng: np.random.Generator) -> dict[str, Any]:
    """The episode with its label words mapped through a random non-identity permutation of ``words``.

    The same mapping applies to the enrollment labels and the query's, so the episode stays
    consistent: only its context tells which word now names which emotion.
    """
    words = list(words)
    if len(words) < 2:
        return {**episode, "permuted": False}
    order = rng.permutation(len(words))
    while (order == np.arange(len(words))).all():
        order = rng.permutation(len(words))
    mapping = {word: words[i] for word, i in zip(words, order)}
    return {
        **episode,
        "enrollment_labels": [mapping[label] for label in episode["enrollment_labels"]],
        "emotion": mapping[episode["emotion"]],
        "permuted": True,
    }


def usable_pools(
    pools: Mapping[str, SpeakerPool], k: int, mode: str, context: str = "", content_disjoint: bool = False
) -> dict[str, SpeakerPool]:
    """The pools that allow K-shot episodes in ``mode``; the others are skipped with a warning.

    Raises:
        ValueError: if no speaker allows ``k`` (K is larger than any speaker allows), or
            ``content_disjoint`` with utterances that have no text.
    """
    max_k = {s: p.max_k(mode, content_disjoint) for s, p in pools.items()}
    usable = {s: p for s, p in pools.items() if max_k[s] >= k}
    skipped = sorted(set(pools) - set(usable))
    what = f"mode {mode!r}" + (", content-disjoint" if content_disjoint else "")
    if not usable:
        best = max(max_k.values(), default=0)
        raise ValueError(f"k={k} is larger than any speaker allows in {what}{context} (at most k={best}); lower k.")
    if skipped:
        logger.warning(
            "Skipping %d speaker(s) with too few utterances for k=%d in %s%s: %s",
            len(skipped), k, what, context, ", ".join(skipped),
        )
    return usable


def fixed_episodes(
    pools: Mapping[str, SpeakerPool],
    k: int,
    mode: str,
    seed: int = 0,
    episodes_per_speaker: Optional[int] = None,
    content_disjoint: bool = False,
    query_k: Optional[int] = None,
) -> Iterator[dict[str, Any]]:
    """Reproducible episodes for every pool (speakers in sorted order).

    Each speaker's queries are its eligible utterances in a seeded random order: with
    ``episodes_per_speaker=None`` every eligible utterance is the query once; with a number,
    the order is cycled (reshuffled each pass) until that many episodes are made. With
    ``content_disjoint`` no enrollment utterance has the query's text. With ``query_k`` (>= k),
    the queries are those eligible at ``query_k``: a sweep over K that passes its largest K
    gets the same queries at every K, so K's can be compared query by query.
    """
    if query_k is not None and query_k < k:
        raise ValueError(f"query_k must be >= k (the sweep's largest K), got {query_k} < {k}.")
    for speaker in sorted(pools):
        pool = pools[speaker]
        rng = np.random.default_rng([seed, _FIXED_SALT, _speaker_seed(speaker)])
        candidates = pool.query_candidates(k if query_k is None else query_k, mode, content_disjoint)
        if len(candidates) == 0:
            continue
        count = len(candidates) if episodes_per_speaker is None else episodes_per_speaker
        queries: list[int] = []
        while len(queries) < count:
            queries.extend(int(i) for i in rng.permutation(candidates))
        for query in queries[:count]:
            yield make_episode(pool, query, k, mode, rng, content_disjoint)


KRange = Union[int, tuple[int, int]]


class EpisodeSampler:
    """An endless, seeded stream of fresh training episodes from a set of speaker pools.

    Each episode picks a speaker uniformly, K uniformly from ``k`` (an int or an inclusive
    ``(low, high)`` range, e.g. ``(0, 8)``), a query uniformly among that speaker's eligible
    utterances, and the enrollment by ``mode``. Episode ``i`` is a pure function of
    ``(seed, i)``, so :meth:`state_dict` is just the position in the stream and a resumed
    run continues exactly where it stopped.

    Args:
        utterances: The utterance table (a ``datasets.Dataset`` from ``read_corpus`` or any
            rows with ``id``, ``speaker``, ``emotion``).
        speakers: The speakers to draw from (e.g. the train split's); default all.
        k: Fixed K or inclusive range.
        mode: An enrollment mode (:data:`MODES`).
        seed: Random seed.
        permuted_label_share: Share of the episodes whose enrollment holds the query's emotion
            (the ones the context can answer) whose label words are mapped through a random
            permutation of the speaker's emotions, the same for the enrollment and the query
            (marked ``"permuted": True``). In such an episode a memorized utterance -> label
            answer is wrong and only reading the enrollment is right, which teaches the model to
            use its context; the other episodes keep the true words (and the prior). Episodes
            the context cannot answer (K = 0, or no enrollment utterance of the query's emotion)
            are never permuted: there the permuted word would be label noise.
        content_disjoint: No enrollment utterance has the query's ``text`` (needs a text for
            every utterance).

    Speakers too small for the largest K are skipped with a warning.

    Raises:
        ValueError: bad ``k`` or ``mode``, unknown speakers, no speaker large enough, or
            ``content_disjoint`` with utterances that have no text.
    """

    def __init__(
        self,
        utterances: Iterable[Mapping[str, Any]],
        speakers: Optional[Sequence[str]] = None,
        k: KRange = (0, 8),
        mode: str = "arbitrary",
        seed: int = 0,
        permuted_label_share: float = 0.0,
        content_disjoint: bool = False,
    ) -> None:
        self.mode = check_mode(mode)
        self.content_disjoint = bool(content_disjoint)
        if not 0.0 <= float(permuted_label_share) <= 1.0:
            raise ValueError(f"permuted_label_share must be between 0 and 1, got {permuted_label_share}.")
        self.permuted_label_share = float(permuted_label_share)
        low, high = (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))
        if low < 0 or high < low:
            raise ValueError(f"k must be an int >= 0 or a range (low, high) with 0 <= low <= high, got {k!r}.")
        self.k_range = (low, high)
        self.seed = int(seed)
        pools = build_pools(utterances)
        if speakers is not None:
            unknown = sorted(set(speakers) - set(pools))
            if unknown:
                raise ValueError(f"Speakers {unknown} have no utterances in the table; pass speakers from it.")
            pools = {s: pools[s] for s in sorted(set(speakers))}
        if not pools:
            raise ValueError("The utterance table is empty; the sampler needs at least one speaker.")
        if self.content_disjoint:
            require_texts(utterances)
        self.pools = usable_pools(pools, high, mode, context=" (EpisodeSampler)", content_disjoint=self.content_disjoint)
        self._speakers = sorted(self.pools)
        self._step = 0

    def episode(self, index: int) -> dict[str, Any]:
        """Episode number ``index`` of this sampler's stream (does not move the stream)."""
        rng = np.random.default_rng([self.seed, _SAMPLER_SALT, index])
        pool = self.pools[self._speakers[int(rng.integers(len(self._speakers)))]]
        k = int(rng.integers(self.k_range[0], self.k_range[1] + 1))
        candidates = pool.query_candidates(k, self.mode, self.content_disjoint)
        query = int(candidates[int(rng.integers(len(candidates)))])
        episode = make_episode(pool, query, k, self.mode, rng, self.content_disjoint)
        if self.permuted_label_share:
            # Its own stream, so the episodes themselves match a sampler without permutation.
            permute_rng = np.random.default_rng([self.seed, _PERMUTATION_SALT, index])
            # Only where the context can answer: with K = 0, or no enrollment utterance of the
            # query's emotion, permuted words would be label noise the model can only memorize.
            solvable = episode["emotion"] in episode["enrollment_labels"]
            if permute_rng.random() < self.permuted_label_share and solvable:
                episode = permute_labels(episode, sorted(set(pool.emotions)), permute_rng)
        return episode

    def __iter__(self) -> "EpisodeSampler":
        return self

    def __next__(self) -> dict[str, Any]:
        episode = self.episode(self._step)
        self._step += 1
        return episode

    def state_dict(self) -> dict[str, Any]:
        """The stream position plus the settings it is only valid for."""
        return {
            "step": self._step,
            "seed": self.seed,
            "k_range": list(self.k_range),
            "mode": self.mode,
            "speakers": list(self._speakers),
            "permuted_label_share": self.permuted_label_share,
            "content_disjoint": self.content_disjoint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream saved by :meth:`state_dict`.

        Raises:
            ValueError: if the state was saved by a sampler with other settings.
        """
        mine = self.state_dict()
        # states saved before the options existed
        state = {"permuted_label_share": 0.0, "content_disjoint": False, **state}
        for key in ("seed", "k_range", "mode", "speakers", "permuted_label_share", "content_disjoint"):
            saved = list(state[key]) if isinstance(state[key], (list, tuple)) else state[key]
            if saved != mine[key]:
                raise ValueError(
                    f"Sampler state has {key}={state[key]!r} but this sampler has {mine[key]!r}; "
                    "build the sampler with the settings of the saved run."
                )
        self._step = int(state["step"])


_UNLABELLED_SALT = 4_000_037


def attach_unlabelled(
    episodes: Sequence[Mapping[str, Any]],
    pools: Mapping[str, SpeakerPool],
    count: int,
    seed: int = 0,
    content_disjoint: bool = False,
) -> list[dict[str, Any]]:
    """Each episode with ``unlabelled_ids``: up to ``count`` other utterances of its speaker, given
    without labels (speech the user has but did not label: the rest of a call, earlier sessions).

    They are never the query and never an enrollment utterance; with ``content_disjoint`` none has
    the query's text either (so speaker statistics cannot follow the query's words). A speaker with
    fewer such utterances gives all it has. The draw depends on ``(seed, episode's query)`` only, so
    the same query gets the same unlabelled speech at every K.

    Raises:
        ValueError: ``count`` < 0, or an episode whose speaker is not in ``pools``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"The unlabelled count must be an integer >= 0, got {count!r}.")
    out = []
    for episode in episodes:
        pool = pools.get(episode["speaker"])
        if pool is None:
            raise ValueError(f"Episode speaker {episode['speaker']!r} has no pool; build the pools from the same table.")
        query = pool.ids.index(episode["query_id"])
        taken = {query, *(pool.ids.index(i) for i in episode["enrollment_ids"])}
        # One seeded order of the speaker's utterances per query, filtered afterwards: the same
        # query keeps (nearly) the same unlabelled speech whatever enrollment K drew.
        order = np.random.default_rng([seed, _UNLABELLED_SALT, _speaker_seed(episode["query_id"])]).permutation(len(pool.ids))
        chosen = [int(i) for i in order if int(i) not in taken
                  and not (content_disjoint and pool.texts[i] == pool.texts[query])][:count]
        out.append({**episode, "unlabelled_ids": [pool.ids[i] for i in chosen]})
    return out
