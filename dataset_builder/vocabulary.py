"""The canonical emotion vocabulary and the mapping of corpus labels onto it.

Every corpus names its emotions differently ("ANG", "angry", "W" for *Wut*, "Angry").
Readers keep the corpus' own label in ``original_label`` and put the canonical word, a
plain English noun, in ``emotion``: the word the model reads and writes after ``Emotion:``.
"""

from __future__ import annotations

from typing import Mapping

#: Canonical emotion words, in a fixed order (used for stable label lists).
CANONICAL_EMOTIONS: tuple[str, ...] = (
    "anger",
    "boredom",
    "calm",
    "contempt",
    "disgust",
    "excitement",
    "fear",
    "frustration",
    "happiness",
    "neutral",
    "sadness",
    "surprise",
    "other",
)

# Common spellings (adjectives, abbreviations, nouns) of the canonical words.
_ALIASES: Mapping[str, str] = {
    "angry": "anger",
    "ang": "anger",
    "mad": "anger",
    "bored": "boredom",
    "calmness": "calm",
    "contemptuous": "contempt",
    "disgusted": "disgust",
    "dis": "disgust",
    "excited": "excitement",
    "exc": "excitement",
    "fearful": "fear",
    "fea": "fear",
    "afraid": "fear",
    "scared": "fear",
    "frustrated": "frustration",
    "fru": "frustration",
    "happy": "happiness",
    "hap": "happiness",
    "joy": "happiness",
    "joyful": "happiness",
    "neu": "neutral",
    "neutrality": "neutral",
    "sad": "sadness",
    "surprised": "surprise",
    "sur": "surprise",
    "oth": "other",
}


def normalize_emotion(label: str) -> str:
    """Map an emotion word onto the canonical vocabulary.

    Known words and spellings ("Angry", "happy", "fearful", "NEU") become the canonical
    noun; anything else is returned stripped and lower-cased, so a manifest may bring its
    own labels (e.g. "pride").

    Raises:
        ValueError: if ``label`` is empty.
    """
    word = str(label).strip().lower()
    if not word:
        raise ValueError("Empty emotion label; every utterance needs an emotion word.")
    if word in CANONICAL_EMOTIONS:
        return word
    return _ALIASES.get(word, word)
