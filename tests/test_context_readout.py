"""The enrollment read-out: what it reads, where it writes, batching, profiles and errors."""

import math

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_icl_ser import IclSerConfig
from modeling_icl_ser.readout import IclSerContextReadout
from modeling_icl_ser.testing import tiny_icl_ser

LABELS = ["anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
SR = 16000


@pytest.fixture(scope="module")
def readout_model():
    model, processor = tiny_icl_ser(seed=0, context_readout_heads=2)
    with torch.no_grad():  # a visible read-out: the random init is small next to the audio tokens
        model.context_readout.head_weight.fill_(3.0)
    return model.eval(), processor


def _episode(make_audio, k: int, seed: int):
    enrollment = [(make_audio(0.5 + 0.2 * j, seed=seed * 10 + j), LABELS[(seed + j) % 8]) for j in range(k)]
    return make_audio(0.9 + 0.2 * seed, seed=seed * 10 + 9), enrollment


def test_readout_returns_the_label_of_the_matching_enrollment_utterance():
    config = IclSerConfig(context_readout_heads=1, context_readout_dim=16)
    readout = IclSerContextReadout(config)
    width = readout.summary_width
    with torch.no_grad():  # a sharp metric: the nearest enrollment utterance takes all the mass
        readout.log_temperature.fill_(math.log(1e7))
        readout.none_score.fill_(-1e9)
        readout.head_weight.fill_(1.0)
    enrollment = torch.randn(5, width)
    labels = torch.randn(5, 7)
    out, weights = readout(enrollment[[3, 1]], enrollment, labels)
    torch.testing.assert_close(out, labels[[3, 1]], atol=1e-3, rtol=1e-3)
    matches = torch.zeros(2, 5, dtype=torch.bool)
    matches[0, 3] = matches[1, 1] = True
    assert float(IclSerContextReadout.matching_loss(weights, matches)) < 1e-3
    assert float(IclSerContextReadout.matching_loss(weights, matches.roll(1, dims=1))) > 5  # wrong ones
    # A strong "none" slot reads nothing, which is right when no enrollment label matches.
    with torch.no_grad():
        readout.none_score.fill_(1e9)
    out, weights = readout(enrollment[[3]], enrollment, labels)
    assert out.abs().max() < 1e-6
    assert float(IclSerContextReadout.matching_loss(weights, torch.zeros(1, 5, dtype=torch.bool))) < 1e-3


def test_processor_marks_enrollment_labels_and_unlabelled_queries(readout_model, make_audio):
    _, processor = readout_model
    episodes = [_episode(make_audio, k, i) for i, k in enumerate([2, 0])]
    batch = processor(query=[q for q, _ in episodes], enrollment=[e for _, e in episodes], sampling_rate=SR)
    ids = batch["audio_label_ids"]
    assert ids.shape[0] == batch["input_features"].shape[0] == 4  # 2 + 1 query, then 0 + 1 query
    for row, label in zip(ids[:2], [LABELS[0], LABELS[1]]):
        assert [i for i in row.tolist() if i != -100] == processor.answer_ids(label)
    assert bool((ids[2:] == -100).all())


def test_readout_changes_only_queries_with_enrollment(readout_model, make_audio):
    model, processor = readout_model
    query, enrollment = _episode(make_audio, 3, 1)
    with_context = processor(query=query, enrollment=enrollment, sampling_rate=SR)
    zero_shot = processor(query=query, sampling_rate=SR)
    with torch.no_grad():
        embeds = model._embed_with_audio(with_context["input_ids"], with_context["input_features"],
                                         with_context["feature_attention_mask"], None, None,
                                         with_context["audio_label_ids"]).embeds
        plain = model._embed_with_audio(with_context["input_ids"], with_context["input_features"],
                                        with_context["feature_attention_mask"], None, None).embeds
        moved = (embeds - plain).abs().amax(-1)[0]
        audio = with_context["input_ids"][0] == model.config.audio_token_id
        n = model.config.num_audio_tokens
        first_query_token = int(audio.nonzero().squeeze(-1)[-n])
        # Every query audio token and the query line's text after it get the read-out ...
        assert bool((moved[first_query_token:] > 1e-3).all())
        # ... the instruction, the enrollment lines and the query line's start do not.
        assert float(moved[:first_query_token].max()) == 0.0
        # K = 0: nothing to read; the same as without the read-out's inputs.
        zero = model._embed_with_audio(zero_shot["input_ids"], zero_shot["input_features"],
                                       zero_shot["feature_attention_mask"], None, None, zero_shot["audio_label_ids"]).embeds
        zero_plain = model._embed_with_audio(zero_shot["input_ids"], zero_shot["input_features"],
                                             zero_shot["feature_attention_mask"], None, None).embeds
    torch.testing.assert_close(zero, zero_plain, atol=0, rtol=0)


def test_enrollment_label_words_steer_the_query(readout_model, make_audio):
    model, processor = readout_model
    query, enrollment = _episode(make_audio, 2, 2)
    relabelled = [(audio, label) for (audio, _), label in zip(enrollment, ["surprise", "disgust"])]
    with torch.no_grad():
        a = model.classify(**processor(query=query, enrollment=enrollment, sampling_rate=SR))
        b = model.classify(**processor(query=query, enrollment=relabelled, sampling_rate=SR))
    assert not torch.allclose(a, b, atol=1e-4)


def test_batched_readout_equals_one_by_one(readout_model, make_audio):
    model, processor = readout_model
    ks = [2, 0, 3]
    episodes = [_episode(make_audio, k, i) for i, k in enumerate(ks)]
    batch = processor(query=[q for q, _ in episodes], enrollment=[e for _, e in episodes], sampling_rate=SR)
    with torch.no_grad():
        probs = model.classify(**batch)
        for i, (query, enrollment) in enumerate(episodes):
            single = processor(query=query, enrollment=enrollment, sampling_rate=SR)
            torch.testing.assert_close(model.classify(**single)[0], probs[i], atol=1e-5, rtol=1e-5)


def test_query_answers_are_each_rows_last_target_run():
    from modeling_icl_ser import IclSerForConditionalGeneration

    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9], [-100, -100, -100, -100, -100, -100, 4, 2]])
    assert IclSerForConditionalGeneration._query_answers(labels) == [[7, 8, 9], [4, 2]]


