"""Long recordings (chunked, gated, batched, streamed), utterance embeddings and the timeline plot."""

import json
import textwrap

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_icl_ser import plot_emotion_timeline, save_with_pipeline
from modeling_icl_ser.audio_utils import chunk_spans, speech_ratio
from modeling_icl_ser.testing import tiny_icl_ser

SR = 16000


def _tone(seconds, freq, seed=0, amplitude=0.3):
    n = int(round(seconds * SR))
    rng = np.random.default_rng(seed)
    wave = np.sin(2 * np.pi * freq * np.arange(n) / SR) * (1 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(n) / SR))
    return (amplitude * (wave + 0.07 * rng.standard_normal(n))).astype(np.float32)


@pytest.fixture(scope="module")
def readout_tiny():
    return tiny_icl_ser(seed=3, context_readout_heads=2)


@pytest.fixture(scope="module")
def pipe(readout_tiny):
    model, processor = readout_tiny
    return pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def enrollment():
    return [(_tone(0.8, 140 + 60 * j, seed=j), label) for j, label in enumerate(["happiness", "sadness", "anger"])]


@pytest.fixture(scope="module")
def recording():
    """5 s of 'speech', 6 s of silence, 4.5 s of 'speech' (15.5 s)."""
    return np.concatenate([_tone(5, 210, 1), np.zeros(6 * SR, np.float32), _tone(4.5, 330, 2)])


# ------------------------------------------------------------------------ segment plan
@pytest.mark.parametrize("n, chunk, step", [(100, 40, 30), (100, 40, 40), (41, 40, 10), (40, 40, 30), (7, 40, 30),
                                            (1000, 64, 1), (999, 100, 75)])
def test_chunk_spans_cover_the_recording_with_full_length_segments(n, chunk, step):
    spans = chunk_spans(n, chunk, step)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(end - start == min(chunk, n) for start, end in spans)
    starts = [start for start, _ in spans]
    assert starts == sorted(set(starts))  # increasing, no duplicate segment
    assert all(b - a == step for a, b in zip(starts[:-2], starts[1:-1]))  # regular steps but the moved-back last
    covered = np.zeros(n, bool)
    for start, end in spans:
        covered[start:end] = True
    assert covered.all()


def test_speech_ratio_measures_loud_frames():
    half = np.concatenate([_tone(1, 200), np.zeros(SR, np.float32)])
    assert speech_ratio(half, SR, -40) == pytest.approx(0.5, abs=0.03)
    assert speech_ratio(np.zeros(SR, np.float32), SR, -40) == 0.0
    assert speech_ratio(_tone(1, 200, amplitude=0.001), SR, -40) == 0.0  # -60 dBFS: below the gate
    assert speech_ratio(_tone(1, 200, amplitude=0.001), SR, -70) == 1.0


# ------------------------------------------------------------------------ long recordings
def test_segments_match_single_queries_and_skip_silence(pipe, enrollment, recording):
    profile = pipe.enroll(enrollment, sampling_rate=SR)
    out = pipe(recording, profile=profile, sampling_rate=SR, chunk_length_s=2.0, stride_length_s=0.5, batch_size=3)
    plan = [(s / SR, e / SR) for s, e in chunk_spans(len(recording), 2 * SR, int(1.5 * SR))]
    kept = [tuple(seg["timestamp"]) for seg in out]
    assert set(kept) < set(plan) and kept == sorted(kept)
    # Segments wholly inside the silence (5 s .. 11 s) are gated out; every other one is kept.
    silent = [(a, b) for a, b in plan if a >= 5.0 and b <= 11.0]
    assert silent and not set(silent) & set(kept)
    assert set(plan) - set(silent) == set(kept)
    for seg in out:
        a, b = seg["timestamp"]
        single = pipe(recording[int(a * SR):int(b * SR)], profile=profile, sampling_rate=SR)
        assert seg["label"] == single[0]["label"] and abs(seg["score"] - single[0]["score"]) < 1e-5
        assert max(abs(seg["scores"][d["label"]] - d["score"]) for d in single) < 1e-5
        assert list(seg["scores"]) == profile.labels and abs(sum(seg["scores"].values()) - 1) < 1e-5


