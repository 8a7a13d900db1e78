"""What people do with a labelled recording: a CSV or JSON table, a summary, a timeline plot.

Each function takes the segment dicts `pipe(recording, ...)` / `pipe.stream(...)` give:
`{"timestamp": (start, end), "speaker", "label", "score", "scores"}` (`label`/`score` None and
`scores` empty for another speaker's segments). Relative imports only: a checkpoint copies this
file beside the model code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

COLUMNS = ("start", "end", "speaker", "label", "score")


def _rows(segments: Sequence[dict]) -> list[dict]:
    segments = list(segments)
    if not segments:
        raise ValueError("No segments to export; label a recording first: segments = pipe(audio, profile=..., "
                         "segmentation='vad').")
    rows = []
    for seg in segments:
        start, end = seg["timestamp"]
        score = seg.get("score")
        rows.append({"start": round(float(start), 3), "end": round(float(end), 3), "speaker": seg.get("speaker") or "",
                     "label": seg.get("label") or "", "score": "" if score is None else round(float(score), 4)})
    return rows


def _write_atomically(text: str, path: Union[str, os.PathLike]) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".segments-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def segments_to_csv(segments: Sequence[dict], path: Optional[Union[str, os.PathLike]] = None) -> str:
    """The segments as CSV (`start,end,speaker,label,score`, seconds); written to `path` too
    (atomically) when given. Returns the CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(segments))
    text = out.getvalue()
    if path is not None:
        _write_atomically(text, path)
    return text


def segments_to_json(segments: Sequence[dict], path: Optional[Union[str, os.PathLike]] = None) -> str:
    """The segments as a JSON list of `{start, end, speaker, label, score, scores}`; written to
    `path` too (atomically) when given. Returns the JSON text."""
    rows = _rows(segments)
    for row, seg in zip(rows, segments):
        row["score"] = None if row["score"] == "" else row["score"]
        row["speaker"], row["label"] = seg.get("speaker"), seg.get("label")
        row["scores"] = {label: round(float(p), 4) for label, p in (seg.get("scores") or {}).items()}
    text = json.dumps(rows, indent=1, ensure_ascii=False)
    if path is not None:
        _write_atomically(text, path)
    return text


def summarize_recording(segments: Sequence[dict], speaker: Optional[str] = "target") -> dict:
    """Share of labelled speech time in each emotion, for one speaker.

    Args:
        segments: The segment dicts.
        speaker: Whose segments count (`"target"`; None = every labelled segment). Segments
            from a call without the speaker check (speaker None) count for `"target"` too.

    Returns:
        `{"speech_s": labelled seconds, "segments": count, "shares": {label: share of that time}}`,
        shares sorted from largest, summing to 1 (empty when nothing is labelled).
    """
    seconds: dict = {}
    count = 0
    for seg in segments:
        if seg.get("label") is None or (speaker is not None and seg.get("speaker") not in (speaker, None)):
            continue
        start, end = seg["timestamp"]
        seconds[seg["label"]] = seconds.get(seg["label"], 0.0) + max(0.0, float(end) - float(start))
        count += 1
    total = sum(seconds.values())
    shares = {label: s / total for label, s in sorted(seconds.items(), key=lambda kv: -kv[1])} if total else {}
    return {"speech_s": round(total, 3), "segments": count, "shares": shares}


def plot_emotion_timeline(segments: Sequence[dict], ax=None, labels: Optional[Sequence[str]] = None, title: str = ""):
    """Plot each label's probability over time, one lane per speaker, from long-recording results.

    Each labelled segment's probabilities are drawn at its middle; a gap (segments skipped as
    silence, or another speaker's) breaks the lines. When the segments carry speakers, a lane
    under the curves shows who speaks when (another speaker's segments in grey). Needs
    matplotlib (imported here, on first use).

    Args:
        segments: The segment dicts (`timestamp`, `scores`, optionally `speaker`).
        ax: A matplotlib axis to draw on (default: a new figure).
        labels: Labels to draw (default: every label in the segments' `scores`).
        title: Axis title.

    Returns:
        The matplotlib `Figure`.
    """
    import matplotlib

    segments = list(segments)
    if not segments:
        raise ValueError("No segments to plot; label a recording first: pipe(audio, profile=..., segmentation='vad').")
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 3.4))
    else:
        fig = ax.figure
    if labels is None:
        labels = list(dict.fromkeys(label for seg in segments for label in (seg.get("scores") or {})))
    labelled = [seg for seg in segments if seg.get("scores")]
    times, rows = [], []
    for i, seg in enumerate(labelled):
        start, end = seg["timestamp"]
        if i and start > labelled[i - 1]["timestamp"][1] + 1e-6:  # a skipped stretch: break the lines
            times.append(float("nan"))
            rows.append([float("nan")] * len(labels))
        times.append((start + end) / 2)
        rows.append([seg["scores"].get(label, float("nan")) for label in labels])
    colors = matplotlib.colormaps["tab10"]
    if rows:
        values = np.asarray(rows, dtype=float)
        for j, label in enumerate(labels):
            ax.plot(times, values[:, j], marker=".", label=label, color=colors(j % 10))
    speakers = list(dict.fromkeys(seg.get("speaker") for seg in segments if seg.get("speaker")))
    bottom = 0.0
    if speakers:  # speaker lanes under the curves: one row per speaker, a bar per segment
        lane = 0.08
        bottom = -lane * len(speakers) - 0.02
        for k, name in enumerate(speakers):
            y = -lane * (k + 1)
            spans = [(s["timestamp"][0], s["timestamp"][1] - s["timestamp"][0]) for s in segments if s.get("speaker") == name]
            ax.broken_barh(spans, (y, lane * 0.8), color="0.3" if name == "target" else "0.75")
            ax.text(1.0, y + lane * 0.4, f" {name}", transform=ax.get_yaxis_transform(), va="center", fontsize="small")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_ylim(bottom, 1)
    ax.set_yticks([0, 0.5, 1])
    ax.set_title(title)
    if rows:
        ax.legend(loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig
