"""save_pretrained → from_pretrained(trust_remote_code=True) in a process that cannot import the package."""

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from transformers.dynamic_module_utils import get_relative_imports

from modeling_icl_ser.checkpointing import checkpoint_code_files

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_icl_ser"
# Package modules a checkpoint does not carry: the package's entry point, the test model and the
# backbone loaders (they need pip packages and files a Hub checkpoint does not have).
NOT_IN_CHECKPOINTS = {"__init__.py", "testing.py", "backbones.py", "ctranslate2_whisper.py"}

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_icl_ser"] = None  # the package must not be importable
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    ckpt, audio_path, out_path, resaved = sys.argv[1:5]
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    model.save_pretrained(resaved)  # the pipeline code is not loaded here: the copy must not name it
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    audio = np.load(audio_path)
    inputs = processor(query=[audio[0], audio[1]], enrollment=[[(audio[2], "calm")], []], sampling_rate=16000)
    with torch.no_grad():
        probs = model.classify(**inputs)
        logits = model(**inputs).logits[:, -1]
    json.dump({"probs": probs.tolist(), "logits": logits.tolist(), "cls": type(model).__name__,
               "module": type(model).__module__, "labels": processor.labels,
               "ids": inputs["input_ids"].tolist()}, open(out_path, "w"))
    """
)


def test_round_trip_in_clean_subprocess(tiny, make_audio, tmp_path, run_clean_process):
    model, processor = tiny
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    files = set(os.listdir(ckpt))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"configuration_icl_ser.py", "modeling_icl_ser.py", "processing_icl_ser.py", "audio_utils.py",
            "pipeline_icl_ser.py"} <= files  # a plain save carries the pipeline too (tests/test_pipeline.py)
    assert set(checkpoint_code_files()) <= files
    assert not files & NOT_IN_CHECKPOINTS
    for name in sorted(f for f in files if f.endswith(".py")):  # the saved code is complete
        missing = {f"{module}.py" for module in get_relative_imports(ckpt / name)} - files
        assert not missing, f"{name} imports {missing}, which the checkpoint lacks"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_icl_ser.IclSerForConditionalGeneration"
    assert "icl-speech-emotion" in config["custom_pipelines"]
    proc_config = json.loads((ckpt / "processor_config.json").read_text())
    assert proc_config["num_audio_tokens"] == processor.num_audio_tokens
    assert proc_config["labels"] == processor.labels

    audio = np.stack([make_audio(1.2, seed=1), make_audio(1.2, seed=2), make_audio(1.2, seed=3)])
    np.save(tmp_path / "audio.npy", audio)
    result = run_clean_process(_CHILD, ckpt, tmp_path / "audio.npy", tmp_path / "out.json", tmp_path / "resaved")
    assert result.returncode == 0, result.stderr[-3000:]
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "custom_pipelines" not in resaved and not (tmp_path / "resaved" / "pipeline_icl_ser.py").exists()
    assert resaved["auto_map"] == config["auto_map"]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["cls"] == "IclSerForConditionalGeneration"
    assert not out["module"].startswith("modeling_icl_ser")  # loaded from the copied remote code
    assert out["labels"] == processor.labels

    inputs = processor(query=[audio[0], audio[1]], enrollment=[[(audio[2], "calm")], []], sampling_rate=16000)
    assert out["ids"] == inputs["input_ids"].tolist()
    with torch.no_grad():
        probs = model.classify(**inputs)
        logits = model(**inputs).logits[:, -1]
    torch.testing.assert_close(torch.tensor(out["probs"]), probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(out["logits"]), logits, atol=1e-5, rtol=1e-5)


def test_in_process_reload_keeps_weights(tiny, tmp_path):
    from modeling_icl_ser import IclSerForConditionalGeneration

    model, _ = tiny
    model.save_pretrained(tmp_path)
    again = IclSerForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_every_package_module_is_carried_or_named_as_not():
    """A module added to the package is either in every checkpoint (a checkpoint module imports
    it) or listed here as one that stays out, so none is forgotten."""
    carried = set(checkpoint_code_files())
    package = {path.name for path in PACKAGE.glob("*.py")}
    assert carried | NOT_IN_CHECKPOINTS == package
    assert not carried & NOT_IN_CHECKPOINTS
    assert {"projector.py", "readout.py", "speaker_routes.py", "route_mixing.py", "checkpointing.py"} <= carried
