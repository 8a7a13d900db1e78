"""evaluation.baselines: behaviour on hand-made features, validity on tiny-encoder features."""

import numpy as np
import pytest

from evaluation.baselines import BASELINES, make_baseline, pool_features

LABELS = ["a", "b", "c", "d"]
FAST = {"train_steps": 300, "hidden_size": 32, "validation_draws": 2}


def make_corpus(n_speakers, seed, permute, offset_scale=1.0, per_class=6, dim=12):
    """Speakers whose class c is rendered as ``shared[c] + private[perm_s(c)] + offset_s + noise``.

    ``permute=True`` gives every speaker its own class→pattern permutation (only the speaker's own
    labelled examples tell which pattern means which class); ``False`` shares one mapping.
    """
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(0, 1, (len(LABELS), dim))
    xs, ys, ss = [], [], []
    for s in range(n_speakers):
        offset = rng.normal(0, offset_scale, dim)
        perm = rng.permutation(len(LABELS)) if permute else np.arange(len(LABELS))
        for c, label in enumerate(LABELS):
            for _ in range(per_class):
                pattern = 0.3 * centers[c] + 1.2 * centers[perm[c]] if permute else 1.2 * centers[c]
                xs.append(offset + pattern + 0.3 * rng.normal(0, 1, dim))
                ys.append(label)
                ss.append(f"{seed}-{s}")
    return np.asarray(xs, dtype=np.float32), ys, ss


def episode_ua(method, corpus, k, seed=0):
    """UA over episodes: every utterance of the corpus a query once, K random others as enrollment."""
    x, y, s = corpus
    rng = np.random.default_rng(seed)
    hits = {label: [] for label in LABELS}
    for q in range(len(y)):
        others = [i for i in range(len(y)) if s[i] == s[q] and i != q]
        enroll = rng.choice(others, size=k, replace=False) if k else np.array([], dtype=int)
        probabilities = method.predict_proba(x[q], x[enroll] if k else None, [y[i] for i in enroll])
        assert probabilities.shape == (1, len(LABELS))
        assert np.all(probabilities >= 0) and np.isclose(probabilities.sum(), 1.0, atol=1e-5)
        hits[y[q]].append(LABELS[int(probabilities.argmax())] == y[q])
    return float(np.mean([np.mean(v) for v in hits.values()]))


@pytest.fixture(scope="module")
def private():
    """Speaker-private class renderings: SI is near chance, the enrollment identifies classes."""
    return make_corpus(10, 0, True), make_corpus(3, 1, True), make_corpus(3, 2, True)


@pytest.fixture(scope="module")
def offsets():
    """One shared class mapping, but speaker offsets much larger than the class differences."""
    return make_corpus(10, 0, False, 4.0), make_corpus(3, 1, False, 4.0), make_corpus(3, 2, False, 4.0)


@pytest.fixture(scope="module")
def shared():
    """One shared class mapping, small offsets: a speaker-independent classifier works."""
    return make_corpus(8, 0, False, 0.3), make_corpus(2, 1, False, 0.3), make_corpus(2, 2, False, 0.3)


_FITTED = {}


def fit(name, data):
    """A baseline fitted on ``data``'s training speakers (cached: fitting is the slow part)."""
    key = (name, id(data))
    if key not in _FITTED:
        train, validation, _ = data
        _FITTED[key] = make_baseline(name, seed=0, **FAST).fit(*train, LABELS, validation=validation)
    return _FITTED[key]


TRAINED = [name for name in BASELINES if name != "enroll_prototypes"]  # that one only reads the enrollment


@pytest.mark.parametrize("name", TRAINED)
def test_every_baseline_beats_chance_when_emotions_are_shared(name, shared):
    assert episode_ua(fit(name, shared), shared[2], k=4) > 0.8  # chance is 0.25


def test_enrollment_prototypes_read_private_renderings_from_the_enrollment_alone(private):
    method = fit("enroll_prototypes", private)
    at_0, at_8 = episode_ua(method, private[2], 0), episode_ua(method, private[2], 8)
    assert at_0 < 0.3 < at_8 - 0.2  # K = 0: uniform, i.e. chance (0.25)


@pytest.mark.parametrize("name", ["si_finetune", "prototypes"])
def test_enrollment_methods_improve_with_k_on_private_renderings(name, private):
    method = fit(name, private)
    at_0, at_8 = episode_ua(method, private[2], 0), episode_ua(method, private[2], 8)
    assert at_0 < 0.55
    assert at_8 > at_0 + 0.2 and at_8 > 0.6
    assert 8 in method.selected and method.selected[8]["val_ua"] is not None


