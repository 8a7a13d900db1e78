"""icl-ser data layer: corpus readers, the synthetic corpus, episodic splits, feature cache.

* :func:`read_corpus` - a corpus folder / manifest / the synthetic corpus as an utterance
  table (``id, path, speaker, emotion, original_label, corpus, duration, text``).
* :func:`build_episodes` - speaker-disjoint ``train/validation/test`` episodes
  (:class:`IclSerEpisodes`, a ``datasets.GeneratorBasedBuilder``).
* :class:`EpisodeSampler` - fresh, seeded, resumable training episodes.
* :func:`read_corpora` / :func:`split_corpora` / :func:`split_episodes` - one corpus or
  several (a list of one takes the same path; several get namespaced speakers, per-corpus
  splits and label sets). :func:`build_episodes` goes through them too.
* :class:`FeatureCache` / :func:`encode_paths` - frozen-encoder outputs on disk.
"""

from .builder import EPISODE_FEATURES, IclSerEpisodes, IclSerEpisodesConfig, build_episodes
from .corpora import CORPORA, TEXTLESS_CORPORA, UTTERANCE_FEATURES, CorpusReport, SkippedFile, check_texts_known, read_corpus
from .episodes import MODES, EpisodeSampler, SpeakerPool, attach_unlabelled, build_pools
from .multi import parse_corpora, read_corpora, split_corpora, split_episodes
from .feature_cache import FeatureCache, content_key_for_file, content_key_for_samples, encode_paths
from .splits import split_speakers
from .synthetic import SyntheticConfig, generate_corpus
from .vocabulary import CANONICAL_EMOTIONS, normalize_emotion

__all__ = [
    "CANONICAL_EMOTIONS",
    "CORPORA",
    "EPISODE_FEATURES",
    "MODES",
    "UTTERANCE_FEATURES",
    "CorpusReport",
    "EpisodeSampler",
    "FeatureCache",
    "IclSerEpisodes",
    "IclSerEpisodesConfig",
    "SkippedFile",
    "SpeakerPool",
    "SyntheticConfig",
    "TEXTLESS_CORPORA",
    "attach_unlabelled",
    "build_episodes",
    "build_pools",
    "check_texts_known",
    "content_key_for_file",
    "content_key_for_samples",
    "encode_paths",
    "generate_corpus",
    "normalize_emotion",
    "parse_corpora",
    "read_corpora",
    "read_corpus",
    "split_corpora",
    "split_episodes",
    "split_speakers",
]
