"""Model core: audio path, projector, placeholder merging, loss, classify, generate."""

import pytest
import torch

from modeling_icl_ser import IclSerConfig, IclSerForConditionalGeneration
from modeling_icl_ser.projector import IclSerProjector

LABELS = ["anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]


def _episode(make_audio, k: int, seed: int):
    """A query and k enrollment pairs with different lengths."""
    enrollment = [(make_audio(0.5 + 0.3 * j, seed=seed * 10 + j), LABELS[(seed + j) % 8]) for j in range(k)]
    return make_audio(1.0 + 0.25 * seed, seed=seed * 10 + 9), enrollment


def _batch(processor, make_audio, ks, **kwargs):
    episodes = [_episode(make_audio, k, i) for i, k in enumerate(ks)]
    return processor(query=[q for q, _ in episodes], enrollment=[e for _, e in episodes], sampling_rate=16000, **kwargs)


def test_three_second_utterance_gives_150_frames_not_1500(tiny, make_audio):
    model, processor = tiny
    inputs = processor(query=make_audio(3.0), sampling_rate=16000)
    assert inputs["input_features"].shape[-1] == 300  # log-mel frames at its own length
    hidden, mask = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    assert hidden.shape[:2] == (1, 150)
    assert int(mask.sum()) == 150


def test_whisper_features_do_not_depend_on_batch_padding(tiny, make_audio):
    model, processor = tiny
    short, long = make_audio(0.7, seed=1), make_audio(2.3, seed=2)
    both = processor.audio_inputs([short, long])
    alone = processor.audio_inputs([short])
    with torch.no_grad():
        h_both, m_both = model.get_audio_features(torch.tensor(both["input_features"]),
                                                  torch.tensor(both["feature_attention_mask"]))
        h_alone, m_alone = model.get_audio_features(torch.tensor(alone["input_features"]),
                                                    torch.tensor(alone["feature_attention_mask"]))
    n = int(m_alone.sum())
    assert int(m_both[0].sum()) == n
    torch.testing.assert_close(h_both[0, :n], h_alone[0, :n], atol=1e-5, rtol=1e-5)


def test_wavlm_encoder_path_and_padding_invariance(tiny_wavlm, make_audio):
    model, processor = tiny_wavlm
    assert not model.config.is_whisper_encoder
    feats = processor.audio_inputs([make_audio(1.0, seed=3), make_audio(2.0, seed=4)])
    alone = processor.audio_inputs([make_audio(1.0, seed=3)])
    with torch.no_grad():
        h, m = model.get_audio_features(torch.tensor(feats["input_features"]), torch.tensor(feats["feature_attention_mask"]))
        h1, m1 = model.get_audio_features(torch.tensor(alone["input_features"]), torch.tensor(alone["feature_attention_mask"]))
    assert m.sum(-1).tolist() == [49, 99]  # ~50 frames per second
    torch.testing.assert_close(h[0, :49], h1[0, :49], atol=1e-5, rtol=1e-5)
    probs = model.classify(**processor(query=make_audio(1.0), enrollment=[(make_audio(0.6), "fear")], sampling_rate=16000))
    assert probs.shape == (1, 8)


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert"])
def test_other_wav2vec2_family_encoders_run(model_type, make_audio):
    from modeling_icl_ser.testing import tiny_icl_ser

    model, processor = tiny_icl_ser(audio_model_type=model_type)
    inputs = processor(query=make_audio(1.0), enrollment=[(make_audio(0.5), "calm")], sampling_rate=16000, answer="fear")
    out = model(**inputs)
    assert torch.isfinite(out.loss)


def test_projector_pools_short_utterances_into_all_segments():
    config = IclSerConfig(num_audio_tokens=8, audio_config={"model_type": "whisper", "d_model": 4,
                          "encoder_attention_heads": 1, "decoder_attention_heads": 1},
                          text_config={"model_type": "llama", "hidden_size": 8, "num_attention_heads": 1,
                                       "num_key_value_heads": 1, "intermediate_size": 8, "num_hidden_layers": 1})
    projector = IclSerProjector(config)
    hidden = torch.arange(10, dtype=torch.float32)[None, :, None].repeat(2, 1, 4)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True  # 3 frames < 8 segments
    mask[1, :] = True
    pooled = projector.pool(hidden, mask)
    assert pooled.shape == (2, 8, 8)
    means = pooled[..., 0]
    assert set(means[0].tolist()) <= {0.0, 1.0, 2.0}  # only valid frames used
    assert means[0].tolist() == sorted(means[0].tolist())  # segments in time order
    assert means[1, 0].item() == pytest.approx(0.0) and means[1, -1].item() == pytest.approx(8.5)  # frames 8, 9
    assert torch.isfinite(projector(hidden, mask)).all()


def test_k_zero_to_eight_in_one_batch_and_probabilities_sum_to_one(tiny, make_audio):
    model, processor = tiny
    inputs = _batch(processor, make_audio, ks=list(range(9)))
    assert inputs["input_features"].shape[0] == sum(range(9)) + 9
    probs = model.classify(**inputs)
    assert probs.shape == (9, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(9), atol=1e-5, rtol=0)


def test_batched_results_equal_per_sample_results(tiny, make_audio):
    model, processor = tiny
    ks = [0, 3, 1]
    batch = _batch(processor, make_audio, ks=ks, answer=["anger", "fear", "calm"])
    with torch.no_grad():
        probs = model.classify(**batch)
        logits = model(**batch).logits  # the target tokens' logits, row by row
    per_row = logits.split((batch["labels"][:, 1:] != -100).sum(1).tolist())
    for i, k in enumerate(ks):
        query, enrollment = _episode(make_audio, k, i)
        single = processor(query=query, enrollment=enrollment, sampling_rate=16000, answer=batch_answer(i))
        with torch.no_grad():
            torch.testing.assert_close(model.classify(**single)[0], probs[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(**single).logits, per_row[i], atol=1e-4, rtol=1e-4)


def batch_answer(i: int) -> str:
    return ["anger", "fear", "calm"][i]


def test_classify_matches_naive_full_forward(tiny, make_audio):
    model, processor = tiny
    inputs = _batch(processor, make_audio, ks=[2, 0], labels=["anger", "calm", "surprise", "fear"])
    probs = model.classify(**inputs)
    n_audio_per_sample = [3, 1]
    audio_slices = [slice(0, 3), slice(3, 4)]
    for b in range(2):
        prompt = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        scores = []
        for cand, cmask in zip(inputs["candidate_input_ids"], inputs["candidate_attention_mask"]):
            cand = cand[cmask.bool()]
            ids = torch.cat([prompt, cand])[None]
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            input_features=inputs["input_features"][audio_slices[b]],
                            feature_attention_mask=inputs["feature_attention_mask"][audio_slices[b]])
            logp = out.logits[0].log_softmax(-1)
            start = len(prompt)
            token_lp = logp[start - 1 : start - 1 + len(cand)].gather(-1, cand[:, None]).squeeze(-1)
            scores.append(token_lp.mean())
        naive = torch.stack(scores).softmax(-1)
        torch.testing.assert_close(probs[b], naive, atol=1e-5, rtol=1e-5)
    assert n_audio_per_sample == [3, 1]


def test_classify_same_with_eager_attention_and_refuses_kernels_without_4d_masks(tiny, make_audio):
    model, processor = tiny
    inputs = _batch(processor, make_audio, ks=[2, 0, 5])
    sdpa = model.classify(**inputs)
    lm_config = model.language_model.config
    original = lm_config._attn_implementation
    try:
        model.language_model.set_attn_implementation("eager")  # the additive-mask path
        torch.testing.assert_close(model.classify(**inputs), sdpa, atol=1e-5, rtol=1e-5)
        lm_config._attn_implementation = "flash_attention_2"  # only the check runs (no kernel needed)
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            model.classify(**inputs)
    finally:
        model.language_model.set_attn_implementation(original)
    assert model.language_model.config._attn_implementation == original


def test_loss_only_on_answer_tokens(tiny, make_audio):
    model, processor = tiny
    inputs = processor(query=make_audio(1.0), enrollment=[(make_audio(0.5), "calm")], sampling_rate=16000,
                       answer="happiness")
    labels = inputs["labels"][0]
    answer_ids = processor.answer_ids("happiness")
    assert labels[labels != -100].tolist() == answer_ids
    assert inputs["input_ids"][0, -len(answer_ids):].tolist() == answer_ids
    with torch.no_grad():
        out = model(**inputs)
        full = model(**{k: v for k, v in inputs.items() if k != "labels"})
    logp = full.logits[0, :-1].log_softmax(-1)
    targets = inputs["labels"][0, 1:]
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    # With labels, only the target tokens get logits (n_targets, vocab).
    assert out.logits.shape == (len(answer_ids), full.logits.shape[-1])
    torch.testing.assert_close(out.logits, full.logits[0, -len(answer_ids) - 1 : -1], atol=1e-5, rtol=1e-5)


def test_loss_over_enrollment_and_query_targets_in_a_padded_batch(tiny, make_audio):
    model, processor = tiny
    batch = _batch(processor, make_audio, [0, 3], answer=["calm", "fear"], label_enrollment=True)
    with torch.no_grad():
        out = model(**batch)
        full = model(**{k: v for k, v in batch.items() if k != "labels"})
    logp = full.logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    # Only the target tokens get logits, fewer than the columns that hold a target in some row.
    assert out.logits.shape[0] == int(keep.sum()) < batch["labels"].shape[0] * int(keep.any(0).sum())
    torch.testing.assert_close(out.logits, full.logits[:, :-1][keep], atol=1e-5, rtol=1e-5)


def test_audio_changes_the_output(tiny, make_audio):
    model, processor = tiny
    a = processor(query=make_audio(1.0, seed=1), sampling_rate=16000)
    b = processor(query=make_audio(1.0, seed=5) * 3, sampling_rate=16000)
    with torch.no_grad():
        assert not torch.allclose(model(**a).logits[0, -1], model(**b).logits[0, -1])


def test_cached_hidden_states_equal_audio_path(tiny, make_audio):
    model, processor = tiny
    inputs = _batch(processor, make_audio, ks=[1, 2])
    with torch.no_grad():
        hidden, mask = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
        direct = model(**inputs).logits
        cached = dict(inputs)
        cached.pop("input_features"), cached.pop("feature_attention_mask")
        via_cache = model(**cached, audio_hidden_states=hidden, audio_hidden_mask=mask).logits
    torch.testing.assert_close(direct, via_cache, atol=1e-6, rtol=1e-6)


def test_placeholder_count_mismatch_raises(tiny, make_audio):
    model, processor = tiny
    inputs = processor(query=make_audio(1.0), enrollment=[(make_audio(0.5), "calm")], sampling_rate=16000)
    with pytest.raises(ValueError, match="audio placeholder tokens but 1 audio"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              input_features=inputs["input_features"][:1], feature_attention_mask=inputs["feature_attention_mask"][:1])
    with pytest.raises(ValueError, match="but 0 audio"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="either input_features or audio_hidden_states"):
        model(**inputs, audio_hidden_states=torch.zeros(2, 5, 32))


def test_generate_returns_new_tokens(tiny, make_audio):
    model, processor = tiny
    inputs = _batch(processor, make_audio, ks=[1, 0])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    # Greedy generation's first token is the argmax of a plain forward's last logits.
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    assert out[:, inputs["input_ids"].shape[1]].tolist() == first.tolist()


def test_encoder_fingerprint_is_stable_and_tracks_weights():
    from modeling_icl_ser.testing import tiny_icl_ser

    a, _ = tiny_icl_ser(seed=0)
    b, _ = tiny_icl_ser(seed=0)
    c, _ = tiny_icl_ser(seed=1)
    assert a.audio_encoder_fingerprint() == b.audio_encoder_fingerprint()
    assert a.audio_encoder_fingerprint() != c.audio_encoder_fingerprint()
    with torch.no_grad():
        b.projector.linear_1.weight.add_(1.0)  # projector is not part of the encoder
    assert a.audio_encoder_fingerprint() == b.audio_encoder_fingerprint()


def test_default_config_builds_whisper_and_llama():
    config = IclSerConfig()
    assert config.audio_config.model_type == "whisper" and config.text_config.model_type == "llama"
    assert config.num_audio_tokens == 8 and config.audio_pooling == "mean_std"
    assert config.labels == LABELS
    with pytest.raises(ValueError, match="audio_pooling"):
        IclSerConfig(audio_pooling="max")
    assert isinstance(IclSerForConditionalGeneration, type)


def test_audio_feature_layer_reads_that_block_and_keys_the_cache(make_audio):
    import copy

    from modeling_icl_ser.testing import tiny_icl_ser

    last, processor = tiny_icl_ser(seed=0)
    first, _ = tiny_icl_ser(seed=0, audio_feature_layer=1)
    top, _ = tiny_icl_ser(seed=0, audio_feature_layer=len(last.audio_tower.layers))
    # Reference for block 1: the full-depth pass of an encoder cut to its first block, no final norm.
    cut = copy.deepcopy(last)
    cut.audio_tower.layers = cut.audio_tower.layers[:1]
    cut.audio_tower.layer_norm = torch.nn.Identity()
    inputs = processor.audio_inputs([make_audio(1.0, seed=3), make_audio(0.6, seed=4)])
    features, mask = torch.tensor(inputs["input_features"]), torch.tensor(inputs["feature_attention_mask"])
    with torch.no_grad():
        h_first, m_first = first.get_audio_features(features, mask)
        h_cut, m_cut = cut.get_audio_features(features, mask)
        h_last, _ = last.get_audio_features(features, mask)
        h_top, _ = top.get_audio_features(features, mask)
    assert torch.equal(m_first, m_cut)
    torch.testing.assert_close(h_first[m_first], h_cut[m_cut])
    torch.testing.assert_close(h_top, h_last)  # the last block = the default, final layer norm included
    assert not torch.allclose(h_first[m_first], h_last[m_first])
    assert first.audio_encoder_fingerprint() != last.audio_encoder_fingerprint()
    assert top.audio_encoder_fingerprint() != first.audio_encoder_fingerprint()
    with pytest.raises(ValueError, match="audio_feature_layer"):
        tiny_icl_ser(seed=0, audio_feature_layer=9)


def test_audio_feature_layer_for_wav2vec2_family(make_audio):
    from modeling_icl_ser.testing import tiny_icl_ser

    model, processor = tiny_icl_ser(seed=0, audio_model_type="wavlm", audio_feature_layer=1)
    inputs = processor.audio_inputs([make_audio(1.0, seed=4)])
    values = torch.tensor(inputs["input_features"])
    with torch.no_grad():
        hidden, mask = model.get_audio_features(values, torch.tensor(inputs["feature_attention_mask"]))
        reference = model.audio_tower(values, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(hidden[mask].reshape(reference.shape), reference)


def test_audio_token_dropout_only_while_training(tiny, make_audio):
    from modeling_icl_ser.testing import tiny_icl_ser

    model, processor = tiny_icl_ser(seed=0, audio_token_dropout=0.5)
    hidden = torch.randn(2, 20, model.config.audio_config.d_model)
    mask = torch.ones(2, 20, dtype=torch.bool)
    model.eval()
    assert torch.equal(model.projector(hidden, mask), model.projector(hidden, mask))
    model.train()
    assert not torch.equal(model.projector(hidden, mask), model.projector(hidden, mask))
    with pytest.raises(ValueError, match="audio_token_dropout"):
        tiny_icl_ser(seed=0, audio_token_dropout=1.0)
