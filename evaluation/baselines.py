"""Non-ICL baselines for few-shot personalized SER, on pooled frozen-encoder features.

Every baseline sees the same input as the ICL model: the frozen encoder's frames of each
utterance, pooled here to one vector (:func:`pool_features`: mean and standard deviation over
the valid frames). All share one interface::

    method = make_baseline("prototypes", seed=0)
    method.fit(train_x, train_y, train_speakers, label_set, validation=(val_x, val_y, val_speakers))
    probabilities = method.predict_proba(query_x, enrollment_x, enrollment_y)   # (n_query, n_labels)

``fit`` sees only training (and validation) speakers; ``predict_proba`` gets the query
utterance(s) of one test speaker and that speaker's K labelled enrollment utterances (K may
be 0). Probabilities are in ``label_set`` order. Hyperparameters that depend on K (fine-tuning
steps and learning rate, the prototype temperature) are chosen per K on episodes drawn from the
validation speakers, the first time that K is seen (see :attr:`Baseline.selected`).

Methods (docs/EVALUATION.md describes them in prose):

* :class:`SpeakerIndependent` (``si``) - an MLP head on globally standardized features.
* :class:`SpeakerNormalized` (``si_norm``) - the head on features normalized with the speaker's
  mean/std estimated from its K enrollment utterances; at K = 0 it is ``si``.
* :class:`FineTuned` (``si_finetune``) - ``si``, fine-tuned on the K enrollment utterances.
* :class:`Prototypes` (``prototypes``) - nearest class mean over the enrollment (cosine),
  ``si`` for the classes the enrollment lacks.
* :class:`SpeakerEmbedding` (``speaker_embedding``) - a head on [utterance, mean enrollment
  feature], trained with embeddings of random K-subsets of each training speaker.
* :class:`EnrollmentPrototypes` (``enroll_prototypes``) - no training at all: features
  standardized by the K enrollment utterances themselves, cosine to the enrolled classes' means.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .metrics import unweighted_accuracy

#: Validation data for hyperparameter selection: (features, labels, speakers).
Validation = tuple[np.ndarray, Sequence[str], Sequence[str]]


def pool_features(frames) -> np.ndarray:
    """Mean and standard deviation over time of one utterance's encoder frames ``(T, D)`` → ``(2D,)``."""
    frames = torch.as_tensor(frames, dtype=torch.float32)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise ValueError(f"Expected non-empty (frames, dim) encoder output, got shape {tuple(frames.shape)}.")
    std = frames.std(0, unbiased=False)
    return torch.cat([frames.mean(0), std]).numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def _mlp(n_in: int, n_out: int, hidden: int, dropout: float) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(n_in, n_out)  # multinomial logistic regression
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class Baseline:
    """Common interface and the shared speaker-independent head.

    Args:
        hidden_size: Hidden units of the head's one hidden layer (0: a linear softmax head).
        dropout: Dropout of the hidden layer while training.
        train_steps: Minibatch AdamW steps of head training (independent of the data size).
        batch_size: Minibatch size.
        learning_rate, weight_decay: AdamW settings of head training.
        validation_draws: Random enrollment sets per validation speaker when selecting
            per-K hyperparameters.
        seed: Seeds head initialisation, minibatches and the random draws.
    """

    name = "baseline"

    def __init__(
        self,
        hidden_size: int = 128,
        dropout: float = 0.2,
        train_steps: int = 1500,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        validation_draws: int = 4,
        seed: int = 0,
    ) -> None:
        self.hidden_size, self.dropout = hidden_size, dropout
        self.train_steps, self.batch_size = train_steps, batch_size
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.validation_draws = validation_draws
        self.seed = seed
        #: Per-K hyperparameters chosen on validation speakers: ``{k: {name: value, "val_ua": ...}}``.
        self.selected: dict[int, dict] = {}
        self.label_set: list[str] = []
        self.validation: Optional[Validation] = None

    # ------------------------------------------------------------------ shared machinery
    def _setup(self, features, labels, label_set, validation) -> tuple[np.ndarray, np.ndarray]:
        """Global standardization stats, label indices; training rows outside ``label_set`` are dropped."""
        self.label_set = list(label_set)
        if len(set(self.label_set)) != len(self.label_set) or len(self.label_set) < 2:
            raise ValueError(f"label_set must hold at least two distinct labels, got {self.label_set}.")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) != len(labels):
            raise ValueError(f"features must be (n, dim) with one label per row; got {features.shape} and {len(labels)} labels.")
        self.mean = features.mean(0)
        self.std = features.std(0) + 1e-6
        keep = np.array([label in self.label_set for label in labels], dtype=bool)
        if not keep.any():
            raise ValueError(f"No training utterance has a label in {self.label_set}.")
        self.validation = validation
        return self.standardize(features), np.array([self.label_set.index(label) if k else -1
                                                     for label, k in zip(labels, keep)])

    def standardize(self, features) -> np.ndarray:
        """Features standardized with the training set's per-dimension mean and std."""
        return (np.asarray(features, dtype=np.float32) - self.mean) / self.std

    def _train_head(self, x: np.ndarray, y: np.ndarray, seed_offset: int = 0) -> nn.Module:
        """Train an MLP head with class-balanced cross-entropy (rows with y < 0 are ignored)."""
        x, y = x[y >= 0], y[y >= 0]
        n_labels = len(self.label_set)
        counts = np.bincount(y, minlength=n_labels).astype(np.float32)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
        generator = torch.Generator().manual_seed(self.seed * 7919 + seed_offset)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed * 7919 + seed_offset)
            head = _mlp(x.shape[1], n_labels, self.hidden_size, self.dropout)
        loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32))
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        tx, ty = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long)
        head.train()
        with torch.random.fork_rng():  # dropout masks from a seeded stream; the global RNG is untouched
            torch.manual_seed(self.seed * 7919 + seed_offset + 1)
            for _ in range(self.train_steps):
                index = torch.randint(0, len(tx), (min(self.batch_size, len(tx)),), generator=generator)
                loss = loss_fn(head(tx[index]), ty[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return head.eval()

    @staticmethod
    @torch.no_grad()
    def _probabilities(head: nn.Module, x: np.ndarray) -> np.ndarray:
        return head(torch.as_tensor(np.asarray(x, dtype=np.float32))).softmax(-1).numpy()

    def _validation_sets(self, k: int) -> list[tuple[np.ndarray, list[str], np.ndarray, list[str]]]:
        """(enrollment x, enrollment labels, query x, query labels) on validation speakers, raw features.

        For each validation speaker, ``validation_draws`` random K-subsets (``arbitrary``
        enrollment); every other utterance of the speaker is a query.
        """
        if self.validation is None:
            return []
        features, labels, speakers = self.validation
        features = np.asarray(features, dtype=np.float32)
        labels, speakers = np.asarray(labels), np.asarray(speakers)
        rng = np.random.default_rng([self.seed, k, 104729])
        sets = []
        for speaker in sorted(set(speakers.tolist())):
            rows = np.flatnonzero((speakers == speaker) & np.isin(labels, self.label_set))
            if len(rows) <= k:
                continue
            for _ in range(self.validation_draws):
                enroll = rng.choice(rows, size=k, replace=False)
                query = np.setdiff1d(rows, enroll)
                sets.append((features[enroll], labels[enroll].tolist(), features[query], labels[query].tolist()))
        return sets

    def _select(self, k: int, grid: list[dict], score_fn) -> dict:
        """Pick the grid entry with the best validation UA at K=k (first on ties); cached per K."""
        if k not in self.selected:
            sets = self._validation_sets(k)
            if not sets:  # no validation data: the first grid entry is the default
                self.selected[k] = {**grid[0], "val_ua": None}
            else:
                best = None
                for settings in grid:
                    predictions, references = [], []
                    for ex, ey, qx, qy in sets:
                        probabilities = score_fn(settings, qx, ex, ey)
                        predictions += [self.label_set[i] for i in probabilities.argmax(-1)]
                        references += qy
                    ua = unweighted_accuracy(predictions, references)
                    if best is None or ua > best["val_ua"] + 1e-12:
                        best = {**settings, "val_ua": ua}
                self.selected[k] = best
        return {name: value for name, value in self.selected[k].items() if name != "val_ua"}

    @staticmethod
    def _check_enrollment(enrollment_features, enrollment_labels) -> tuple[np.ndarray, list[str]]:
        labels = list(enrollment_labels)
        if enrollment_features is None or len(labels) == 0:
            return np.zeros((0, 0), dtype=np.float32), []
        features = np.asarray(enrollment_features, dtype=np.float32).reshape(len(labels), -1)
        return features, labels

    # ------------------------------------------------------------------------- interface
    def fit(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        speakers: Sequence[str],
        label_set: Sequence[str],
        validation: Optional[Validation] = None,
    ) -> "Baseline":
        """Train on the training speakers' pooled features; ``validation`` is for selection only."""
        raise NotImplementedError

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(),
                      unlabelled_features=None) -> np.ndarray:
        """``(n_query, len(label_set))`` probabilities for queries of one speaker given its enrollment.

        ``unlabelled_features``: ``(U, dim)`` other utterances of the speaker without labels. Only
        the methods that standardize by speaker statistics (``si_norm``, ``enroll_prototypes``)
        use them, for those statistics; the others ignore them."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Settings and per-K selected hyperparameters, for results.json."""
        return {
            "class": type(self).__name__,
            "hidden_size": self.hidden_size,
            "dropout": self.dropout,
            "train_steps": self.train_steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "selected_per_k": {str(k): v for k, v in sorted(self.selected.items())},
        }


class SpeakerIndependent(Baseline):
    """``si``: one head for all speakers; the enrollment is ignored."""

    name = "si"

    def fit(self, features, labels, speakers, label_set, validation=None):
        x, y = self._setup(features, labels, label_set, validation)
        self.head = self._train_head(x, y)
        return self

    def si_proba(self, query_features) -> np.ndarray:
        return self._probabilities(self.head, self.standardize(np.atleast_2d(query_features)))

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(), unlabelled_features=None):
        return self.si_proba(query_features)


