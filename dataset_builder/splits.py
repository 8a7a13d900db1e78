"""Speaker-disjoint train/validation/test assignment."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


def split_speakers(
    speakers: Iterable[str],
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    validation_speakers: Optional[Sequence[str]] = None,
    test_speakers: Optional[Sequence[str]] = None,
) -> dict[str, list[str]]:
    """Assign every speaker to exactly one of ``train``, ``validation``, ``test``.

    With explicit lists, those speakers go to validation/test and all others to train.
    Otherwise the sorted speakers are shuffled with ``seed`` and
    ``max(1, round(fraction * n))`` go to validation and to test (24 speakers at 15%/15%
    give 16/4/4); the assignment depends only on the speaker set and the seed.

    Raises:
        ValueError: fewer than 3 speakers, bad fractions, unknown or overlapping explicit
            speakers, or an empty split.
    """
    pool = sorted(set(speakers))
    if validation_speakers is not None or test_speakers is not None:
        validation = sorted(set(validation_speakers or ()))
        test = sorted(set(test_speakers or ()))
        unknown = sorted(set(validation + test) - set(pool))
        if unknown:
            raise ValueError(f"Speakers {unknown} are not in the corpus; choose among {pool}.")
        overlap = sorted(set(validation) & set(test))
        if overlap:
            raise ValueError(f"Speakers {overlap} are in both validation and test; splits must be speaker-disjoint.")
        held_out = set(validation) | set(test)
        assignment = {"train": [s for s in pool if s not in held_out], "validation": validation, "test": test}
    else:
        for name, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {fraction}.")
        if len(pool) < 3:
            raise ValueError(
                f"Only {len(pool)} speaker(s) found; speaker-disjoint train/validation/test needs at least 3 "
                "(add speakers, or pass validation_speakers=/test_speakers= explicitly)."
            )
        n_validation = max(1, int(round(validation_fraction * len(pool))))
        n_test = max(1, int(round(test_fraction * len(pool))))
        if n_validation + n_test >= len(pool):
            raise ValueError(
                f"validation_fraction={validation_fraction} and test_fraction={test_fraction} leave no training "
                f"speaker out of {len(pool)}; lower them."
            )
        order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
        assignment = {
            "validation": sorted(order[:n_validation]),
            "test": sorted(order[n_validation : n_validation + n_test]),
            "train": sorted(order[n_validation + n_test :]),
        }
    for split in SPLITS:
        if not assignment[split]:
            raise ValueError(
                f"The {split} split has no speaker; pass {split}_speakers= (or fractions) so each split gets one."
                if split != "train"
                else "Every speaker is held out, so the train split is empty; hold out fewer speakers."
            )
    return assignment
