"""Unlabelled speech of the speaker: the model's speaker statistics, profiles that carry it, the pipeline."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_icl_ser import SpeakerProfile
from modeling_icl_ser.modeling_icl_ser import speaker_standardize
from modeling_icl_ser.testing import synthetic_speech, tiny_icl_ser

SR = 16000


@pytest.fixture(scope="module")
def routed():
    model, processor = tiny_icl_ser(seed=4, context_readout_heads=2, speaker_normalization=True, si_route=True)
    return model, processor, pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")


def _clips(n, seed=0):
    return [synthetic_speech(0.6 + 0.1 * i, seed=seed + i, pitch=110 + 15 * i) for i in range(n)]


def test_unlabelled_summaries_standardize_the_k0_routes(routed):
    model, processor, pipe = routed
    query = synthetic_speech(0.9, seed=40)
    batch = {k: v for k, v in processor(query=[query], labels=processor.labels, sampling_rate=SR).items()}
    unlabelled = torch.from_numpy(pipe.embed(_clips(4), sampling_rate=SR))
    plain = model.classify(**batch, return_routes=True)
    with_u = model.classify(**batch, return_routes=True, unlabelled_summaries=[unlabelled])
    assert not torch.allclose(plain["si"], with_u["si"], atol=1e-4)  # K = 0 is personalized now
    assert torch.allclose(plain["lm"], with_u["lm"])  # the LM route reads raw features
    # The SI route's normalized head on the query standardized by the unlabelled statistics, by hand.
    summary = torch.from_numpy(pipe.embed(query, sampling_rate=SR))[None]
    manual = speaker_standardize(summary, unlabelled, float(model.config.speaker_variance_floor))
    cands = torch.as_tensor(batch["candidate_input_ids"])[None]
    cand_embeds = model._candidate_embeddings(cands, torch.as_tensor(batch["candidate_attention_mask"])[None].float())[0]
    expected = model.speaker_routes.logits(manual, True, cand_embeds).softmax(-1)
    assert torch.allclose(with_u["si"], expected, atol=1e-5)
    with pytest.raises(ValueError, match="unlabelled_summaries has 2 entries"):
        model.classify(**batch, unlabelled_summaries=[unlabelled, unlabelled])


def test_k0_profile_with_unlabelled_speech_round_trips_and_matches_the_call(routed, tmp_path):
    model, _, pipe = routed
    clips, query = _clips(3, seed=10), synthetic_speech(1.0, seed=50)
    profile = pipe.enroll(None, sampling_rate=SR, unlabelled=clips)
    assert profile.num_enrollment == 0 and profile.num_unlabelled == 3
    model.config.route_weights = {"lm": 0.5, "si": 0.5}
    try:
        zero = pipe(query, sampling_rate=SR)
        via_profile = pipe(query, profile=profile, sampling_rate=SR)
        inline = pipe(query, sampling_rate=SR, unlabelled=clips)
        path = tmp_path / "speaker.safetensors"
        profile.save(path)
        loaded = SpeakerProfile.load(path)
        assert torch.equal(loaded.unlabelled, profile.unlabelled)
        again = pipe(query, profile=loaded, sampling_rate=SR)
    finally:
        model.config.route_weights = None
    scores = lambda out: {d["label"]: d["score"] for d in out}  # noqa: E731
    assert scores(via_profile) != pytest.approx(scores(zero), abs=1e-4)
    assert scores(via_profile) == pytest.approx(scores(inline), abs=1e-5)
    assert scores(again) == pytest.approx(scores(via_profile), abs=1e-6)


def test_add_unlabelled_grows_the_statistics_and_the_voice_print(routed):
    _, _, pipe = routed
    profile = pipe.enroll([(synthetic_speech(0.8, seed=1), "happiness")], sampling_rate=SR)
    before = profile.num_unlabelled
    profile.add_unlabelled(_clips(2, seed=20), pipe, sampling_rate=SR)
    assert profile.num_unlabelled == before + 2
    if profile.speaker_embeddings is not None:  # the speaker encoder is installed
        assert len(profile.speaker_embeddings) == 3


@pytest.mark.parametrize("unlabelled, message", [
    ("clip.wav", "list of audio clips"),
    ([(np.zeros(SR, np.float32), "happiness")], "without labels"),
    ([np.zeros(SR, np.float32)], "unlabelled audio 0: the audio is silent"),
    ([np.ones(40 * SR, np.float32) * 0.1], "unlabelled audio 0: .*at most"),
])
def test_bad_unlabelled_input_is_refused_like_enrollment(routed, unlabelled, message):
    _, _, pipe = routed
    with pytest.raises(ValueError, match=message):
        pipe.enroll(None, sampling_rate=SR, unlabelled=unlabelled)


def test_processor_unlabelled_gives_the_routes_of_the_summaries(routed):
    """`processor(..., unlabelled=clips)` carries the clips as audio features; `classify` (and
    `forward`) summarize them itself, with the same routes as `unlabelled_summaries=`."""
    model, processor, pipe = routed
    queries = [synthetic_speech(0.9, seed=41), synthetic_speech(1.1, seed=42)]
    enrollment = [[(synthetic_speech(0.7, seed=60), "anger"), (synthetic_speech(0.8, seed=61), "sadness")], []]
    clips = _clips(3, seed=20)
    batch = processor(query=queries, enrollment=enrollment, unlabelled=[clips, None], sampling_rate=SR)
    assert batch["unlabelled_row_index"].tolist() == [0, 0, 0]
    assert batch["unlabelled_input_features"].shape[0] == 3
    via_features = model.classify(**batch, return_routes=True)
    plain = {k: v for k, v in batch.items() if not k.startswith("unlabelled_")}
    summaries = [torch.from_numpy(pipe.embed(clips, sampling_rate=SR)), None]
    via_summaries = model.classify(**plain, return_routes=True, unlabelled_summaries=summaries)
    without = model.classify(**plain, return_routes=True)
    for name in ("si", "prototype"):
        torch.testing.assert_close(via_features[name], via_summaries[name], atol=1e-5, rtol=0, equal_nan=True)
    assert not torch.allclose(via_features["si"][0], without["si"][0], atol=1e-4)  # row 0 has new statistics
    torch.testing.assert_close(via_features["si"][1], without["si"][1])  # row 1 has none
    loss = model(**processor(query=queries[0], enrollment=enrollment[0], answer="anger", unlabelled=clips,
                             sampling_rate=SR)).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="not both"):
        model.classify(**batch, unlabelled_summaries=summaries)


@pytest.mark.parametrize("unlabelled, message", [
    ("call.wav", "must be a list of audio clips"),
    ([[(np.zeros(SR, dtype=np.float32), "anger")], None], "without labels"),
    ([[np.zeros(SR, dtype=np.float32)]], "one list of clips"),
])
def test_processor_refuses_bad_unlabelled_input(routed, unlabelled, message):
    _, processor, _ = routed
    queries = [synthetic_speech(0.9, seed=43), synthetic_speech(0.9, seed=44)]
    with pytest.raises(ValueError, match=message):
        processor(query=queries, unlabelled=unlabelled, sampling_rate=SR)
