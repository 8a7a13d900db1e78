"""Speaker normalization, the SI route and the prototype route: what they compute, how classify
mixes them, how they train, save and survive a speaker profile; the route-weight chooser."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from evaluation.baselines import EnrollmentPrototypes
from evaluation.route_weights import choose_route_weights, weight_grid
from modeling_icl_ser import IclSerConfig
from modeling_icl_ser.route_mixing import mix_routes
from modeling_icl_ser.speaker_routes import speaker_standardize
from modeling_icl_ser.testing import tiny_icl_ser

LABELS = ["anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
SR = 16000


@pytest.fixture(scope="module")
def routed_model():
    model, processor = tiny_icl_ser(seed=1, context_readout_heads=2, speaker_normalization=True, si_route=True)
    return model.eval(), processor


def _enrollment(make_audio, k: int, seed: int = 0):
    return [(make_audio(0.5 + 0.15 * j, seed=seed * 10 + j), LABELS[j % 3]) for j in range(k)]


def test_speaker_standardize_by_enrollment_size():
    torch.manual_seed(0)
    x, enrollment = torch.randn(3, 6), torch.randn(5, 6) * 3 + 2
    assert torch.equal(speaker_standardize(x, enrollment[:0], 0.01), x)
    torch.testing.assert_close(speaker_standardize(x, enrollment[:1], 0.01), x - enrollment[0])
    z = speaker_standardize(enrollment, enrollment, 0.0)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_mix_routes_renormalizes_over_the_routes_a_row_has():
    lm = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    si = torch.tensor([[0.2, 0.8], [0.2, 0.8]])
    prototype = torch.tensor([[0.0, 1.0], [float("nan"), float("nan")]])
    routes = {"lm": lm, "si": si, "prototype": prototype}
    assert torch.equal(mix_routes(routes, None), lm)
    mixed = mix_routes(routes, {"lm": 0.5, "si": 0.25, "prototype": 0.25})
    torch.testing.assert_close(mixed[0], 0.5 * lm[0] + 0.25 * si[0] + 0.25 * prototype[0])
    torch.testing.assert_close(mixed[1], (0.5 * lm[1] + 0.25 * si[1]) / 0.75)  # no enrollment: no prototype
    torch.testing.assert_close(mix_routes(routes, {"prototype": 1.0})[1], lm[1])  # nothing weighted: the LM
    # Rows without enrollment can have their own weights.
    split = mix_routes(routes, {"prototype": 1.0}, {"si": 1.0})
    torch.testing.assert_close(split, torch.stack([prototype[0], si[1]]))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_prototype_route_equals_the_enroll_prototypes_baseline(routed_model, make_audio, k):
    """The model's parameter-free route is the conventional enroll_prototypes method on the
    model's own utterance vectors: with it at full weight the model cannot lose to it."""
    model, processor = routed_model
    query, enrollment = make_audio(1.1, seed=77), _enrollment(make_audio, k)
    batch = processor(query=query, enrollment=enrollment, sampling_rate=SR)
    with torch.no_grad():
        routes = model.classify(**batch, return_routes=True)
        vectors = model.utterance_embeddings(batch["input_features"], batch["feature_attention_mask"]).numpy()
    baseline = EnrollmentPrototypes(temperature=model.config.prototype_temperature,
                                    variance_floor=model.config.speaker_variance_floor).fit(None, None, None, LABELS)
    expected = baseline.predict_proba(vectors[-1:], vectors[:-1], [label for _, label in enrollment])
    np.testing.assert_allclose(routes["prototype"].numpy(), expected, atol=2e-4)


def test_classify_mixes_the_routes_by_the_config(routed_model, make_audio, monkeypatch):
    model, processor = routed_model
    batch = processor(query=[make_audio(1.0, seed=5), make_audio(0.8, seed=6)],
                      enrollment=[_enrollment(make_audio, 3), []], sampling_rate=SR)
    with torch.no_grad():
        routes = model.classify(**batch, return_routes=True)
        assert torch.isnan(routes["prototype"][1]).all() and not torch.isnan(routes["prototype"][0]).any()
        torch.testing.assert_close(routes["si"].sum(-1), torch.ones(2))
        weights, without = {"lm": 0.2, "si": 0.3, "prototype": 0.5}, {"lm": 0.4, "si": 0.6}
        monkeypatch.setattr(model.config, "route_weights", weights)
        monkeypatch.setattr(model.config, "route_weights_without_enrollment", without)
        mixed = model.classify(**batch)
    torch.testing.assert_close(mixed, mix_routes(routes, weights, without))
    torch.testing.assert_close(mixed.sum(-1), torch.ones(2))