class FineTuned(SpeakerIndependent):
    """``si_finetune``: copy the SI head and train it on the K enrollment utterances.

    Full-batch Adam on the enrollment (cross-entropy, no dropout); the number of steps and the
    learning rate come from ``steps_grid`` × ``lr_grid``, chosen per K on validation speakers
    (0 steps, i.e. plain SI, is in the grid). K = 0 is SI.
    """

    name = "si_finetune"

    def __init__(self, steps_grid=(0, 5, 10, 25, 50), lr_grid=(1e-3, 1e-2), **kwargs):
        super().__init__(**kwargs)
        self.steps_grid, self.lr_grid = tuple(steps_grid), tuple(lr_grid)

    def _finetune_trajectory(self, enrollment_x, enrollment_labels, lr, steps_list) -> dict[int, nn.Module]:
        """Heads after each number of steps in ``steps_list`` along one fine-tuning run."""
        head = copy.deepcopy(self.head).eval()
        x = torch.as_tensor(self.standardize(enrollment_x))
        y = torch.as_tensor([self.label_set.index(label) for label in enrollment_labels], dtype=torch.long)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        heads, done = {}, 0
        for target in sorted(steps_list):
            while done < target:
                loss = nn.functional.cross_entropy(head(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                done += 1
            heads[target] = copy.deepcopy(head)
        return heads

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(), unlabelled_features=None):
        ex, ey = self._check_enrollment(enrollment_features, enrollment_labels)
        if not ey:
            return self.si_proba(query_features)
        settings = self._select_for(len(ey))
        if settings["steps"] == 0:
            return self.si_proba(query_features)
        head = self._finetune_trajectory(ex, ey, settings["lr"], [settings["steps"]])[settings["steps"]]
        return self._probabilities(head, self.standardize(np.atleast_2d(query_features)))

    def _select_for(self, k: int) -> dict:
        if k in self.selected:
            return self._select(k, [], None)
        # One trajectory per (set, lr) serves every step count: score all grid entries at once.
        sets = self._validation_sets(k)
        scores = {}
        for lr in self.lr_grid:
            predictions = {steps: [] for steps in self.steps_grid}
            references = []
            for ex, ey, qx, qy in sets:
                heads = self._finetune_trajectory(ex, ey, lr, self.steps_grid)
                for steps, head in heads.items():
                    probabilities = self._probabilities(head, self.standardize(qx))
                    predictions[steps] += [self.label_set[i] for i in probabilities.argmax(-1)]
                references += qy
            for steps in self.steps_grid:
                scores[(steps, lr)] = unweighted_accuracy(predictions[steps], references) if references else None
        if not sets:
            self.selected[k] = {"steps": max(self.steps_grid[:2]), "lr": self.lr_grid[0], "val_ua": None}
        else:
            (steps, lr), ua = max(scores.items(), key=lambda item: (item[1], -item[0][0]))
            self.selected[k] = {"steps": steps, "lr": lr, "val_ua": ua}
        return self._select(k, [], None)


class Prototypes(SpeakerIndependent):
    """``prototypes``: nearest class mean of the enrollment, SI for classes it lacks.

    Features are standardized with the training stats and L2-normalized; each enrolled class'
    prototype is the mean of its enrollment vectors, and ``p_proto(c) = softmax(cos(q, m_c) / T)``
    over the enrolled classes C_e. The final distribution keeps SI's split between enrolled and
    absent classes: ``p(c) = p_si(C_e) · p_proto(c)`` for c in C_e, ``p(c) = p_si(c)`` otherwise.
    The temperature T is chosen per K on validation speakers. K = 0 is SI.
    """

    name = "prototypes"

    def __init__(self, temperatures=(0.02, 0.05, 0.1, 0.2, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.temperatures = tuple(temperatures)

    def _proto_proba(self, temperature, query_features, ex, ey) -> np.ndarray:
        si = self.si_proba(query_features)
        if not ey:
            return si
        query = _unit(self.standardize(np.atleast_2d(query_features)))
        enrolled = _unit(self.standardize(ex))
        classes = sorted(set(ey), key=self.label_set.index)
        prototypes = _unit(np.stack([enrolled[[label == c for label in ey]].mean(0) for c in classes]))
        p_proto = _softmax(query @ prototypes.T / temperature)
        columns = [self.label_set.index(c) for c in classes]
        out = si.copy()
        out[:, columns] = si[:, columns].sum(-1, keepdims=True) * p_proto
        return out

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(), unlabelled_features=None):
        ex, ey = self._check_enrollment(enrollment_features, enrollment_labels)
        if not ey:
            return self.si_proba(query_features)
        grid = [{"temperature": t} for t in self.temperatures]
        settings = self._select(len(ey), grid, lambda s, qx, x, y: self._proto_proba(s["temperature"], qx, x, y))
        return self._proto_proba(settings["temperature"], query_features, ex, ey)


def _rows(features, dim: Optional[int] = None) -> np.ndarray:
    """``features`` as a float32 ``(n, dim)`` array; None or empty gives ``(0, dim)``."""
    if features is None or len(features) == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    return np.asarray(features, dtype=np.float32).reshape(len(features), -1)


def speaker_statistics_rows(enrollment_features, enrollment_labels, unlabelled_features) -> np.ndarray:
    """The utterances a speaker's statistics come from: the enrollment's and the unlabelled ones."""
    ex, ey = Baseline._check_enrollment(enrollment_features, enrollment_labels)
    unlabelled = _rows(unlabelled_features)
    if not ey:
        return unlabelled
    return np.concatenate([ex, unlabelled.reshape(len(unlabelled), ex.shape[1])]) if len(unlabelled) else ex


def _speaker_rows(speakers: np.ndarray) -> dict[str, np.ndarray]:
    return {s: np.flatnonzero(speakers == s) for s in sorted(set(speakers.tolist()))}


class SpeakerNormalized(SpeakerIndependent):
    """``si_norm``: features normalized per speaker with stats from the enrollment.

    In the globally standardized space, a speaker's mean is the mean of its K enrollment
    vectors and its variance is the enrollment variance shrunk towards the average
    within-speaker variance of the training speakers,
    ``var = ((K-1)·var_enroll + κ·var_within) / (K-1+κ)`` (κ = ``shrinkage``; at K = 1 it is
    ``var_within``). Training uses, for each training speaker and each K in ``train_ks``,
    ``draws_per_k`` random K-subsets of that speaker's utterances: the subset's stats
    normalize the speaker's other utterances. K = 0 falls back to the SI head (trained as ``si``).

    With ``unlabelled_features`` (other utterances of the speaker, no labels) the statistics come
    from the enrollment and the unlabelled utterances together, so K = 0 is normalized too; add
    their counts to ``train_ks`` (e.g. 16, 17, 18, 20, 24 for U = 16) so the head trains on
    statistics of the sizes it is used with.
    """

    name = "si_norm"

    def __init__(self, train_ks=(1, 2, 4, 8), draws_per_k=2, shrinkage=4.0, **kwargs):
        super().__init__(**kwargs)
        self.train_ks, self.draws_per_k, self.shrinkage = tuple(train_ks), draws_per_k, shrinkage

    def _normalize(self, x_std: np.ndarray, enrollment_std: np.ndarray) -> np.ndarray:
        k = len(enrollment_std)
        mean = enrollment_std.mean(0)
        var_enroll = enrollment_std.var(0, ddof=1) if k > 1 else np.zeros_like(mean)
        var = ((k - 1) * var_enroll + self.shrinkage * self.var_within) / (k - 1 + self.shrinkage)
        return (x_std - mean) / np.sqrt(var + 1e-6)

    def fit(self, features, labels, speakers, label_set, validation=None):
        super().fit(features, labels, speakers, label_set, validation)  # the K = 0 fallback
        x = self.standardize(features)
        y = np.array([self.label_set.index(label) if label in self.label_set else -1 for label in labels])
        rows_by_speaker = _speaker_rows(np.asarray(speakers))
        self.var_within = np.mean([x[rows].var(0) for rows in rows_by_speaker.values()], axis=0)
        rng = np.random.default_rng([self.seed, 15485863])
        xs, ys = [], []
        for rows in rows_by_speaker.values():
            for k in self.train_ks:
                if len(rows) <= k:
                    continue
                for _ in range(self.draws_per_k):
                    enroll = rng.choice(rows, size=k, replace=False)
                    others = np.setdiff1d(rows, enroll)
                    xs.append(self._normalize(x[others], x[enroll]))
                    ys.append(y[others])
        if not xs:
            raise ValueError(f"No training speaker has more than {min(self.train_ks)} utterances for si_norm.")
        self.norm_head = self._train_head(np.concatenate(xs), np.concatenate(ys), seed_offset=1)
        return self

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(), unlabelled_features=None):
        stats = speaker_statistics_rows(enrollment_features, enrollment_labels, unlabelled_features)
        if not len(stats):
            return self.si_proba(query_features)
        z = self._normalize(self.standardize(np.atleast_2d(query_features)), self.standardize(stats))
        return self._probabilities(self.norm_head, z)

    def describe(self):
        return {**super().describe(), "train_ks": list(self.train_ks), "draws_per_k": self.draws_per_k,
                "shrinkage": self.shrinkage}


class SpeakerEmbedding(SpeakerIndependent):
    """``speaker_embedding``: a head on ``[x, e]`` with ``e`` the mean enrollment vector.

    Both in the globally standardized space; at K = 0, ``e = 0`` (the average speaker). Trained
    on, for each training speaker and each K in ``train_ks`` (0 included), ``draws_per_k``
    random K-subsets: the subset's mean is the embedding of the speaker's other utterances.
    """

    name = "speaker_embedding"

    def __init__(self, train_ks=(0, 1, 2, 4, 8), draws_per_k=2, **kwargs):
        super().__init__(**kwargs)
        self.train_ks, self.draws_per_k = tuple(train_ks), draws_per_k

    @staticmethod
    def _with_embedding(x_std: np.ndarray, enrollment_std: np.ndarray) -> np.ndarray:
        embedding = enrollment_std.mean(0) if len(enrollment_std) else np.zeros(x_std.shape[1], dtype=np.float32)
        return np.concatenate([x_std, np.broadcast_to(embedding, x_std.shape)], axis=1).astype(np.float32)

    def fit(self, features, labels, speakers, label_set, validation=None):
        x, y = self._setup(features, labels, label_set, validation)
        rng = np.random.default_rng([self.seed, 32452843])
        xs, ys = [], []
        for rows in _speaker_rows(np.asarray(speakers)).values():
            for k in self.train_ks:
                if len(rows) <= k:
                    continue
                for _ in range(self.draws_per_k if k > 0 else 1):
                    enroll = rng.choice(rows, size=k, replace=False)
                    others = np.setdiff1d(rows, enroll)
                    xs.append(self._with_embedding(x[others], x[enroll]))
                    ys.append(y[others])
        self.head = self._train_head(np.concatenate(xs), np.concatenate(ys))
        return self

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(), unlabelled_features=None):
        ex, ey = self._check_enrollment(enrollment_features, enrollment_labels)
        enrollment_std = self.standardize(ex) if ey else np.zeros((0, len(self.mean)), dtype=np.float32)
        z = self._with_embedding(self.standardize(np.atleast_2d(query_features)), enrollment_std)
        return self._probabilities(self.head, z)

    def describe(self):
        return {**super().describe(), "train_ks": list(self.train_ks), "draws_per_k": self.draws_per_k}


