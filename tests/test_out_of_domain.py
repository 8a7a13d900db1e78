"""Unlabelled speech in episodes and baselines, and route weights chosen per K out of domain."""

import numpy as np
import pytest

from dataset_builder import attach_unlabelled, build_pools
from dataset_builder.episodes import fixed_episodes
from evaluation.baselines import make_baseline
from evaluation.route_weights import choose_route_weights_per_k
from modeling_icl_ser.route_mixing import weights_for_k


def _table(n_speakers=3, per_speaker=12, texts=4):
    rows = []
    for s in range(n_speakers):
        for i in range(per_speaker):
            rows.append({"id": f"s{s}_{i:02d}", "speaker": f"s{s}", "emotion": ["a", "b", "c"][i % 3],
                         "text": f"t{i % texts}"})
    return rows


def test_attach_unlabelled_never_query_enrollment_or_query_sentence():
    pools = build_pools(_table())
    episodes = list(fixed_episodes(pools, k=2, mode="arbitrary", seed=0, content_disjoint=True))
    with_u = attach_unlabelled(episodes, pools, 5, seed=0, content_disjoint=True)
    text_of = {r["id"]: r["text"] for r in _table()}
    for episode in with_u:
        u = episode["unlabelled_ids"]
        assert len(u) == 5 and len(set(u)) == 5
        assert episode["query_id"] not in u and not set(u) & set(episode["enrollment_ids"])
        assert all(i.split("_")[0] == episode["speaker"] for i in u)
        assert all(text_of[i] != text_of[episode["query_id"]] for i in u)
    # The same query keeps its unlabelled speech across calls (deterministic in the seed).
    assert attach_unlabelled(episodes, pools, 5, seed=0, content_disjoint=True) == with_u
    assert attach_unlabelled(episodes, pools, 5, seed=1, content_disjoint=True) != with_u


def test_attach_unlabelled_small_speaker_and_bad_count():
    pools = build_pools(_table(1, 5))
    episodes = list(fixed_episodes(pools, k=1, mode="arbitrary", seed=0))
    assert all(len(e["unlabelled_ids"]) == 3 for e in attach_unlabelled(episodes, pools, 16))
    with pytest.raises(ValueError, match="integer >= 0"):
        attach_unlabelled(episodes, pools, -1)


def _speaker_data(rng, n_speakers=6, per_class=10, dim=8):
    """Three classes whose direction is shared, each speaker offset by a large random shift."""
    centers = rng.normal(size=(3, dim)) * 1.0
    features, labels, speakers = [], [], []
    for s in range(n_speakers):
        shift = rng.normal(size=dim) * 4.0
        for c in range(3):
            features.append(centers[c] + shift + 0.3 * rng.normal(size=(per_class, dim)))
            labels += ["abc"[c]] * per_class
            speakers += [f"s{s}"] * per_class
    return np.concatenate(features).astype(np.float32), labels, speakers, centers


def test_si_norm_uses_unlabelled_statistics_at_k0():
    rng = np.random.default_rng(0)
    x, y, spk, centers = _speaker_data(rng)
    model = make_baseline("si_norm", train_steps=300, seed=0, train_ks=(1, 2, 4, 8, 16)).fit(x, y, spk, ["a", "b", "c"])
    shift = rng.normal(size=x.shape[1]) * 4.0
    new = np.concatenate([centers[c] + shift + 0.3 * rng.normal(size=(10, x.shape[1])) for c in range(3)]).astype(np.float32)
    truth = np.repeat(np.arange(3), 10)
    plain = model.predict_proba(new).argmax(-1)
    with_u = np.stack([model.predict_proba(new[i], unlabelled_features=np.delete(new, i, 0)[:16])[0]
                       for i in range(len(new))]).argmax(-1)
    assert (with_u == truth).mean() > (plain == truth).mean() + 0.2
    # Unlabelled speech only changes the statistics: equal to passing the same rows as enrollment.
    stats = new[:16]
    a = model.predict_proba(new[20], unlabelled_features=stats)
    b = model.predict_proba(new[20], enrollment_features=stats, enrollment_labels=["a"] * 16)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_choose_route_weights_per_k_follows_the_held_out_folds():
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c"]
    folds = []
    for _ in range(2):
        n = 60
        routes_by_k, truths_by_k = {}, {}
        for k in (0, 8):
            truth = rng.integers(0, 3, size=n)
            good = np.full((n, 3), 0.01)
            good[np.arange(n), truth] = 0.98
            noise = np.full((n, 3), 0.01)  # a confidently wrong route
            noise[np.arange(n), (truth + 1) % 3] = 0.98
            # Out of domain: at K = 0 the SI route is right; at K = 8 the prototype route is.
            routes_by_k[k] = {"lm": noise, "si": good if k == 0 else noise,
                              "prototype": (np.full((n, 3), np.nan) if k == 0 else good)}
            truths_by_k[k] = [labels[i] for i in truth]
        folds.append((routes_by_k, truths_by_k, labels))
    chosen, means, per_fold = choose_route_weights_per_k(folds, step=0.25)
    assert set(chosen) == {0, 8}
    assert chosen[0]["si"] > chosen[0]["lm"] and "prototype" not in chosen[0]
    assert chosen[8]["prototype"] > max(chosen[8]["lm"], chosen[8]["si"])
    assert means[8] == pytest.approx(1.0) and len(per_fold[8]) == 2
    with pytest.raises(ValueError, match="at least one"):
        choose_route_weights_per_k([])


