"""Checkpoints saved by earlier code keep loading.

tests/fixtures/checkpoint_v1_code/ holds the model folder's code as it was before the model file
was split and the config grouped (one modeling file; config.json layout 1: flat keys with
`context_readout_pointer`). A child process builds and saves a small checkpoint with that code,
as that version's `save_pretrained` did; it must load with today's package and with
`trust_remote_code=True`, and score as it did. No weights are stored in the repository.
"""

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_icl_ser import IclSerConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v1_code"
SR = 16000

# Run with the old code as the package `icl_ser_v1`; today's package must not be importable.
_BUILD_WITH_OLD_CODE = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_icl_ser"] = None
    root, config_path, processor_dir, ckpt, audio_path, out_path = sys.argv[1:7]
    sys.path.insert(0, root)
    import numpy as np, torch
    from icl_ser_v1.configuration_icl_ser import IclSerConfig
    from icl_ser_v1.modeling_icl_ser import IclSerForConditionalGeneration
    from icl_ser_v1.processing_icl_ser import IclSerProcessor
    IclSerConfig.register_for_auto_class()
    IclSerForConditionalGeneration.register_for_auto_class("AutoModel")
    IclSerProcessor.register_for_auto_class()
    config = IclSerConfig(**json.load(open(config_path)))
    torch.manual_seed(0)
    model = IclSerForConditionalGeneration(config).eval()
    processor = IclSerProcessor.from_pretrained(processor_dir)
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    audio = np.load(audio_path)
    inputs = processor(query=[audio[0], audio[1]], enrollment=[[(audio[2], "calm"), (audio[3], "fear")], []],
                       sampling_rate=16000)
    with torch.no_grad():
        probs = model.classify(**inputs)
    json.dump({"probs": probs.tolist(), "names": sorted(model.state_dict())}, open(out_path, "w"))
    """
)

_LOAD_REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_icl_ser"] = None
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    ckpt, audio_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    audio = np.load(audio_path)
    inputs = processor(query=[audio[0], audio[1]], enrollment=[[(audio[2], "calm"), (audio[3], "fear")], []],
                       sampling_rate=16000)
    with torch.no_grad():
        probs = model.classify(**inputs)
    json.dump({"probs": probs.tolist(), "module": type(model).__module__}, open(out_path, "w"))
    """
)


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    """(folder, the old code's probabilities, its weight names, audio file) of a checkpoint saved
    by the old code: read-out, speaker normalization, SI route and route weights all on."""
    import subprocess
    import sys

    from modeling_icl_ser.testing import tiny_icl_ser

    tmp = tmp_path_factory.mktemp("old_checkpoint")
    shutil.copytree(FIXTURE, tmp / "code" / "icl_ser_v1")
    (tmp / "code" / "icl_ser_v1" / "__init__.py").write_text("")
    model, processor = tiny_icl_ser(seed=0, context_readout_heads=1, speaker_normalization=True, si_route=True,
                                    route_weights={"lm": 0.5, "si": 0.25, "prototype": 0.25})
    processor.save_pretrained(tmp / "processor")
    # The config.json keys of layout 1: today's minus the layout version, plus the removed option.
    options = {k: v for k, v in model.config.to_dict().items()
               if k not in ("config_layout_version", "transformers_version", "model_type", "dtype")}
    options["context_readout_pointer"] = False
    (tmp / "config.json").write_text(json.dumps(options))
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((4, SR))).astype(np.float32)
    np.save(tmp / "audio.npy", audio)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"), "PYTHONSAFEPATH": "1",
           "PATH": "/usr/bin:/bin"}
    (tmp / "build.py").write_text(_BUILD_WITH_OLD_CODE)
    result = subprocess.run([sys.executable, str(tmp / "build.py"), str(tmp / "code"), str(tmp / "config.json"),
                             str(tmp / "processor"), str(tmp / "ckpt"), str(tmp / "audio.npy"), str(tmp / "old.json")],
                            cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    old = json.loads((tmp / "old.json").read_text())
    return tmp / "ckpt", torch.tensor(old["probs"]), old["names"], tmp / "audio.npy"


def _inputs(processor, audio_path):
    audio = np.load(audio_path)
    return processor(query=[audio[0], audio[1]], enrollment=[[(audio[2], "calm"), (audio[3], "fear")], []],
                     sampling_rate=SR)


def test_old_checkpoint_is_layout_1(old_checkpoint):
    ckpt, _, _, _ = old_checkpoint
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["context_readout_pointer"] is False and "config_layout_version" not in saved
    assert (ckpt / "modeling_icl_ser.py").read_bytes() == (FIXTURE / "modeling_icl_ser.py").read_bytes()
    assert not (ckpt / "projector.py").exists()  # the one-file model


def test_old_checkpoint_loads_with_todays_package(old_checkpoint):
    from transformers import AutoModel, AutoProcessor

    from modeling_icl_ser import IclSerForConditionalGeneration

    ckpt, old_probs, old_names, audio_path = old_checkpoint
    model, info = AutoModel.from_pretrained(ckpt, output_loading_info=True)
    assert isinstance(model, IclSerForConditionalGeneration)  # today's class, not the folder's code
    assert not any(info.values()), info  # every weight name the old code saved is one today's model has
    assert sorted(model.state_dict()) == old_names
    assert model.config.context_readout_heads == 1 and not hasattr(model.config, "context_readout_pointer")
    processor = AutoProcessor.from_pretrained(ckpt)
    with torch.no_grad():
        probs = model.eval().classify(**_inputs(processor, audio_path))
    torch.testing.assert_close(probs, old_probs, atol=1e-5, rtol=1e-5)


def test_old_checkpoint_loads_with_remote_code(old_checkpoint, run_clean_process, tmp_path):
    ckpt, old_probs, _, audio_path = old_checkpoint
    result = run_clean_process(_LOAD_REMOTE, ckpt, audio_path, tmp_path / "out.json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert not out["module"].startswith("modeling_icl_ser")
    torch.testing.assert_close(torch.tensor(out["probs"]), old_probs, atol=1e-5, rtol=1e-5)


def test_layout_1_configs_keep_their_defaults_and_refuse_the_pointer_on():
    """A layout-1 config.json that lacks a key gets that layout's default for it (the defaults
    that moved since), and one that switches the removed pointer on is refused."""
    flat = {"audio_config": {"model_type": "whisper", "encoder_layers": 2, "d_model": 32,
                             "encoder_attention_heads": 2, "encoder_ffn_dim": 64},
            "num_audio_tokens": 4, "context_readout_pointer": False}
    config = IclSerConfig.from_dict(flat)
    assert (config.context_readout_heads, config.context_readout_dropout, config.audio_feature_layer) == (0, 0.0, None)
    assert config.config_layout_version == 2 and "context_readout_pointer" not in config.to_dict()
    fresh = IclSerConfig.from_dict({**flat, "config_layout_version": 2})  # today's layout: today's defaults
    assert (fresh.context_readout_heads, fresh.audio_feature_layer) == (4, 2)
    with pytest.raises(ValueError, match="context_readout_pointer=true.*trust_remote_code"):
        IclSerConfig.from_dict({**flat, "context_readout_pointer": True})
