"""icl-ser demo page: enroll a speaker from a few labelled clips, then label their clips or a long recording.

    pip install -e ".[demo]" -c constraints.txt
    python app.py                                   # http://127.0.0.1:7860, model outputs/icl-ser/final
    ICL_SER_MODEL=path/to/export python app.py      # another exported model folder

A Hugging Face Space runs this file as is (`app.py` at the repository root). It runs offline: the
model is an exported folder loaded with `trust_remote_code`, fonts are the system's, and nothing
is fetched. Every problem (no model yet, bad or silent audio, missing labels, a profile of another
model) is shown as a message on the page, never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402  (the [demo] extra)
import matplotlib  # noqa: E402

matplotlib.use("Agg")

DEFAULT_MODEL = os.environ.get("ICL_SER_MODEL", "outputs/icl-ser/final")
# System fonts only: the default theme would fetch Google fonts, which an offline page cannot.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


# ----------------------------------------------------------------------------- model
@functools.lru_cache(maxsize=2)
def _pipeline(folder: str):
    from transformers import pipeline

    return pipeline("icl-speech-emotion", model=folder, trust_remote_code=True, device="cpu")


def get_pipeline(folder: str):
    """The folder's pipeline (cached), or `ValueError` saying how to get a model."""
    folder = (folder or "").strip()
    if not folder:
        raise ValueError("Enter a model folder (an icl-ser export such as outputs/icl-ser/final).")
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"No model at {folder!r} yet. Train one with the README's first command (`python train.py`, which "
            "exports outputs/icl-ser/final), or enter the folder of another icl-ser export."
        )
    try:
        return _pipeline(str(path.resolve()))
    except Exception as error:  # anything a broken or foreign folder raises, shown on the page
        raise ValueError(f"Could not load an icl-ser model from {folder!r}: {error}") from None


def _module(pipe):
    """The pipeline's own module (the package's or the export's remote-code copy)."""
    return sys.modules[type(pipe).__module__]


