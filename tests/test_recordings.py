"""Long recordings as users have them: VAD utterances, streaming, the recording's own statistics,
the target-speaker check, exports, and bad input."""

import json
import logging
import os
import textwrap

import numpy as np
import pytest
from transformers import pipeline

from modeling_icl_ser import save_with_pipeline, segments_to_csv, segments_to_json, summarize_recording
from modeling_icl_ser.recording_outputs_icl_ser import plot_emotion_timeline
from modeling_icl_ser.segmentation_icl_ser import FRAME, SileroVad, UtteranceSegmenter
from modeling_icl_ser.speaker_check_icl_ser import SpeakerEncoder, TargetSpeakerTracker
from modeling_icl_ser.testing import synthetic_speech, tiny_icl_ser

SR = 16000
PER_S = SR / FRAME
needs_vad = pytest.mark.skipif(SileroVad.from_package() is None, reason="silero-vad is not installed")
needs_speaker_encoder = pytest.mark.skipif(SpeakerEncoder.from_package() is None, reason="resemblyzer weights absent")
RAVDESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "ravdess")


def _silence(seconds):
    return np.zeros(int(seconds * SR), np.float32)


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny_icl_ser(seed=5, context_readout_heads=2, speaker_normalization=True, si_route=True,
                                    route_weights={"lm": 0.5, "si": 0.5})
    return pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def call():
    """Three utterances: 0.5-2.5 s, 3.5-5.0 s, 6.5-9.5 s (10 s in all)."""
    parts = [_silence(0.5), synthetic_speech(2.0, 1), _silence(1.0), synthetic_speech(1.5, 2, pitch=180), _silence(1.5),
             synthetic_speech(3.0, 3, pitch=140), _silence(0.5)]
    return np.concatenate(parts)


TRUTH = [(0.5, 2.5), (3.5, 5.0), (6.5, 9.5)]


# ------------------------------------------------------------------------ the segmenter
def _frames(spans, total_s):
    scores = np.full(int(total_s * PER_S), 0.02)
    for a, b in spans:
        scores[int(a * PER_S):int(b * PER_S)] = 0.9
    return scores


def _run(segmenter, scores, window=None):
    out = []
    step = window or len(scores)
    for i in range(0, len(scores), step):
        out += list(segmenter.feed(scores[i:i + step]))
    return out + list(segmenter.finish())


def test_segmenter_finds_utterances_merges_short_pauses_and_drops_blips():
    scores = _frames([(1.0, 2.0), (2.1, 3.0), (5.0, 5.1), (6.0, 8.0)], 10)  # 0.1 s pause, a 0.1 s blip
    spans = _run(UtteranceSegmenter(min_silence_s=0.3, min_speech_s=0.25, pad_s=0.0), scores)
    assert [(round(a / PER_S, 1), round(b / PER_S, 1)) for a, b in spans] == [(1.0, 3.0), (6.0, 8.0)]


def test_segmenter_output_does_not_depend_on_the_window_size():
    scores = _frames([(0.3, 1.9), (2.5, 4.0), (4.4, 9.0), (9.5, 12.2)], 13)
    whole = _run(UtteranceSegmenter(max_segment_s=3.0), scores)
    assert all(_run(UtteranceSegmenter(max_segment_s=3.0), scores, window) == whole for window in (1, 7, 100))


def test_long_turns_are_split_at_their_quietest_point():
    scores = _frames([(1.0, 9.0)], 10)
    scores[int(6.0 * PER_S)] = 0.4  # a dip, above the pause threshold: the turn goes on
    spans = _run(UtteranceSegmenter(max_segment_s=6.0, pad_s=0.0), scores)
    assert len(spans) == 2 and spans[0] == (int(1.0 * PER_S), int(6.0 * PER_S)) and spans[1][0] == spans[0][1]
    assert all(b - a <= 6.0 * PER_S for a, b in spans)


# ------------------------------------------------------------------------ the VAD
@needs_vad
def test_silero_vad_scores_carry_state_across_windows():
    vad = SileroVad.from_package()
    audio = np.concatenate([_silence(0.4), synthetic_speech(1.2, 7)])[: 50 * FRAME]
    whole, _ = vad.frame_scores(audio, vad.initial_state())
    first, state = vad.frame_scores(audio[: 20 * FRAME], vad.initial_state())
    rest, _ = vad.frame_scores(audio[20 * FRAME:], state)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=1e-5)
    assert whole[:10].max() < 0.2 and np.median(whole[20:]) > 0.5


