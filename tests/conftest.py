"""Shared pytest fixtures."""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# --- model core (modeling_icl_ser) fixtures -------------------------------------------------
@pytest.fixture(scope="session")
def tiny():
    """(model, processor): tiny random Whisper-encoder icl-ser model, eval mode."""
    from modeling_icl_ser.testing import tiny_icl_ser

    return tiny_icl_ser(seed=0)


@pytest.fixture(scope="session")
def tiny_wavlm():
    """(model, processor) with a tiny WavLM encoder (wav2vec2-family path)."""
    from modeling_icl_ser.testing import tiny_icl_ser

    return tiny_icl_ser(seed=0, audio_model_type="wavlm")


@pytest.fixture
def make_audio():
    """make_audio(seconds, seed=0) -> float32 mono noise-plus-tone samples at 16 kHz."""

    def _make(seconds: float, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = int(round(seconds * 16000))
        tone = np.sin(2 * np.pi * (150 + 40 * seed) * np.arange(n) / 16000)
        return (0.3 * tone + 0.05 * rng.standard_normal(n)).astype(np.float32)

    return _make


@pytest.fixture
def run_clean_process(tmp_path):
    """run_clean_process(script_text, *args) -> CompletedProcess of a Python child process in which
    the repository is not on the path (cwd in tmp, PYTHONSAFEPATH, no PYTHONPATH), offline, with
    its own modules cache: what a user without the package installed has."""

    def _run(script_text: str, *args: str) -> subprocess.CompletedProcess:
        script = tmp_path / "child.py"
        script.write_text(script_text)
        workdir = tmp_path / "work"
        workdir.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONSAFEPATH="1")
        return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=300)

    return _run
