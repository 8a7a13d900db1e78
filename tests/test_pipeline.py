"""pipeline("icl-speech-emotion"): call forms, speaker profiles, saved checkpoints, bad input."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_icl_ser import SpeakerProfile, save_with_pipeline
from modeling_icl_ser.testing import tiny_icl_ser

SR = 16000


@pytest.fixture(scope="module")
def pipe(tiny):
    model, processor = tiny
    return pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def clips():
    def clip(seconds, seed):
        rng = np.random.default_rng(seed)
        n = int(seconds * SR)
        tone = np.sin(2 * np.pi * (120 + 30 * seed) * np.arange(n) / SR)
        return (0.3 * tone + 0.05 * rng.standard_normal(n)).astype(np.float32)

    enrollment = [(clip(0.6 + 0.1 * j, j), label) for j, label in enumerate(["happiness", "sadness", "anger", "calm"])]
    queries = [clip(0.5 + 0.2 * i, 50 + i) for i in range(5)]
    return enrollment, queries


def _scores(result):
    return {item["label"]: item["score"] for item in result}


def _max_diff(a, b):
    sa, sb = _scores(a), _scores(b)
    assert set(sa) == set(sb)
    return max(abs(sa[k] - sb[k]) for k in sa)


# ------------------------------------------------------------------------ call forms
def test_single_call_is_sorted_distribution_over_vocabulary(pipe, clips):
    enrollment, queries = clips
    out = pipe(queries[0], enrollment=enrollment, sampling_rate=SR)
    assert [item["label"] for item in out] != [] and set(_scores(out)) == set(pipe.processor.labels)
    scores = [item["score"] for item in out]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(scores) - 1.0) < 1e-5


def test_audio_forms_agree(pipe, clips, tmp_path):
    import soundfile

    enrollment, queries = clips
    path = tmp_path / "q.wav"
    soundfile.write(path, queries[1], SR, subtype="FLOAT")
    reference = pipe(queries[1], enrollment=enrollment, sampling_rate=SR)
    for form in (str(path), {"array": queries[1], "sampling_rate": SR}, {"raw": queries[1], "sampling_rate": SR},
                 torch.from_numpy(queries[1])):
        # sampling_rate= is for the raw enrollment arrays; files and dicts carry their own rate.
        assert _max_diff(pipe(form, enrollment=enrollment, sampling_rate=SR), reference) < 1e-6
    # Another rate is resampled; enrollment audio may be a path too.
    out = pipe({"array": queries[1][::2].copy(), "sampling_rate": 8000}, enrollment=[(str(path), "fear")])
    assert abs(sum(item["score"] for item in out) - 1) < 1e-5


def test_labels_top_k_and_zero_shot(pipe, clips):
    enrollment, queries = clips
    out = pipe(queries[0], enrollment=enrollment[:2], labels=["happiness", "sadness", "neutral"], sampling_rate=SR)
    assert set(_scores(out)) == {"happiness", "sadness", "neutral"}
    top = pipe(queries[0], enrollment=enrollment, top_k=2, sampling_rate=SR)
    full = pipe(queries[0], enrollment=enrollment, sampling_rate=SR)
    assert top == full[:2]
    assert len(pipe(queries[0], top_k=100, sampling_rate=SR)) == len(pipe.processor.labels)
    assert pipe(queries[0], sampling_rate=SR) == pipe(queries[0], enrollment=[], sampling_rate=SR)  # K = 0


@pytest.mark.parametrize("use_profile", [False, True])
def test_batched_list_equals_one_by_one(pipe, clips, use_profile):
    enrollment, queries = clips
    context = {"profile": pipe.enroll(enrollment, sampling_rate=SR)} if use_profile else {"enrollment": enrollment}
    batched = pipe(queries, batch_size=3, sampling_rate=SR, **context)
    assert len(batched) == len(queries)
    for query, out in zip(queries, batched):
        assert _max_diff(out, pipe(query, sampling_rate=SR, **context)) < 1e-5
    assert pipe(tuple(queries[:2]), sampling_rate=SR, **context) == pipe(queries[:2], sampling_rate=SR, **context)
    streamed = list(pipe((q for q in queries), batch_size=2, sampling_rate=SR, **context))
    assert max(_max_diff(a, b) for a, b in zip(streamed, batched)) < 1e-5


# ------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("k", [0, 1, 4])
def test_profile_matches_full_prompt(pipe, clips, k):
    enrollment, queries = clips
    profile = pipe.enroll(enrollment[:k], sampling_rate=SR)
    assert profile.num_enrollment == k
    with_profile = pipe(queries, profile=profile, batch_size=4, sampling_rate=SR)
    without = pipe(queries, enrollment=enrollment[:k], batch_size=4, sampling_rate=SR)
    assert max(_max_diff(a, b) for a, b in zip(with_profile, without)) < 1e-4


def test_profile_with_custom_labels(pipe, clips):
    enrollment, queries = clips
    labels = ["anger", "calm", "happiness", "sadness", "boredom"]
    profile = pipe.enroll(enrollment, labels=labels, sampling_rate=SR)
    out = pipe(queries[2], profile=profile, labels=labels, sampling_rate=SR)
    assert set(_scores(out)) == set(labels)
    assert _max_diff(out, pipe(queries[2], enrollment=enrollment, labels=labels, sampling_rate=SR)) < 1e-4


def test_profile_save_load_and_foreign_profile(pipe, clips, tmp_path):
    enrollment, queries = clips
    profile = pipe.enroll(enrollment, sampling_rate=SR)
    path = tmp_path / "profiles" / "alice.safetensors"
    profile.save(path)
    assert os.listdir(path.parent) == ["alice.safetensors"]  # no temp file left behind
    loaded = SpeakerProfile.load(path)
    assert loaded.enrollment_labels == profile.enrollment_labels and loaded.labels == profile.labels
    assert pipe(queries[0], profile=loaded, sampling_rate=SR) == pipe(queries[0], profile=profile, sampling_rate=SR)

    other_model, other_processor = tiny_icl_ser(seed=1)
    other = pipeline("icl-speech-emotion", model=other_model, processor=other_processor, device="cpu")
    with pytest.raises(ValueError, match="different checkpoint"):
        other(queries[0], profile=loaded, sampling_rate=SR)
    with pytest.raises(ValueError, match="not an icl-ser speaker profile"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
        SpeakerProfile.load(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, q, e: p(q, enrollment=e), "sampling rate"),
        (lambda p, q, e: p(np.full(SR, np.nan, np.float32), sampling_rate=SR), "NaN"),
        (lambda p, q, e: p(np.zeros(0, np.float32), sampling_rate=SR), "empty"),
        (lambda p, q, e: p(np.zeros(31 * SR, np.float32), sampling_rate=SR), "at most 30 s"),
        (lambda p, q, e: p("/no/such/file.wav"), "not found"),
        (lambda p, q, e: p(q, enrollment=[(e[0][0], "happy")], sampling_rate=SR), "not among the candidate labels"),
        (lambda p, q, e: p(q, enrollment=[e[0][0]], sampling_rate=SR), r"\(audio, label\) pair"),
        (lambda p, q, e: p(q, enrollment=[(np.zeros(0, np.float32), "calm")], sampling_rate=SR), "enrollment audio 0"),
        (lambda p, q, e: p(q, labels=["calm", "calm"], sampling_rate=SR), "duplicated"),
        (lambda p, q, e: p(q, labels=[], sampling_rate=SR), "empty"),
        (lambda p, q, e: p([], enrollment=e, sampling_rate=SR), "query list is empty"),
        (lambda p, q, e: p(q, top_k=0, sampling_rate=SR), "top_k"),
        (lambda p, q, e: p(q, top_k=-2, sampling_rate=SR), "top_k"),
        (lambda p, q, e: p(q, top_k=1.5, sampling_rate=SR), "top_k"),
        (lambda p, q, e: p(q, profile={"labels": []}, sampling_rate=SR), "SpeakerProfile"),
        (lambda p, q, e: p(q, enrollment=e, profile=p.enroll(e, sampling_rate=SR), sampling_rate=SR), "not both"),
        (lambda p, q, e: p(q, profile=p.enroll(e, sampling_rate=SR), labels=["calm", "fear"], sampling_rate=SR),
         r"enrollment labels \['anger', 'happiness', 'sadness'\] are not among"),
        (lambda p, q, e: p(q, profile=p.enroll(e, sampling_rate=SR), labels=sorted(p.processor.labels, reverse=True),
                           sampling_rate=SR), "enrolled with candidate labels"),
    ],
)
def test_bad_input_raises_value_error(pipe, clips, call, match):
    enrollment, queries = clips
    with pytest.raises(ValueError, match=match):
        call(pipe, queries[0], enrollment)


def test_constructor_refuses_speaker_parameters(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="pass them to each call"):
        pipeline("icl-speech-emotion", model=model, processor=processor, device="cpu", labels=["calm"])


# ------------------------------------------------------------------------ saved checkpoint
_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_icl_ser"] = None  # the package must not be importable
    import numpy as np
    from transformers import pipeline
    ckpt, audio_path, profile_path, child_profile_path, out_path, resaved = sys.argv[1:7]
    pipe = pipeline("icl-speech-emotion", model=ckpt, trust_remote_code=True, device="cpu")
    pipe.model.save_pretrained(resaved)  # a plain save from remote code keeps the pipeline too
    pipe.processor.save_pretrained(resaved)
    audio = np.load(audio_path)
    enrollment = [(audio[2], "calm"), (audio[3], "fear")]
    SpeakerProfile = sys.modules[type(pipe).__module__].SpeakerProfile
    profile = SpeakerProfile.load(profile_path)
    pipe.enroll(enrollment, sampling_rate=16000).save(child_profile_path)
    out = {
        "pipeline": type(pipe).__module__,
        "model": type(pipe.model).__module__,
        "single": pipe(audio[0], enrollment=enrollment, sampling_rate=16000),
        "batch": pipe([audio[0], audio[1]], enrollment=enrollment, batch_size=2, sampling_rate=16000),
        "profile": pipe([audio[0], audio[1]], profile=profile, batch_size=2, sampling_rate=16000),
        "zero_shot_top2": pipe(audio[1], top_k=2, sampling_rate=16000),
    }
    json.dump(out, open(out_path, "w"))
    """
)