def test_readout_loss_joins_the_training_loss(readout_model, make_audio):
    model, processor = readout_model
    query, enrollment = _episode(make_audio, 3, 0)
    batch = processor(query=query, enrollment=enrollment, answer=enrollment[1][1], sampling_rate=SR)
    with torch.no_grad():
        with_readout_loss = model(**batch).loss
        model.config.context_readout_loss_coef = 0.0
        try:
            lm_only = model(**batch).loss
        finally:
            model.config.context_readout_loss_coef = 1.0
    assert float(with_readout_loss) > float(lm_only) + 1e-4


def test_readout_trains(readout_model, make_audio):
    model, processor = readout_model
    query, enrollment = _episode(make_audio, 3, 0)
    batch = processor(query=query, enrollment=enrollment, answer="calm", sampling_rate=SR)
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {name: p.grad for name, p in model.context_readout.named_parameters()}
    model.zero_grad()
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values()), grads.keys()


def test_bad_audio_label_ids_raise(readout_model, make_audio):
    model, processor = readout_model
    query, enrollment = _episode(make_audio, 2, 0)
    batch = processor(query=query, enrollment=enrollment, sampling_rate=SR)
    with pytest.raises(ValueError, match="one row per audio"):
        model.classify(**{**batch, "audio_label_ids": batch["audio_label_ids"][:2]})
    with pytest.raises(ValueError, match="context_readout_heads must be >= 0"):
        IclSerConfig(context_readout_heads=-1)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_profile_keeps_the_readout(readout_model, make_audio, k, tmp_path):
    model, processor = readout_model
    pipe = pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")
    query, enrollment = _episode(make_audio, k, 3)
    profile = pipe.enroll(enrollment, sampling_rate=SR)
    assert (profile.enrollment_context is None) == (k == 0)
    direct = pipe(query, enrollment=enrollment, sampling_rate=SR)
    path = tmp_path / "speaker.safetensors"
    profile.save(path)
    for used in (profile, type(profile).load(path)):
        via_profile = pipe([query, query], profile=used, batch_size=2, sampling_rate=SR)
        for out in via_profile:
            scores = {item["label"]: item["score"] for item in out}
            assert max(abs(scores[item["label"]] - item["score"]) for item in direct) < 1e-4


def test_saved_readout_model_round_trips(readout_model, make_audio, tmp_path):
    from modeling_icl_ser import IclSerForConditionalGeneration

    model, processor = readout_model
    model.save_pretrained(tmp_path)
    loaded = IclSerForConditionalGeneration.from_pretrained(tmp_path).eval()
    query, enrollment = _episode(make_audio, 2, 4)
    batch = processor(query=query, enrollment=enrollment, sampling_rate=SR)
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(**batch), model.classify(**batch))
    assert np.isclose(float(loaded.context_readout.head_weight[0].detach()), 3.0)