def test_classify_mixes_by_the_weights_of_each_rows_enrollment_size(routed_model, make_audio, monkeypatch):
    model, processor = routed_model
    batch = processor(query=[make_audio(1.0, seed=5), make_audio(0.8, seed=6), make_audio(0.9, seed=7)],
                      enrollment=[_enrollment(make_audio, 3), [], _enrollment(make_audio, 1, seed=2)], sampling_rate=SR)
    with torch.no_grad():
        routes = model.classify(**batch, return_routes=True)
        # K = 0 → SI alone; K = 1 (largest listed K <= 1 is 0) → SI too; K = 3 (uses K = 2's) → prototype alone.
        monkeypatch.setattr(model.config, "route_weights_by_k", {"0": {"si": 1.0}, "2": {"prototype": 1.0}})
        mixed = model.classify(**batch)
    torch.testing.assert_close(mixed[0], routes["prototype"][0])
    torch.testing.assert_close(mixed[1], routes["si"][1])
    torch.testing.assert_close(mixed[2], routes["si"][2])


@pytest.mark.parametrize("by_k, message", [({"x": {"lm": 1.0}}, "enrollment sizes"), ({"2": {"lm": -1.0}}, "weights >= 0")])
def test_bad_per_k_route_weights_raise(by_k, message):
    with pytest.raises(ValueError, match=message):
        IclSerConfig(route_weights_by_k=by_k)


def test_si_route_uses_its_normalized_head_only_with_enrollment(routed_model, make_audio):
    model, processor = routed_model
    query = make_audio(1.0, seed=8)
    with torch.no_grad():
        alone = model.classify(**processor(query=query, sampling_rate=SR), return_routes=True)["si"]
        audio = processor.audio_inputs([query])
        vector = model.utterance_embeddings(torch.tensor(audio["input_features"]), torch.tensor(audio["feature_attention_mask"]))
        cands = processor.candidate_inputs(LABELS)
        ids = torch.tensor(cands["candidate_input_ids"])[None]
        embeds = model._candidate_embeddings(ids, torch.tensor(cands["candidate_attention_mask"])[None])[0]
        expected = model.speaker_routes.logits(vector, False, embeds).softmax(-1)
    torch.testing.assert_close(alone, expected)
    assert not torch.allclose(model.speaker_routes.logits(vector, True, embeds),
                              model.speaker_routes.logits(vector, False, embeds))


def test_si_route_trains_beside_the_lm_loss(make_audio):
    model, processor = tiny_icl_ser(seed=2, si_route=True, speaker_normalization=True)
    batch = processor(query=[make_audio(1.0, seed=1), make_audio(0.9, seed=2)],
                      enrollment=[_enrollment(make_audio, 2), []], answer=["fear", "calm"], sampling_rate=SR)
    model.train()
    with_route = model(**batch).loss
    model.config.si_route_loss_coef = 0.0
    without = model(**batch).loss
    model.config.si_route_loss_coef = 1.0
    assert float(with_route.detach()) > float(without.detach()) + 1e-3  # a random route pays a cross-entropy near log(8)
    with_route.backward()
    assert model.speaker_routes.raw[1].weight.grad.abs().sum() > 0
    assert model.speaker_routes.normalized[1].weight.grad.abs().sum() > 0
    # Micro-batches: each call's SI loss is its share of the whole batch's mean.
    halves = [processor(query=[make_audio(1.0, seed=1)], enrollment=[_enrollment(make_audio, 2)], answer=["fear"],
                        sampling_rate=SR),
              processor(query=[make_audio(0.9, seed=2)], enrollment=[[]], answer=["calm"], sampling_rate=SR)]
    model.eval()  # no dropout, so the passes are comparable
    model.config.context_readout_loss_coef = 0.0
    n_targets = sum(int((h["labels"][:, 1:] != -100).sum()) for h in halves)
    parts = sum(float(model(**h, num_items_in_batch=n_targets, num_queries_in_batch=2).loss) for h in halves)
    whole = float(model(**batch).loss)
    assert abs(parts - whole) < 1e-4


def test_profile_gives_the_same_routes(routed_model, make_audio, monkeypatch):
    model, processor = routed_model
    monkeypatch.setattr(model.config, "route_weights", {"lm": 0.2, "si": 0.3, "prototype": 0.5})
    pipe = pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")
    query, enrollment = make_audio(1.2, seed=42), _enrollment(make_audio, 4, seed=2)
    direct = {item["label"]: item["score"] for item in pipe(query, enrollment=enrollment, sampling_rate=SR)}
    via_profile = pipe(query, profile=pipe.enroll(enrollment, sampling_rate=SR), sampling_rate=SR)
    assert max(abs(direct[item["label"]] - item["score"]) for item in via_profile) < 1e-4