_CHECKPOINT_FILES = {"model.safetensors", "config.json", "processor_config.json", "pipeline_icl_ser.py",
                     "modeling_icl_ser.py", "processing_icl_ser.py", "audio_utils.py", "configuration_icl_ser.py"}


def _check_checkpoint_folder(ckpt, reference_custom_pipelines=None):
    files = set(os.listdir(ckpt))
    assert _CHECKPOINT_FILES <= files, _CHECKPOINT_FILES - files
    assert not any(f.endswith(".bin") or f.startswith(".tmp-") for f in files)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["custom_pipelines"]["icl-speech-emotion"]["impl"] == "pipeline_icl_ser.IclSpeechEmotionPipeline"
    assert config["custom_pipelines"]["icl-speech-emotion"]["pt"] == ["AutoModel"]
    if reference_custom_pipelines is not None:
        assert config["custom_pipelines"] == reference_custom_pipelines
    return config


@pytest.mark.parametrize("save", ["save_with_pipeline", "plain_save_pretrained"])
def test_saved_checkpoint_runs_in_clean_process(tiny, pipe, clips, tmp_path, run_clean_process, save):
    model, processor = tiny
    ckpt = tmp_path / "ckpt"
    if save == "save_with_pipeline":
        save_with_pipeline(model, processor, ckpt)
        _check_checkpoint_folder(ckpt)
    else:  # the plain transformers way writes the same pipeline entry as save_with_pipeline
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        save_with_pipeline(model, processor, tmp_path / "reference")
        reference = json.loads((tmp_path / "reference" / "config.json").read_text())["custom_pipelines"]
        _check_checkpoint_folder(ckpt, reference)
        assert (ckpt / "pipeline_icl_ser.py").read_bytes() == (tmp_path / "reference" / "pipeline_icl_ser.py").read_bytes()
    assert not hasattr(model.config, "custom_pipelines")  # only the folder with the code names it

    enrollment, queries = clips
    audio = np.stack([np.resize(a, SR) for a in (queries[0], queries[3], enrollment[0][0], enrollment[1][0])])
    np.save(tmp_path / "audio.npy", audio)
    pair = [(audio[2], "calm"), (audio[3], "fear")]
    pipe.enroll(pair, sampling_rate=SR).save(tmp_path / "parent.safetensors")
    result = run_clean_process(_CHILD, ckpt, tmp_path / "audio.npy", tmp_path / "parent.safetensors",
                               tmp_path / "child.safetensors", tmp_path / "out.json", tmp_path / "resaved")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_checkpoint_folder(tmp_path / "resaved", json.loads((ckpt / "config.json").read_text())["custom_pipelines"])
    out = json.loads((tmp_path / "out.json").read_text())
    assert not out["pipeline"].startswith("modeling_icl_ser") and not out["model"].startswith("modeling_icl_ser")

    single = pipe(audio[0], enrollment=pair, sampling_rate=SR)
    assert _max_diff(out["single"], single) < 1e-5
    for child, query in zip(out["batch"], audio[:2]):
        assert _max_diff(child, pipe(query, enrollment=pair, sampling_rate=SR)) < 1e-5
    for child, query in zip(out["profile"], audio[:2]):  # the parent's profile fits the reloaded checkpoint
        assert _max_diff(child, pipe(query, enrollment=pair, sampling_rate=SR)) < 1e-4
    assert [x["label"] for x in out["zero_shot_top2"]] == [x["label"] for x in pipe(audio[1], top_k=2, sampling_rate=SR)]
    # ... and the child's profile fits the in-memory model: fingerprints agree across processes.
    child_profile = SpeakerProfile.load(tmp_path / "child.safetensors")
    assert _max_diff(pipe(audio[0], profile=child_profile, sampling_rate=SR), single) < 1e-4
