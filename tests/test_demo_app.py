"""The demo page's actions (app.py) without a browser: results and polite refusals.

Needs the [demo] extra (gradio); skips cleanly without it. tests/test_demo_browser.py drives the
same page in headless Chromium.
"""

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

SR = 16000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import soundfile

    from modeling_icl_ser import save_with_pipeline
    from modeling_icl_ser.testing import tiny_icl_ser

    root = tmp_path_factory.mktemp("app")
    for seed, name in ((1, "model"), (2, "other")):
        model, processor = tiny_icl_ser(seed=seed, context_readout_heads=2)
        save_with_pipeline(model, processor, root / name)
    t = np.arange(SR) / SR
    clips = []
    for i, freq in enumerate([170, 240, 330]):
        clips.append(str(root / f"clip{i}.wav"))
        soundfile.write(clips[-1], (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR)
    long = np.concatenate([np.tile(soundfile.read(clips[0])[0], 4), np.zeros(5 * SR), np.tile(soundfile.read(clips[1])[0], 4)])
    soundfile.write(root / "long.wav", long, SR)
    soundfile.write(root / "silent.wav", np.zeros(SR, np.float32), SR)
    (root / "notes.wav").write_text("not audio at all\n" * 50)
    return root, clips


def test_enroll_classify_save_load_and_timeline(setup):
    import app

    root, clips = setup
    folder = str(root / "model")
    assert "Model loaded" in app.load_model(folder)
    state = []
    for clip, label in zip(clips, ["joy", "gloom", "joy"]):
        state, rows, cleared_audio, cleared_label = app.add_clip(folder, clip, label, state)
        assert cleared_audio is None and cleared_label == ""
    assert [row[2] for row in rows] == ["joy", "gloom", "joy"]
    profile, status = app.enroll(folder, state, "")
    assert "Enrolled 3 clips" in status and profile.labels[-2:] == ["joy", "gloom"]  # the model's labels + new words
    profile, _ = app.enroll(folder, state, "joy, gloom, calm")
    assert profile.labels == ["joy", "gloom", "calm"]
    scores = app.classify(folder, profile, clips[1])
    assert set(scores) == {"joy", "gloom", "calm"} and abs(sum(scores.values()) - 1) < 1e-5
    path = app.save_profile(profile)
    loaded, status = app.load_profile(folder, path)
    assert loaded.enrollment_labels == ["joy", "gloom", "joy"] and "Profile loaded" in status
    assert app.classify(folder, loaded, clips[1]) == pytest.approx(scores, abs=1e-5)
    zero_shot = app.classify(folder, None, clips[1])
    assert "joy" not in zero_shot and abs(sum(zero_shot.values()) - 1) < 1e-5
    figure, rows, summary, csv_path = app.timeline(folder, profile, str(root / "long.wav"), "fixed windows", 2.0, 0.5,
                                                   True, -50.0)
    starts = [row[0] for row in rows]
    assert rows and starts == sorted(starts) and all(row[3] in profile.labels for row in rows)
    assert not any(5.0 <= row[0] and row[1] <= 8.0 for row in rows)  # the silence (4 s .. 9 s) is skipped
    assert len(figure.axes[0].get_lines()) == 3
    with open(csv_path) as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "start,end,speaker,label,score" and len(lines) == len(rows) + 1
    assert f"{len(rows)} segments" in summary and "%" in summary
    _, every, _, _ = app.timeline(folder, profile, str(root / "long.wav"), "fixed windows", 2.0, 0.5, False, -50.0)
    assert len(every) > len(rows)
    speech = root / "speech.wav"
    import soundfile

    from modeling_icl_ser.testing import synthetic_speech

    soundfile.write(speech, np.concatenate([np.zeros(SR), synthetic_speech(2.0, 1), np.zeros(SR), synthetic_speech(1.5, 2),
                                            np.zeros(SR)]), SR)
    _, utterances, _, _ = app.timeline(folder, profile, str(speech), "utterances (VAD)", 2.0, 0.5, True, -50.0)
    assert len(utterances) == 2 and abs(utterances[0][0] - 1.0) < 0.25


@pytest.mark.parametrize(
    "action, match",
    [
        (lambda root, clips: app_module().load_model(str(root / "nothing")), "No model at .*python train.py"),
        (lambda root, clips: app_module().load_model(""), "Enter a model folder"),
        (lambda root, clips: app_module().add_clip(str(root / "model"), None, "joy", []), "Upload or record"),
        (lambda root, clips: app_module().add_clip(str(root / "model"), clips[0], "  ", []), "emotion label"),
        (lambda root, clips: app_module().add_clip(str(root / "model"), str(root / "notes.wav"), "joy", []),
         "Could not decode"),
        (lambda root, clips: app_module().add_clip(str(root / "model"), str(root / "silent.wav"), "joy", []), "silent"),
        (lambda root, clips: app_module().enroll(str(root / "model"), [], ""), "Add at least one clip"),
        (lambda root, clips: app_module().enroll(str(root / "model"), [(clips[0], "joy")], "calm, fear"),
         "not among the candidate labels"),
        (lambda root, clips: app_module().save_profile(None), "Enroll a speaker first"),
        (lambda root, clips: app_module().load_profile(str(root / "model"), str(root / "notes.wav")),
         "not a readable safetensors"),
        (lambda root, clips: app_module().load_profile(
            str(root / "model"), app_module().save_profile(app_module().enroll(str(root / "other"), [(clips[0], "joy")], "")[0])),
         "different checkpoint"),
        (lambda root, clips: app_module().classify(str(root / "model"), None, None), "Upload or record"),
        (lambda root, clips: app_module().classify(str(root / "model"), None, str(root / "silent.wav")), "silent"),
        (lambda root, clips: app_module().timeline(str(root / "model"), None, str(root / "long.wav"), "fixed windows", 2.0, 2.0,
                                                   True, -50),
         "must be smaller than chunk_length_s"),
        (lambda root, clips: app_module().timeline(str(root / "model"), None, str(root / "silent.wav"), "utterances (VAD)", 2.0,
                                                   0.5, True, -50),
         "No speech found"),
        (lambda root, clips: app_module().timeline(str(root / "model"), None, str(root / "long.wav"), "utterances (VAD)",
                                                   2.0, 0.5, True, -50, True), "needs an enrolled speaker"),
    ],
)
def test_bad_input_is_a_message_on_the_page(setup, action, match):
    root, clips = setup
    with pytest.raises(gr.Error, match=match):
        action(root, clips)


def app_module():
    import app

    return app