def test_routes_round_trip_through_save_pretrained(routed_model, make_audio, tmp_path, monkeypatch):
    from modeling_icl_ser import IclSerForConditionalGeneration

    model, processor = routed_model
    monkeypatch.setattr(model.config, "route_weights", {"lm": 0.5, "si": 0.2, "prototype": 0.3})
    model.save_pretrained(tmp_path)
    loaded = IclSerForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.route_weights == {"lm": 0.5, "si": 0.2, "prototype": 0.3}
    batch = processor(query=make_audio(1.0, seed=3), enrollment=_enrollment(make_audio, 3), sampling_rate=SR)
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(**batch), model.classify(**batch))


@pytest.mark.parametrize("settings, message", [
    ({"route_weights": {"lm": 1.0, "knn": 1.0}}, "route_weights"),
    ({"route_weights": {"lm": -1.0}}, "route_weights"),
    ({"route_weights": {"si": 1.0}}, "si_route=True"),
    ({"route_weights_without_enrollment": {"prototype": 0.0}}, "route_weights_without_enrollment"),
    ({"prototype_temperature": 0.0}, "prototype_temperature"),
])
def test_bad_route_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        IclSerConfig(**settings)


def test_weight_grid_covers_the_simplex():
    grid = weight_grid(["lm", "si", "prototype"], 0.1)
    assert len(grid) == 66 and grid[0] == {"lm": 1.0, "si": 0.0, "prototype": 0.0}
    assert all(abs(sum(w.values()) - 1) < 1e-9 for w in grid)
    with pytest.raises(ValueError, match="step"):
        weight_grid(["lm"], 0.3)


def test_choose_route_weights_trusts_the_route_that_is_right():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    truth = rng.integers(0, 3, 60)
    right = np.eye(3)[truth] * 0.6 + 0.4 / 3
    noise = rng.dirichlet(np.ones(3), 60)
    routes = {0: {"lm": noise, "si": None, "prototype": np.full((60, 3), np.nan)},
              8: {"lm": noise, "si": None, "prototype": right}}
    truths = {k: [labels[i] for i in truth] for k in routes}
    weights, without, scores = choose_route_weights(routes, truths, labels)
    assert set(weights) == {"lm", "prototype"} and weights["prototype"] > 0.5
    assert without == {"lm": 1.0}  # no enrollment: the prototype route is not a choice
    assert scores[8] == 1.0
    # Without enrollment the SI route may be the one to trust, whatever the K >= 1 choice.
    routes[0]["si"], routes[8]["si"] = right, noise
    weights, without, scores = choose_route_weights(routes, truths, labels)
    assert without["si"] > 0.5 and weights["prototype"] > 0.5 and scores[0] == 1.0
    with pytest.raises(ValueError, match="same K"):
        choose_route_weights(routes, {0: truths[0]}, labels)


def test_model_card_names_the_chosen_route_weights():
    import train

    config = IclSerConfig(si_route=True, speaker_normalization=True,
                          route_weights={"lm": 0.1, "si": 0.5, "prototype": 0.4},
                          route_weights_without_enrollment={"lm": 1.0, "si": 0.0})
    line = train.describe_routes(config)
    assert line.startswith("with enrollment: lm 0.1, si 0.5, prototype 0.4; without enrollment: lm 1.0 (")
    assert "speaker normalization" in line and "SI route" in line
    assert train.describe_routes(IclSerConfig()) == "the LM alone"