@needs_vad
def test_vad_segments_are_the_utterances(pipe, call):
    out = pipe(call, sampling_rate=SR, segmentation="vad", unlabelled=None)
    assert len(out) == 3
    for seg, (start, end) in zip(out, TRUTH):
        assert abs(seg["timestamp"][0] - start) < 0.25 and abs(seg["timestamp"][1] - end) < 0.25
        assert seg["speaker"] is None and set(seg) >= {"timestamp", "label", "score", "scores"}
    # Each utterance's result is that of the segment labelled alone (the same profile-free context).
    alone = pipe(call[int(out[1]["timestamp"][0] * SR):int(out[1]["timestamp"][1] * SR)], sampling_rate=SR)
    assert out[1]["scores"][alone[0]["label"]] == pytest.approx(alone[0]["score"], abs=1e-5)


def test_silence_only_gives_no_segments_but_a_clear_error(pipe):
    with pytest.raises(ValueError, match="No speech found"):
        pipe(np.full(5 * SR, 1e-4, np.float32), sampling_rate=SR, segmentation="vad")


def test_without_the_vad_package_the_energy_gate_takes_over_and_says_so(pipe, call, monkeypatch, caplog):
    monkeypatch.delattr(pipe, "_vad", raising=False)
    monkeypatch.setattr(SileroVad, "from_package", classmethod(lambda cls: None))
    with caplog.at_level(logging.WARNING):
        out = pipe(call, sampling_rate=SR, segmentation="vad", unlabelled=None)
    monkeypatch.delattr(pipe, "_vad", raising=False)
    assert "falls back to the energy gate" in caplog.text
    assert len(out) == 3 and all(abs(s["timestamp"][0] - t[0]) < 0.25 for s, t in zip(out, TRUTH))


# ------------------------------------------------------------------------ streaming
@needs_vad
def test_a_file_is_read_window_by_window_and_results_come_before_its_end(pipe, tmp_path, monkeypatch):
    import soundfile

    from modeling_icl_ser import audio_utils

    piece = np.concatenate([synthetic_speech(1.5, 11), _silence(1.0)])
    path = tmp_path / "long.flac"
    soundfile.write(path, np.tile(piece, 40), SR)  # 100 s
    reads = []
    original = audio_utils.Recording.read
    monkeypatch.setattr(audio_utils.Recording, "read", lambda self, a, b: reads.append((a, b)) or original(self, a, b))
    stream = pipe.stream(str(path), batch_size=2, unlabelled=None)
    assert reads == []
    first = next(stream)
    assert first["timestamp"][0] < 1.0
    assert max(b - a for a, b in reads) <= 30 * SR and max(b for _, b in reads) <= 30 * SR  # only the first window
    assert len(list(stream)) == 39


@needs_vad
def test_the_recording_normalizes_itself_with_its_own_speech(pipe, call):
    profile = pipe.enroll([(synthetic_speech(0.8, 30), "happiness"), (synthetic_speech(0.8, 31), "sadness")],
                          sampling_rate=SR)
    plain = pipe(call, profile=profile, sampling_rate=SR, segmentation="vad", unlabelled=None)
    own = pipe(call, profile=profile, sampling_rate=SR, unlabelled="recording", min_unlabelled=3)
    assert [s["timestamp"] for s in own] == [s["timestamp"] for s in plain]
    assert own[0]["scores"] != pytest.approx(plain[0]["scores"], abs=1e-4)
    # With every utterance in one batch, that is the profile plus the utterances as unlabelled clips.
    clips = [call[int(round(s["timestamp"][0] * SR)):int(round(s["timestamp"][1] * SR))] for s in own]
    enriched = pipe.enroll([(synthetic_speech(0.8, 30), "happiness"), (synthetic_speech(0.8, 31), "sadness")],
                           sampling_rate=SR, unlabelled=clips)
    by_hand = pipe(clips[2], profile=enriched, sampling_rate=SR)
    assert own[2]["scores"][by_hand[0]["label"]] == pytest.approx(by_hand[0]["score"], abs=1e-4)
    # Fewer utterances than min_unlabelled: labelled without the recording's statistics.
    short = pipe(call, profile=profile, sampling_rate=SR, min_unlabelled=8)
    assert short[0]["scores"] == pytest.approx(plain[0]["scores"], abs=1e-6)