def test_copy_route_names_the_label_of_the_matching_enrollment_utterance(make_audio):
    model, processor = tiny_icl_ser(seed=3, context_readout_heads=1)
    # Tied input/output embeddings, as in SmolLM2 (the copy route raises the label words' logits).
    model.language_model.lm_head.weight = model.language_model.get_input_embeddings().weight
    readout = model.context_readout
    with torch.no_grad():  # sharp attention on the most similar enrollment utterance, a strong copy
        readout.log_temperature.fill_(math.log(1e7))
        readout.none_score.fill_(-1e9)
        readout.head_weight.fill_(1.0)
        readout.output_gain.fill_(200.0)
    model.eval()
    clips = [make_audio(0.6 + 0.15 * j, seed=40 + j) for j in range(3)]
    words = ["surprise", "anger", "sadness"]
    for j in range(3):  # the query is enrollment utterance j itself
        batch = processor(query=clips[j], enrollment=list(zip(clips, words)), sampling_rate=SR)
        with torch.no_grad():
            probs = model.classify(**batch)[0]
        assert processor.labels[int(probs.argmax())] == words[j]


def test_readout_switched_off_still_learns_to_match_but_leaves_the_lm_alone(make_audio):
    # The first stage of train.py's two-stage schedule.
    model, processor = tiny_icl_ser(seed=0, context_readout_heads=2)
    with torch.no_grad():
        model.context_readout.head_weight.fill_(3.0)
    model.eval()
    query, enrollment = _episode(make_audio, 3, 0)
    inputs = processor(query=query, enrollment=enrollment, sampling_rate=SR)
    unlabelled = {**inputs, "audio_label_ids": None}
    with torch.no_grad():
        fed = model.classify(**inputs)
        model.feed_context_readout(False)
        unfed = model.classify(**inputs)
        torch.testing.assert_close(unfed, model.classify(**unlabelled), atol=0, rtol=0)  # no read-out effect
    assert not torch.allclose(fed, unfed, atol=1e-4)
    batch = processor(query=query, enrollment=enrollment, answer=enrollment[1][1], sampling_rate=SR)
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {name: p.grad for name, p in model.context_readout.named_parameters()}
    model.zero_grad()
    assert float(grads["proj.weight"].abs().sum()) > 0  # the matching loss still trains it
    assert grads["output_gain"] is None or float(grads["output_gain"].abs().sum()) == 0  # the LM never saw it
    model.feed_context_readout(True)
    with torch.no_grad():
        torch.testing.assert_close(model.classify(**inputs), fed)


def test_readout_dropout_only_while_training(make_audio):
    model, processor = tiny_icl_ser(seed=0, context_readout_heads=2, context_readout_dropout=0.5)
    episodes = [_episode(make_audio, 2, i) for i in range(8)]
    batch = processor(query=[q for q, _ in episodes], enrollment=[e for _, e in episodes], sampling_rate=SR)
    placeholders = batch["input_ids"] == model.config.audio_token_id
    hidden, mask = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
    with torch.no_grad():
        rows, labelled = model._speaker_rows(placeholders, hidden, mask, batch["audio_label_ids"], None)
        model.eval()
        kept, _ = model._read_enrollment(rows, labelled, batch["audio_label_ids"], None)
        model.train()
        torch.manual_seed(0)
        dropped, _ = model._read_enrollment(rows, labelled, batch["audio_label_ids"], None)
    model.eval()
    queries = (batch["audio_label_ids"] == -100).all(-1)
    assert bool((kept[queries].abs().sum(-1) > 0).all())  # every query is read at inference
    zeroed = dropped[queries].abs().sum(-1) == 0
    assert 0 < int(zeroed.sum()) < int(queries.sum())  # some, not all, dropped in training
    torch.testing.assert_close(dropped[queries][~zeroed], kept[queries][~zeroed])
    with pytest.raises(ValueError, match="context_readout_dropout"):
        IclSerConfig(context_readout_dropout=1.0)


def test_removed_pointer_option_loads_off_and_refuses_on(caplog):
    """`context_readout_pointer` is gone: an old config with it off loads as before; one with it on
    is refused (its `classify` would differ), naming the ways to load it."""
    assert not hasattr(IclSerConfig(context_readout_pointer=False), "context_readout_pointer")
    assert "context_readout_pointer" not in IclSerConfig(context_readout_pointer=False).to_dict()
    with pytest.raises(ValueError, match="context_readout_pointer.*trust_remote_code"):
        IclSerConfig(context_readout_pointer=True)