def test_inline_enrollment_batching_gate_off_and_files_agree(pipe, enrollment, recording, tmp_path):
    import soundfile

    kwargs = dict(chunk_length_s=3.0, stride_length_s=1.0)
    profile = pipe.enroll(enrollment, sampling_rate=SR)
    reference = pipe(recording, profile=profile, sampling_rate=SR, batch_size=1, **kwargs)
    inline = pipe(recording, enrollment=enrollment, sampling_rate=SR, batch_size=5, **kwargs)
    path = tmp_path / "call.wav"
    soundfile.write(path, recording, SR, subtype="FLOAT")
    from_file = list(pipe.stream(str(path), profile=profile, batch_size=4, **kwargs))
    for other in (inline, from_file):
        assert [s["timestamp"] for s in other] == [s["timestamp"] for s in reference]
        assert max(abs(s["scores"][k] - r["scores"][k]) for s, r in zip(other, reference) for k in r["scores"]) < 1e-5
    everything = pipe(recording, profile=profile, sampling_rate=SR, vad_threshold_db=None, **kwargs)
    assert len(everything) == len(chunk_spans(len(recording), 3 * SR, 2 * SR)) > len(reference)
    top = pipe(recording, profile=profile, sampling_rate=SR, top_k=2, **kwargs)
    assert all(len(s["scores"]) == 2 and s["label"] in s["scores"] for s in top)


