"""Processor: sequence format, padding, candidates, and every bad input as a clear ValueError."""

import numpy as np
import pytest
import soundfile
import torch

from modeling_icl_ser import IclSerDataCollator


def test_prompt_format_and_left_padding(tiny, make_audio):
    _, processor = tiny
    batch = processor(query=[make_audio(1.0), make_audio(0.5)],
                      enrollment=[[(make_audio(0.4), "happiness"), (make_audio(0.6), "sadness")], []],
                      sampling_rate=16000)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    a = processor.audio_token * processor.num_audio_tokens
    assert text == (
        "<s>Classify the speaker's emotion as one of: anger, calm, disgust, fear, happiness, neutral, sadness, "
        f"surprise.\nSpeech: {a} Emotion: happiness\nSpeech: {a} Emotion: sadness\nSpeech: {a} Emotion:"
    )
    mask = batch["attention_mask"]
    assert mask[0].all() and not mask[1].all()
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padded
    assert batch["input_features"].shape[0] == 4  # 2 enrollment + query, then query
    assert batch["feature_attention_mask"].sum(-1).tolist() == [40, 60, 100, 50]
    assert "labels" not in batch


def test_candidates_are_the_answer_tokens(tiny, make_audio):
    _, processor = tiny
    batch = processor(query=make_audio(1.0), labels=["joy", "anger"], sampling_rate=16000)
    ids, mask = batch["candidate_input_ids"], batch["candidate_attention_mask"]
    assert ids.shape[0] == 2
    for row, m, label in zip(ids, mask, ["joy", "anger"]):
        assert processor.tokenizer.decode(row[m.bool()]) == f" {label}\n"
    assert "one of: joy, anger." in processor.tokenizer.decode(batch["input_ids"][0])


def test_answer_builds_labels(tiny, make_audio):
    _, processor = tiny
    batch = processor(query=[make_audio(1.0), make_audio(0.5)], enrollment=[[], [(make_audio(0.3), "fear")]],
                      answer=["anger", "surprise"], sampling_rate=16000)
    for row, ids, label in zip(batch["labels"], batch["input_ids"], ["anger", "surprise"]):
        kept = row[row != -100]
        assert processor.tokenizer.decode(kept) == f" {label}\n"
        assert ids[-len(kept):].tolist() == kept.tolist()


def test_whisper_frame_count_is_even_and_unpadded(tiny, make_audio):
    _, processor = tiny
    batch = processor(query=make_audio(1.005), sampling_rate=16000)
    frames = batch["input_features"].shape[-1]
    assert frames % 2 == 0 and frames < 110


def test_file_and_resampled_inputs(tiny, make_audio, tmp_path):
    _, processor = tiny
    path = tmp_path / "a.wav"
    soundfile.write(path, make_audio(1.0), 16000, subtype="FLOAT")
    from_file = processor(query=str(path))
    from_array = processor(query=make_audio(1.0), sampling_rate=16000)
    torch.testing.assert_close(from_file["input_features"], from_array["input_features"], atol=1e-4, rtol=1e-4)
    resampled = processor(query=make_audio(1.0)[::2].copy(), sampling_rate=8000)
    assert resampled["feature_attention_mask"].sum() == 100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query=np.zeros(0, np.float32), sampling_rate=16000), "empty"),
        (dict(query=np.array([0.1, np.nan] * 800, np.float32), sampling_rate=16000), "NaN"),
        (dict(query=np.zeros(16000, np.float32)), "sampling_rate"),
        (dict(query="/no/such/file.wav"), "not found"),
        (dict(query=np.zeros(16000 * 31, np.float32), sampling_rate=16000), "at most 30 s"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, enrollment=[np.zeros(1600)]),
         "not an \\(audio, label\\) pair"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, enrollment=[(np.zeros(1600), 3)]),
         "not an \\(audio, label\\) pair"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, labels=[]), "empty"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, labels=["calm", "calm"]), "duplicated"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, labels=["calm", "  "]), "tokenizes to nothing"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, enrollment=[(np.zeros(1600), "happy")]),
         "not among the candidate labels"),
        (dict(query=np.zeros(1600, np.float32), sampling_rate=16000, answer="joy"), "not among the candidate labels"),
        (dict(query=[np.zeros(1600, np.float32)] * 2, sampling_rate=16000, enrollment=[[]]),
         "one list of \\(audio, label\\) pairs per query"),
        (dict(query=[np.zeros(1600, np.float32)] * 2, sampling_rate=16000, answer=["calm"]), "one label per query"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(tiny, kwargs, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=match):
        processor(**kwargs)


def test_bad_audio_is_refused_before_feature_extraction(tiny, make_audio, monkeypatch):
    _, processor = tiny
    calls = []
    monkeypatch.setattr(processor, "_features", lambda samples: calls.append(1))
    with pytest.raises(ValueError, match="query audio of sample 1"):
        processor(query=[make_audio(1.0), np.zeros(0, np.float32)], sampling_rate=16000)
    assert calls == []


def test_unreadable_file_raises(tiny, tmp_path):
    _, processor = tiny
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="Could not decode"):
        processor(query=str(bad))


def test_labels_outside_vocabulary_allowed_when_passed(tiny, make_audio):
    model, processor = tiny
    batch = processor(query=make_audio(1.0), enrollment=[(make_audio(0.5), "boredom")],
                      labels=["boredom", "excitement"], sampling_rate=16000)
    probs = model.classify(**batch)
    assert probs.shape == (1, 2)


def test_collator_accepts_pairs_dicts_and_hidden_states(tiny, make_audio):
    model, processor = tiny
    collator = IclSerDataCollator(processor, sampling_rate=16000)
    examples = [
        {"query": make_audio(1.0), "enrollment": [(make_audio(0.5), "calm")], "answer": "fear"},
        {"query": make_audio(0.8), "enrollment": {"audio": [make_audio(0.4)], "label": ["anger"]}, "emotion": "calm"},
    ]
    batch = collator(examples)
    assert batch["labels"].shape == batch["input_ids"].shape
    hidden, mask = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
    lengths = mask.sum(-1).tolist()
    h = [hidden[i, : lengths[i]].detach().numpy() for i in range(4)]
    cached = collator([
        {"query_hidden_states": h[1], "enrollment_hidden_states": [h[0]], "enrollment_labels": ["calm"], "answer": "fear"},
        {"query_hidden_states": h[3], "enrollment_hidden_states": [h[2]], "enrollment_labels": ["anger"], "answer": "calm"},
    ])
    with torch.no_grad():
        direct = model(**batch)
        via_cache = model(**cached)
    torch.testing.assert_close(direct.loss, via_cache.loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="answer"):
        collator([{"query": make_audio(1.0), "enrollment": []}])


def test_label_enrollment_targets_the_enrollment_answers(tiny, make_audio):
    _, processor = tiny
    enrollment = [(make_audio(0.5, seed=1), "calm"), (make_audio(0.5, seed=2), "anger")]
    plain = processor(query=make_audio(0.5), enrollment=enrollment, answer="fear", sampling_rate=16000)
    both = processor(query=make_audio(0.5), enrollment=enrollment, answer="fear", sampling_rate=16000,
                     label_enrollment=True)
    assert plain["input_ids"].tolist() == both["input_ids"].tolist()
    answer_targets = [t for t in plain["labels"][0].tolist() if t != -100]
    all_targets = [t for t in both["labels"][0].tolist() if t != -100]
    expected = processor.answer_ids("calm") + processor.answer_ids("anger") + processor.answer_ids("fear")
    assert answer_targets == processor.answer_ids("fear")
    assert all_targets == expected