# ------------------------------------------------------------------------ target speaker
def test_target_speaker_needs_a_profile_and_the_encoder(pipe, call, monkeypatch):
    with pytest.raises(ValueError, match="needs a profile"):
        pipe(call, sampling_rate=SR, target_speaker=True)
    profile = pipe.enroll([(synthetic_speech(0.8, 30), "happiness")], sampling_rate=SR)
    monkeypatch.setattr(SpeakerEncoder, "from_package", classmethod(lambda cls: None))
    with pytest.raises(ValueError, match="resemblyzer"):
        pipe.stream(call, profile=profile, sampling_rate=SR, target_speaker=True)


def test_the_tracker_splits_a_call_into_the_enrolled_voice_and_the_other():
    rng = np.random.default_rng(0)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    a, b = unit(rng.standard_normal(256)), unit(rng.standard_normal(256))
    voice = lambda centre: unit(centre + 0.06 * rng.standard_normal(256))  # noqa: E731
    reference = voice(a)
    truth = [True, False] * 10
    call = np.stack([voice(a) if t else voice(b) for t in truth])
    decisions = TargetSpeakerTracker(reference, threshold=0.5).assign(call)  # a threshold that alone errs
    assert (call @ reference >= 0.5).sum() < 10
    assert [t for t, _ in decisions] == truth
    assert all(abs(s - float(v @ reference)) < 1e-6 for (_, s), v in zip(decisions, call))


@needs_speaker_encoder
def test_other_speakers_segments_carry_no_emotion(pipe, call, monkeypatch):
    profile = pipe.enroll([(synthetic_speech(0.8, 30), "happiness")], sampling_rate=SR)
    everyone = pipe(call, profile=profile, sampling_rate=SR, target_speaker=True, speaker_threshold=-1.0)
    assert {s["speaker"] for s in everyone} == {"target"} and all(s["label"] for s in everyone)
    opposite = -profile.speaker_embedding  # every segment's voice as far from the enrolled one as can be
    monkeypatch.setattr(SpeakerEncoder, "embed", lambda self, clips: np.tile(opposite, (len(clips), 1)))
    nobody = pipe(call, profile=profile, sampling_rate=SR, target_speaker=True)
    assert {s["speaker"] for s in nobody} == {"other"}
    assert all(s["label"] is None and s["scores"] == {} and s["speaker_score"] == pytest.approx(-1) for s in nobody)