def test_stream_reads_a_file_lazily(pipe, recording, tmp_path, monkeypatch):
    import soundfile

    from modeling_icl_ser import audio_utils

    path = tmp_path / "long.flac"
    soundfile.write(path, np.tile(recording[:5 * SR], 12), SR)  # 60 s, voiced throughout
    reads = []
    original = audio_utils.Recording.read
    monkeypatch.setattr(audio_utils.Recording, "read", lambda self, a, b: reads.append(b - a) or original(self, a, b))
    stream = pipe.stream(str(path), chunk_length_s=2.0, stride_length_s=0.0, batch_size=2, unlabelled=None)
    assert reads == []  # nothing read before the first next()
    first = next(stream)
    assert first["timestamp"] == (0.0, 2.0)
    assert len(reads) == 2 and max(reads) == 2 * SR  # one batch of segments, never the whole file
    assert len(list(stream)) == 29


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_length_s=0.0), "chunk_length_s must be > 0"),
        (dict(chunk_length_s=-1.0), "chunk_length_s must be > 0"),
        (dict(chunk_length_s=2.0, stride_length_s=2.0), "must be smaller than chunk_length_s"),
        (dict(chunk_length_s=2.0, stride_length_s=3.0), "must be smaller than chunk_length_s"),
        (dict(chunk_length_s=2.0, stride_length_s=-0.5), "must be >= 0"),
        (dict(chunk_length_s=40.0), "longer than the encoder takes"),
        (dict(chunk_length_s="4"), "number of seconds"),
        (dict(chunk_length_s=2.0, vad_threshold_db=6.0), "vad_threshold_db"),
        (dict(chunk_length_s=2.0, vad_min_speech=1.5), "vad_min_speech"),
        (dict(chunk_length_s=2.0, batch_size=0), "batch_size"),
    ],
)
def test_bad_segmenting_raises_before_reading(pipe, recording, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(recording, sampling_rate=SR, **kwargs)


def test_bad_recordings_raise_value_errors(pipe, readout_tiny, enrollment, recording, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        pipe(np.zeros(0, np.float32), sampling_rate=SR, chunk_length_s=2.0)
    with pytest.raises(ValueError, match="No speech found"):
        pipe(np.zeros(10 * SR, np.float32), sampling_rate=SR, chunk_length_s=2.0)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 100)
    with pytest.raises(ValueError, match="Could not decode"):
        pipe(str(text), chunk_length_s=2.0)
    with pytest.raises(ValueError, match="not found"):
        pipe(str(tmp_path / "missing.wav"), chunk_length_s=2.0)
    with pytest.raises(ValueError, match="chunk_length_s=4.0"):  # a long recording without chunking: the hint
        pipe(np.tile(recording, 3), sampling_rate=SR)
    with pytest.raises(ValueError, match="silent"):
        pipe(np.zeros(SR, np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="enrollment audio 1.*silent"):
        pipe(recording[:SR], enrollment=[enrollment[0], (np.zeros(SR, np.float32), "calm")], sampling_rate=SR)
    model, processor = tiny_icl_ser(seed=4, context_readout_heads=2)
    other = pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")
    with pytest.raises(ValueError, match="different checkpoint"):
        pipe(recording, profile=other.enroll(enrollment, sampling_rate=SR), sampling_rate=SR, chunk_length_s=2.0)


# ------------------------------------------------------------------------ embeddings
def test_embeddings_are_the_read_outs_pooled_vectors(pipe, readout_tiny, enrollment):
    model, _ = readout_tiny
    clips = [audio for audio, _ in enrollment]
    vectors = pipe.embed(clips, sampling_rate=SR, batch_size=2)
    width = 2 * model.config.audio_config.hidden_size
    assert vectors.shape == (3, width) and vectors.dtype == np.float32
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3  # different clips, different vectors
    one = pipe.embed(clips[2], sampling_rate=SR)
    assert one.shape == (width,) and np.abs(one - vectors[2]).max() < 1e-5  # batch companions do not matter
    # The read-out's enrollment memory starts with exactly these vectors.
    profile = pipe.enroll(enrollment, sampling_rate=SR)
    assert torch.allclose(profile.enrollment_context[:, :width], torch.from_numpy(vectors), atol=1e-5)
    with pytest.raises(ValueError, match="clip 1.*silent"):
        pipe.embed([clips[0], np.zeros(SR, np.float32)], sampling_rate=SR)
    with pytest.raises(ValueError, match="empty"):
        pipe.embed([])


# ------------------------------------------------------------------------ plot
def test_timeline_plot_draws_each_label_and_breaks_at_gaps(pipe, enrollment, recording):
    import matplotlib

    matplotlib.use("Agg")
    out = pipe(recording, enrollment=enrollment, sampling_rate=SR, chunk_length_s=2.0, stride_length_s=0.5)
    fig = plot_emotion_timeline(out, labels=["happiness", "sadness"])
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["happiness", "sadness"]
    ys = lines[0].get_ydata()
    assert np.isnan(ys).sum() == 1 and len(ys) == len(out) + 1  # one break, at the silence
    finite = ys[~np.isnan(ys)]
    assert np.allclose(finite, [seg["scores"]["happiness"] for seg in out])
    with pytest.raises(ValueError, match="No segments"):
        plot_emotion_timeline([])


# ------------------------------------------------------------------------ exported checkpoint
_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_icl_ser"] = None  # the package must not be importable
    import numpy as np
    from transformers import pipeline
    ckpt, audio_path, out_path = sys.argv[1:4]
    pipe = pipeline("icl-speech-emotion", model=ckpt, trust_remote_code=True, device="cpu")
    data = np.load(audio_path)
    recording, enrollment = data[0], [(data[1][:16000], "happiness"), (data[2][:16000], "sadness")]
    segments = pipe(recording, enrollment=enrollment, sampling_rate=16000, chunk_length_s=2.0, stride_length_s=0.5)
    json.dump({"module": type(pipe).__module__, "segments": segments,
               "embed": pipe.embed([data[1]], sampling_rate=16000).tolist()}, open(out_path, "w"))
    """
)


def test_exported_checkpoint_labels_long_audio_in_clean_process(readout_tiny, pipe, tmp_path, run_clean_process):
    model, processor = readout_tiny
    ckpt = tmp_path / "ckpt"
    save_with_pipeline(model, processor, ckpt)
    data = np.stack([np.concatenate([_tone(4, 200, 5), np.zeros(4 * SR, np.float32), _tone(4, 260, 6)]),
                     np.resize(_tone(1, 150, 7), 12 * SR), np.resize(_tone(1, 300, 8), 12 * SR)])
    np.save(tmp_path / "audio.npy", data)
    result = run_clean_process(_CHILD, ckpt, tmp_path / "audio.npy", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert not out["module"].startswith("modeling_icl_ser")
    enrollment = [(data[1][:SR], "happiness"), (data[2][:SR], "sadness")]
    here = pipe(data[0], enrollment=enrollment, sampling_rate=SR, chunk_length_s=2.0, stride_length_s=0.5)
    assert [tuple(s["timestamp"]) for s in out["segments"]] == [s["timestamp"] for s in here]
    assert max(abs(s["scores"][k] - h["scores"][k]) for s, h in zip(out["segments"], here) for k in h["scores"]) < 1e-5
    assert np.abs(np.asarray(out["embed"]) - pipe.embed([data[1]], sampling_rate=SR)).max() < 1e-5