def test_unlabelled_speech_sets_the_speaker_statistics(routed_model, make_audio):
    model, processor = routed_model
    query = make_audio(1.0, seed=8)
    others = [make_audio(0.6 + 0.1 * j, seed=30 + j) for j in range(5)]
    audio = processor.audio_inputs([query, *others])
    with torch.no_grad():
        vectors = model.utterance_embeddings(torch.tensor(audio["input_features"]), torch.tensor(audio["feature_attention_mask"]))
        batch = processor(query=query, sampling_rate=SR)
        plain = model.classify(**batch, return_routes=True)
        with_u = model.classify(**batch, return_routes=True, unlabelled_summaries=[vectors[1:]])
        cands = processor.candidate_inputs(LABELS)
        embeds = model._candidate_embeddings(torch.tensor(cands["candidate_input_ids"])[None],
                                             torch.tensor(cands["candidate_attention_mask"])[None])[0]
        normalized = speaker_standardize(vectors[:1], vectors[1:], model.config.speaker_variance_floor)
        expected = model.speaker_routes.logits(normalized, True, embeds).softmax(-1)
    # K = 0 with unlabelled speech: the normalized SI head on statistics of that speech alone.
    torch.testing.assert_close(with_u["si"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_u["si"], plain["si"])
    assert torch.isnan(with_u["prototype"]).all()  # no labels, no prototypes
    with pytest.raises(ValueError, match="one \\(U, F\\) tensor or None per row"):
        model.classify(**batch, unlabelled_summaries=[vectors[1:], None])


@pytest.mark.parametrize("k", [1, 3])
def test_speaker_normalized_audio_tokens_remove_a_speaker_offset_from_the_lm_input(make_audio, monkeypatch, k):
    """With `speaker_normalized_audio_tokens` the LM reads speech standardized by the speaker's
    statistics: a constant offset on every encoder frame of the speaker (a voice or channel shift)
    leaves the LM's answer unchanged; without it the LM's answer moves."""
    query, enrollment = make_audio(1.1, seed=78), _enrollment(make_audio, k, seed=3)
    offset = torch.linspace(-2.0, 3.0, 32)  # the tiny encoder's width

    def lm_route(model, processor, shifted):
        original = type(model).get_audio_features
        if shifted:
            monkeypatch.setattr(model, "get_audio_features", lambda *a, **kw: (
                lambda out: (out[0] + offset.to(out[0].dtype), out[1]))(original(model, *a, **kw)))
        batch = processor(query=query, enrollment=enrollment, sampling_rate=SR)
        with torch.no_grad():
            probabilities = model.classify(**batch, return_routes=True)["lm"]
        monkeypatch.undo()
        return probabilities

    model, processor = tiny_icl_ser(seed=6, speaker_normalization=True, si_route=True, speaker_normalized_audio_tokens=True)
    assert model.get_audio_features(torch.zeros(1, 80, 300))[0].shape[-1] == offset.numel()
    torch.testing.assert_close(lm_route(model, processor, True), lm_route(model, processor, False), atol=1e-4, rtol=0)
    plain, plain_processor = tiny_icl_ser(seed=6, speaker_normalization=True, si_route=True)
    assert not torch.allclose(lm_route(plain, plain_processor, True), lm_route(plain, plain_processor, False), atol=1e-3)


def test_speaker_normalized_audio_tokens_need_speaker_normalization():
    with pytest.raises(ValueError, match="speaker_normalization=True"):
        IclSerConfig(speaker_normalized_audio_tokens=True, speaker_normalization=False)


def test_profile_of_a_model_with_speaker_normalized_lm_input_matches_the_call(make_audio, tmp_path):
    """The profile's cached prefix holds audio tokens normalized by the enrollment plus the
    unlabelled speech given to `enroll`; its queries are normalized by the same statistics, so a
    profiled query scores as the inline call with the same clips (also after save and load)."""
    from modeling_icl_ser import SpeakerProfile

    model, processor = tiny_icl_ser(seed=7, context_readout_heads=2, speaker_normalization=True, si_route=True,
                                    speaker_normalized_audio_tokens=True)
    model.config.route_weights = None  # the LM route alone: the one the prefix feeds
    pipe = pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")
    query, enrollment = make_audio(1.2, seed=43), _enrollment(make_audio, 3, seed=4)
    unlabelled = [make_audio(0.9, seed=90 + j) for j in range(3)]
    direct = {item["label"]: item["score"] for item in pipe(query, enrollment=enrollment, unlabelled=unlabelled,
                                                               sampling_rate=SR)}
    profile = pipe.enroll(enrollment, sampling_rate=SR, unlabelled=unlabelled)
    assert profile.audio_statistics is not None and profile.audio_statistics.shape[0] == 2
    profile.save(tmp_path / "p.safetensors")
    for use in (profile, SpeakerProfile.load(tmp_path / "p.safetensors")):
        via_profile = pipe(query, profile=use, sampling_rate=SR)
        assert max(abs(direct[item["label"]] - item["score"]) for item in via_profile) < 1e-4
    # Without the unlabelled clips the statistics, and so the LM's answer, differ.
    plain = {item["label"]: item["score"] for item in pipe(query, enrollment=enrollment, sampling_rate=SR)}
    assert max(abs(plain[label] - direct[label]) for label in plain) > 1e-4