@needs_speaker_encoder
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(RAVDESS), reason="RAVDESS not found")
def test_the_speaker_check_tells_two_ravdess_actors_apart():
    from dataset_builder import read_corpus
    from modeling_icl_ser import load_audio
    from modeling_icl_ser.speaker_check_icl_ser import DEFAULT_THRESHOLD, speaker_embedding

    corpus = read_corpus("ravdess", RAVDESS)
    paths = {a: [r["path"] for r in corpus if r["speaker"] == a][:14] for a in ("Actor_02", "Actor_04")}
    encoder = SpeakerEncoder.from_package()
    reference = speaker_embedding(encoder, [load_audio(p) for p in paths["Actor_02"][:4]])
    same = encoder.embed([load_audio(p) for p in paths["Actor_02"][4:]]) @ reference
    other = encoder.embed([load_audio(p) for p in paths["Actor_04"][4:]]) @ reference
    right = (same >= DEFAULT_THRESHOLD).sum() + (other < DEFAULT_THRESHOLD).sum()
    assert right / (len(same) + len(other)) >= 0.75


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"max_segment_s": 0.2, "min_speech_s": 0.25}, "max_segment_s .* must be longer than min_speech_s"),
    ({"max_segment_s": 40.0}, "longer than the encoder takes"),
    ({"segmentation": "words"}, "segmentation must be"),
    ({"segmentation": "vad", "chunk_length_s": 4.0}, "set fixed windows"),
    ({"vad_threshold": 1.5}, "vad_threshold"),
    ({"unlabelled": "calls"}, "unlabelled must be 'recording'"),
    ({"min_unlabelled": 0}, "min_unlabelled"),
])
def test_bad_settings_are_refused_at_the_call(pipe, call, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.stream(call, sampling_rate=SR, **kwargs)


def test_a_profile_from_another_checkpoint_and_a_non_audio_file_are_refused_before_work(pipe, call, tmp_path):
    other_model, other_processor = tiny_icl_ser(seed=6)
    other = pipeline("icl-speech-emotion", model=other_model, processor=other_processor, device="cpu")
    foreign = other.enroll([(synthetic_speech(0.8, 30), "happiness")], sampling_rate=SR)
    with pytest.raises(ValueError, match="different checkpoint"):
        pipe.stream(call, profile=foreign, sampling_rate=SR)
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    with pytest.raises(ValueError, match="Could not decode"):
        pipe.stream(str(text))


# ------------------------------------------------------------------------ outputs
SEGMENTS = [
    {"timestamp": (0.5, 2.5), "speaker": "target", "label": "happiness", "score": 0.7,
     "scores": {"happiness": 0.7, "sadness": 0.3}},
    {"timestamp": (3.0, 4.0), "speaker": "other", "label": None, "score": None, "scores": {}},
    {"timestamp": (4.5, 5.5), "speaker": "target", "label": "sadness", "score": 0.6,
     "scores": {"happiness": 0.4, "sadness": 0.6}},
]


def test_csv_json_and_summary(tmp_path):
    text = segments_to_csv(SEGMENTS, tmp_path / "out" / "segments.csv")
    assert text.splitlines() == ["start,end,speaker,label,score", "0.5,2.5,target,happiness,0.7", "3.0,4.0,other,,",
                                 "4.5,5.5,target,sadness,0.6"]
    assert (tmp_path / "out" / "segments.csv").read_text() == text
    rows = json.loads(segments_to_json(SEGMENTS))
    assert rows[1] == {"start": 3.0, "end": 4.0, "speaker": "other", "label": None, "score": None, "scores": {}}
    summary = summarize_recording(SEGMENTS)
    assert summary["speech_s"] == 3.0 and summary["segments"] == 2
    assert summary["shares"] == pytest.approx({"happiness": 2 / 3, "sadness": 1 / 3})
    with pytest.raises(ValueError, match="No segments"):
        segments_to_csv([])


def test_timeline_plot_has_a_lane_per_speaker():
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_emotion_timeline(SEGMENTS)
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # one curve per label
    lanes = [c for c in ax.collections if type(c).__name__ == "PolyCollection" or "Bar" in type(c).__name__]
    assert len(lanes) == 2 and {t.get_text().strip() for t in ax.texts} == {"target", "other"}
    ys = ax.lines[0].get_ydata()
    assert np.isnan(ys).sum() == 1  # the other speaker's stretch breaks the curve


# ------------------------------------------------------------------------ remote code without the extras
def test_a_checkpoint_runs_without_the_optional_packages(tmp_path, run_clean_process):
    model, processor = tiny_icl_ser(seed=5)
    folder = tmp_path / "export"
    save_with_pipeline(model, processor, folder)
    np.save(tmp_path / "call.npy", np.concatenate([_silence(0.5), synthetic_speech(1.5, 1), _silence(1.0),
                                                   synthetic_speech(1.5, 2), _silence(0.5)]))
    script = textwrap.dedent(f"""
        import importlib.abc, logging, sys
        import numpy as np

        class Hide(importlib.abc.MetaPathFinder):  # as if silero-vad and resemblyzer were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("silero_vad", "resemblyzer"):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Hide())
        logging.basicConfig(level=logging.WARNING)
        from transformers import pipeline
        pipe = pipeline("icl-speech-emotion", model={str(folder)!r}, trust_remote_code=True, device="cpu")
        call = np.load({str(tmp_path / "call.npy")!r})
        out = pipe(call, sampling_rate=16000, segmentation="vad", unlabelled=None)
        print("SEGMENTS", len(out))
        profile = pipe.enroll([(call[8000:32000], "happiness")], sampling_rate=16000)
        try:
            pipe(call, profile=profile, sampling_rate=16000, target_speaker=True)
        except ValueError as error:
            print("REFUSED", error)
    """)
    result = run_clean_process(script)
    assert result.returncode == 0, result.stderr
    assert "SEGMENTS 2" in result.stdout and "falls back to the energy gate" in result.stderr
    assert "REFUSED" in result.stdout and "resemblyzer" in result.stdout