class EnrollmentPrototypes(Baseline):
    """``enroll_prototypes``: cosine to the enrolled classes' means in the enrollment's own scale.

    No training at all (``fit`` only records the label set): the K enrollment vectors'
    per-dimension mean and variance standardize the query and the enrollment (label-free
    speaker normalization), each enrolled class' prototype is the mean of its standardized,
    L2-normalized enrollment vectors, and ``p(c) = softmax(cos(q, m_c) / T)`` over the enrolled
    classes; classes the enrollment lacks get 0. The variance gets a floor of
    ``variance_floor`` × its mean over dimensions, so a dimension on which the few enrollment
    utterances happen to agree does not dominate. K = 0 gives the uniform distribution (no
    enrollment, nothing to compare with): this method measures what the enrollment alone tells.
    With ``unlabelled_features`` the mean and variance come from the enrollment and the
    unlabelled utterances together (the prototypes stay the enrolled ones).
    """

    name = "enroll_prototypes"

    def __init__(self, temperature: float = 0.1, variance_floor: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0 or variance_floor < 0:
            raise ValueError(f"temperature must be > 0 and variance_floor >= 0, got {temperature} and {variance_floor}.")
        self.temperature, self.variance_floor = float(temperature), float(variance_floor)

    def fit(self, features, labels, speakers, label_set, validation=None):
        self.label_set = list(label_set)
        if len(set(self.label_set)) != len(self.label_set) or len(self.label_set) < 2:
            raise ValueError(f"label_set must hold at least two distinct labels, got {self.label_set}.")
        return self

    def predict_proba(self, query_features, enrollment_features=None, enrollment_labels=(), unlabelled_features=None):
        ex, ey = self._check_enrollment(enrollment_features, enrollment_labels)
        query = np.atleast_2d(np.asarray(query_features, dtype=np.float32))
        out = np.zeros((len(query), len(self.label_set)), dtype=np.float64)
        enrolled = [i for i, label in enumerate(ey) if label in self.label_set]
        if not enrolled:
            out[:] = 1.0 / len(self.label_set)
            return out
        ex, ey = ex[enrolled], [ey[i] for i in enrolled]
        stats = np.concatenate([ex, _rows(unlabelled_features, ex.shape[1])])
        mean, var = stats.mean(0), stats.var(0)
        scale = np.sqrt(var + self.variance_floor * var.mean() + 1e-8)
        query_z, enrolled_z = _unit((query - mean) / scale), _unit((ex - mean) / scale)
        classes = sorted(set(ey), key=self.label_set.index)
        prototypes = _unit(np.stack([enrolled_z[[label == c for label in ey]].mean(0) for c in classes]))
        out[:, [self.label_set.index(c) for c in classes]] = _softmax(query_z @ prototypes.T / self.temperature)
        return out

    def describe(self):
        return {"class": type(self).__name__, "temperature": self.temperature,
                "variance_floor": self.variance_floor, "trained": False}


BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls
    for cls in (SpeakerIndependent, SpeakerNormalized, FineTuned, Prototypes, SpeakerEmbedding, EnrollmentPrototypes)
}


def make_baseline(name: str, **kwargs) -> Baseline:
    """A baseline by its method name (``si, si_norm, si_finetune, prototypes, speaker_embedding, enroll_prototypes``)."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose among {', '.join(BASELINES)}.")
    return BASELINES[name](**kwargs)


__all__ = [
    "BASELINES",
    "Baseline",
    "EnrollmentPrototypes",
    "FineTuned",
    "Prototypes",
    "SpeakerEmbedding",
    "SpeakerIndependent",
    "SpeakerNormalized",
    "make_baseline",
    "pool_features",
]