def test_weights_for_k_takes_the_largest_chosen_k_below():
    by_k = {"0": {"si": 1.0}, "2": {"lm": 1.0}, "8": {"prototype": 1.0}}
    assert weights_for_k(by_k, 0) == {"si": 1.0}
    assert weights_for_k(by_k, 3) == {"lm": 1.0}
    assert weights_for_k(by_k, 16) == {"prototype": 1.0}
    assert weights_for_k({"2": {"lm": 1.0}}, 1) is None


def test_fit_si_route_learns_both_heads_and_leaves_them_fixed():
    import torch
    from torch import nn

    from training.si_route import SiRouteFitting, Utterances, fit_si_route

    rng = np.random.default_rng(3)
    x, y, spk, _ = _speaker_data(rng, n_speakers=8, per_class=12, dim=6)
    x = np.concatenate([x, np.abs(rng.normal(size=x.shape)).astype(np.float32)], axis=1)  # (mean, std) width
    targets = torch.tensor(["abc".index(label) for label in y])
    speakers = np.array(spk, dtype=object)

    def split(mask):
        return Utterances(torch.from_numpy(x[mask]), targets[mask], torch.ones(int(mask.sum()), 3, dtype=torch.bool),
                          speakers[mask])

    train_mask = np.isin(speakers, [f"s{i}" for i in range(6)])
    routes = nn.Module()
    routes.raw = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 16))
    routes.normalized = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 16))
    label_embeds = torch.randn(3, 16)
    report = fit_si_route(routes, label_embeds, split(train_mask), split(~train_mask), 0.01,
                          SiRouteFitting(max_steps=400, eval_every=50, statistics_sizes=(2, 4, 8)))
    # Speakers are shifted far apart: their own statistics make the classes separable.
    assert report["normalized"]["val_ua"] > 0.8
    assert report["normalized"]["val_ua"] > report["raw"]["val_ua"]
    assert not any(p.requires_grad for p in routes.parameters())
    with pytest.raises(ValueError, match=">= 1"):
        SiRouteFitting(max_steps=0)


def test_fold_scores_round_trip_and_nested_choice(tmp_path):
    from training.held_out_folds import choose_out_of_domain_weights, load_fold_scores, save_fold_scores

    rng = np.random.default_rng(5)
    labels = ["a", "b", "c"]
    folds = {}
    for name, right in (("x", "si"), ("y", "prototype"), ("z", "prototype")):
        truth = rng.integers(0, 3, size=30)
        good = np.full((30, 3), 0.01, dtype=np.float32)
        good[np.arange(30), truth] = 0.98
        wrong = np.roll(good, 1, axis=1)
        routes = {4: {"lm": wrong, "si": good if right == "si" else wrong, "prototype": good if right == "prototype" else wrong}}
        path = tmp_path / f"{name}.npz"
        save_fold_scores(path, routes, {4: [labels[i] for i in truth]}, labels)
        folds[name] = load_fold_scores(path)
        np.testing.assert_array_equal(folds[name][0][4]["si"], routes[4]["si"])
        assert folds[name][1][4] == [labels[i] for i in truth] and folds[name][2] == labels
    everything = choose_out_of_domain_weights(folds, 0.5)
    assert everything["weights"]["4"]["prototype"] >= 0.5 and set(everything["per_fold"]["4"]) == {"x", "y", "z"}
    # Nested: the weights for testing on y never look at y; without x the SI route has no support.
    without_x = choose_out_of_domain_weights(folds, 0.5, exclude="x")
    assert without_x["weights"]["4"] == {"lm": 0.0, "si": 0.0, "prototype": 1.0}
    assert set(without_x["per_fold"]["4"]) == {"y", "z"}


def test_query_k_gives_every_k_the_same_queries():
    pools = build_pools(_table(2, 12, texts=6))
    by_k = {k: list(fixed_episodes(pools, k=k, mode="arbitrary", seed=0, content_disjoint=True, query_k=8))
            for k in (0, 2, 8)}
    queries = {k: [e["query_id"] for e in eps] for k, eps in by_k.items()}
    assert queries[0] == queries[2] == queries[8]
    assert all(len(e["enrollment_ids"]) == k for k, eps in by_k.items() for e in eps)
    with pytest.raises(ValueError, match="query_k must be >= k"):
        list(fixed_episodes(pools, k=4, mode="arbitrary", query_k=2))