def test_speaker_normalization_removes_speaker_offsets(offsets):
    si = episode_ua(fit("si", offsets), offsets[2], 0)
    normalized = episode_ua(fit("si_norm", offsets), offsets[2], 8)
    assert normalized > si + 0.1 and normalized > 0.7


@pytest.mark.parametrize("name", TRAINED)
def test_k0_falls_back_to_si_for_normalization_finetuning_and_prototypes(name, private):
    if name == "speaker_embedding":
        pytest.skip("speaker_embedding has its own head (zero embedding at K = 0)")
    method, si = fit(name, private), fit("si", private)
    query = private[2][0][:5]
    np.testing.assert_allclose(method.predict_proba(query), si.predict_proba(query), atol=1e-6)


def test_prototypes_keep_si_probabilities_of_classes_the_enrollment_lacks(private):
    method = fit("prototypes", private)
    x, y, _ = private[2]
    enroll = [i for i, label in enumerate(y) if label in ("a", "b")][:4]
    query = x[-3:]
    mixed, si = method.predict_proba(query, x[enroll], [y[i] for i in enroll]), method.predict_proba(query)
    np.testing.assert_allclose(mixed[:, 2:], si[:, 2:], atol=1e-6)
    np.testing.assert_allclose(mixed[:, :2].sum(-1), si[:, :2].sum(-1), atol=1e-6)


def test_unknown_baseline_and_bad_inputs():
    with pytest.raises(ValueError, match="Unknown baseline"):
        make_baseline("knn")
    with pytest.raises(ValueError, match="label"):
        make_baseline("si", **FAST).fit(np.zeros((4, 3)), ["x"] * 4, ["s"] * 4, LABELS)
    with pytest.raises(ValueError, match="non-empty"):
        pool_features(np.zeros((0, 8)))


def test_pool_features_is_mean_and_std():
    frames = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(pool_features(frames), np.concatenate([frames.mean(0), frames.std(0)]), rtol=1e-6)


def test_runs_on_tiny_encoder_features(tiny, tmp_path):
    """Real (random tiny encoder) features of synthetic speech: every baseline returns probabilities."""
    from dataset_builder import read_corpus
    from evaluation.episodic import EncodedUtterances

    model, processor = tiny
    table = read_corpus("synthetic", n_speakers=4, emotions=("neutral", "anger", "sadness"), utterances_per_emotion=2)
    encoded = EncodedUtterances(model, processor, table, cache_dir=tmp_path, show_progress=False)
    x = np.stack([pool_features(encoded[i]) for i in table["id"]])
    y, s = table["emotion"], table["speaker"]
    assert x.shape == (len(y), 2 * model.config.audio_config.d_model)
    labels = sorted(set(y))
    train = [i for i in range(len(y)) if s[i] != s[-1]]
    test = [i for i in range(len(y)) if s[i] == s[-1]]
    for name in BASELINES:
        method = make_baseline(name, train_steps=20, hidden_size=8).fit(
            x[train], [y[i] for i in train], [s[i] for i in train], labels
        )
        probabilities = method.predict_proba(x[test[:2]], x[test[2:]], [y[i] for i in test[2:]])
        assert probabilities.shape == (2, len(labels))
        assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_enrollment_prototypes_need_no_training_and_follow_the_speakers_own_scale():
    from evaluation.baselines import EnrollmentPrototypes, make_baseline

    labels = ["anger", "calm", "fear"]
    method = make_baseline("enroll_prototypes").fit(np.zeros((3, 4)), labels, ["a", "b", "c"], labels)
    assert isinstance(method, EnrollmentPrototypes)
    rng = np.random.default_rng(0)
    # One speaker whose classes differ along dimension 0, on top of a large speaker offset and
    # scale: the enrollment's own statistics remove both.
    centres = {"anger": 1.0, "calm": -1.0}
    enrollment = np.stack([[1000 + 50 * centres[label] + rng.normal(), 7 + rng.normal(), 0, 0]
                           for label in ["anger", "calm"] * 4]).astype(np.float32)
    query = np.array([[1000 + 50 * 1.0, 7, 0, 0], [1000 - 50, 7, 0, 0]], dtype=np.float32)
    probs = method.predict_proba(query, enrollment, ["anger", "calm"] * 4)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert probs[0].argmax() == 0 and probs[1].argmax() == 1
    assert (probs[:, 2] == 0).all()  # fear was not enrolled
    # K = 0: nothing to compare with, uniform; K = 1: the one enrolled class.
    np.testing.assert_allclose(method.predict_proba(query), np.full((2, 3), 1 / 3))
    assert (method.predict_proba(query, enrollment[:1], ["calm"]).argmax(1) == 1).all()
    with pytest.raises(ValueError, match="temperature"):
        EnrollmentPrototypes(temperature=0)