def _polite(function):
    """Show `ValueError`s on the page (gr.Error) instead of a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


# ----------------------------------------------------------------------------- actions
@_polite
def load_model(folder: str) -> str:
    pipe = get_pipeline(folder)
    labels = ", ".join(pipe.processor.labels)
    return f"Model loaded from `{folder}`. Its labels: {labels} (enrollment may use any other words)."


def _rows(clips: list) -> list[list]:
    return [[i + 1, os.path.basename(path), label] for i, (path, label) in enumerate(clips)]


@_polite
def add_clip(folder: str, audio_path, label: str, clips: list):
    if not audio_path:
        raise ValueError("Upload or record a clip first, then add it with its label.")
    label = (label or "").strip()
    if not label:
        raise ValueError("Type the clip's emotion label (any word, e.g. happiness) before adding it.")
    pipe = get_pipeline(folder)
    pipe._load(audio_path, None, "This clip")  # decodes and checks it now: bad audio is refused here
    clips = list(clips) + [(audio_path, label)]
    return clips, _rows(clips), None, ""


def clear_clips():
    return [], [], None, "Enrollment cleared."


def _candidates(pipe, text: str, enrollment_labels: list[str]) -> list[str]:
    if text and text.strip():
        return [word.strip() for word in text.split(",") if word.strip()]
    return list(dict.fromkeys(list(pipe.processor.labels) + enrollment_labels))  # the model's labels + new words


@_polite
def enroll(folder: str, clips: list, candidates: str):
    if not clips:
        raise ValueError("Add at least one clip with its label before enrolling.")
    pipe = get_pipeline(folder)
    labels = _candidates(pipe, candidates, [label for _, label in clips])
    profile = pipe.enroll(list(clips), labels=labels)
    return profile, (f"Enrolled {profile.num_enrollment} clips ({', '.join(profile.enrollment_labels)}); "
                     f"candidates: {', '.join(profile.labels)}.")


@_polite
def save_profile(profile):
    if profile is None:
        raise ValueError("Enroll a speaker first; then save their profile.")
    path = Path(tempfile.mkdtemp(prefix="icl-ser-profile-")) / "speaker.safetensors"
    profile.save(path)
    return str(path)


@_polite
def load_profile(folder: str, file):
    if not file:
        raise ValueError("Choose a .safetensors speaker profile to load.")
    pipe = get_pipeline(folder)
    profile = _module(pipe).SpeakerProfile.load(file)
    pipe._check_profile(profile, None)  # refuses a profile of another model
    return profile, f"Profile loaded: {profile.num_enrollment} clips ({', '.join(profile.enrollment_labels)})."


@_polite
def classify(folder: str, profile, audio_path):
    if not audio_path:
        raise ValueError("Upload or record a clip to classify.")
    pipe = get_pipeline(folder)
    result = pipe(audio_path, profile=profile) if profile is not None else pipe(audio_path)
    return {item["label"]: item["score"] for item in result}


SEGMENTATIONS = {"utterances (VAD)": "vad", "fixed windows": "fixed"}


@_polite
def timeline(folder: str, profile, audio_path, segmentation: str, chunk_length_s: float, stride_length_s: float,
             gate: bool, threshold_db: float, target_speaker: bool = False):
    """Label a long recording: (timeline figure, segment rows, summary text, CSV file path)."""
    if not audio_path:
        raise ValueError("Upload or record a recording to follow over time.")
    if target_speaker and profile is None:
        raise ValueError("'Only the enrolled speaker' needs an enrolled speaker: enroll (or load a profile) first.")
    pipe = get_pipeline(folder)
    mode = SEGMENTATIONS.get(segmentation, segmentation)
    settings = dict(segmentation=mode, vad_threshold_db=float(threshold_db) if gate else None,
                    target_speaker=bool(target_speaker))
    if mode == "fixed":
        settings.update(chunk_length_s=float(chunk_length_s), stride_length_s=float(stride_length_s))
    segments = pipe(audio_path, profile=profile, **settings)
    outputs = sys.modules[type(pipe).__module__.rsplit(".", 1)[0] + ".recording_outputs_icl_ser"]
    figure = outputs.plot_emotion_timeline(segments, title="probability per label over time")
    rows = [[s["timestamp"][0], s["timestamp"][1], s.get("speaker") or "", s["label"] or "",
             "" if s["score"] is None else round(s["score"], 3)] for s in segments]
    summary = outputs.summarize_recording(segments)
    shares = ", ".join(f"{label} {100 * share:.0f} %" for label, share in summary["shares"].items()) or "nothing labelled"
    who = "the enrolled speaker" if target_speaker else "the speaker"
    text = f"{len(segments)} segments; {who}: {summary['speech_s']:.1f} s of speech in {summary['segments']} segments: {shares}."
    path = Path(tempfile.mkdtemp(prefix="icl-ser-segments-")) / (Path(audio_path).stem + "-segments.csv")
    outputs.segments_to_csv(segments, path)
    return figure, rows, text, str(path)


# ----------------------------------------------------------------------------- page
def build_demo(model_folder: str = DEFAULT_MODEL) -> gr.Blocks:
    """The page (a `gr.Blocks`); `launch(build_demo())` or `python app.py` serves it."""
    with gr.Blocks(title="icl-ser demo", analytics_enabled=False) as demo:
        gr.Markdown("## icl-ser: personalized speech emotion recognition from a few examples\n"
                    "Enroll a speaker with a few labelled clips (any label words), then label their "
                    "speech: one clip, or a long recording over time.")
        with gr.Row():
            folder = gr.Textbox(model_folder, label="Model folder", elem_id="model_folder", scale=4)
            load = gr.Button("Load model", scale=1)
        model_status = gr.Markdown(elem_id="model_status")
        clips = gr.State([])
        profile = gr.State(None)
        with gr.Row():
            with gr.Column():
                gr.Markdown("### 1. Enroll a speaker")
                clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Enrollment clip",
                                elem_id="enroll_audio")
                label = gr.Textbox(label="Its emotion label", placeholder="e.g. happiness", elem_id="enroll_label")
                add = gr.Button("Add clip", elem_id="add_clip")
                table = gr.Dataframe(headers=["#", "clip", "label"], label="Enrollment", interactive=False,
                                     elem_id="enroll_table")
                candidates = gr.Textbox(label="Candidate labels (comma-separated; empty: the model's labels and "
                                              "the enrollment's)", elem_id="candidates")
                with gr.Row():
                    enroll_button = gr.Button("Enroll", variant="primary", elem_id="enroll")
                    clear = gr.Button("Clear", elem_id="clear")
                enroll_status = gr.Markdown(elem_id="enroll_status")
                with gr.Row():
                    save = gr.Button("Save profile", elem_id="save_profile")
                    saved = gr.File(label="Profile file", interactive=False, elem_id="profile_file")
                upload = gr.File(label="Load a saved profile", file_types=[".safetensors"], type="filepath",
                                 elem_id="load_profile")
            with gr.Column():
                gr.Markdown("### 2. Label their speech")
                with gr.Tab("A clip"):
                    query = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip",
                                     elem_id="query_audio")
                    run = gr.Button("Classify", variant="primary", elem_id="classify")
                    result = gr.Label(label="Emotion", elem_id="result")
                with gr.Tab("A long recording"):
                    recording = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Recording",
                                         elem_id="long_audio")
                    with gr.Row():
                        mode = gr.Radio(list(SEGMENTATIONS), value="utterances (VAD)", label="Segments",
                                        elem_id="segmentation")
                        target = gr.Checkbox(False, label="Only the enrolled speaker (two-party call)",
                                             elem_id="target_speaker")
                    with gr.Accordion("Fixed windows and the energy gate", open=False):
                        with gr.Row():
                            chunk = gr.Slider(1.0, 30.0, 4.0, step=0.5, label="Window length (s)")
                            stride = gr.Slider(0.0, 10.0, 1.0, step=0.5, label="Overlap (s)")
                        with gr.Row():
                            gate = gr.Checkbox(True, label="Skip silence (energy gate)")
                            threshold = gr.Slider(-80.0, -10.0, -50.0, step=1.0, label="Gate level (dBFS)")
                    follow = gr.Button("Follow over time", variant="primary", elem_id="timeline")
                    summary = gr.Markdown(elem_id="timeline_summary")
                    plot = gr.Plot(label="Timeline", elem_id="timeline_plot")
                    segments = gr.Dataframe(headers=["start (s)", "end (s)", "speaker", "label", "score"],
                                            interactive=False, label="Segments", elem_id="segments_table")
                    csv_file = gr.File(label="Segments (CSV)", interactive=False, elem_id="segments_csv")
        gr.Markdown("Audio: WAV/FLAC/OGG, up to 30 s per clip; a long recording is labelled utterance by utterance.")

        load.click(load_model, folder, model_status)
        demo.load(load_model, folder, model_status)
        add.click(add_clip, [folder, clip, label, clips], [clips, table, clip, label])
        clear.click(clear_clips, None, [clips, table, clip, enroll_status]).then(lambda: None, None, profile)
        enroll_button.click(enroll, [folder, clips, candidates], [profile, enroll_status])
        save.click(save_profile, profile, saved)
        upload.upload(load_profile, [folder, upload], [profile, enroll_status])
        run.click(classify, [folder, profile, query], result)
        follow.click(timeline, [folder, profile, recording, mode, chunk, stride, gate, threshold, target],
                     [plot, segments, summary, csv_file])
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Serve the page offline (system fonts, no server-side rendering); kwargs go to `Blocks.launch`."""
    return demo.launch(theme=THEME, ssr_mode=False, **kwargs)


if __name__ == "__main__":
    launch(build_demo())
