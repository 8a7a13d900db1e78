"""The installed dependencies are the tested set, and a torch/torchaudio mismatch reads clearly.

A newly served torchaudio once broke every fresh install (torchaudio 2.11.1 beside torch 2.11.0:
a linker error at import). These tests fail when the environment resolved another pair than the
one constraints.txt pins, so CI, which installs from constraints.txt, catches such a drift.
"""

from __future__ import annotations

import configparser
import importlib
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from modeling_icl_ser import audio_utils

ROOT = Path(__file__).resolve().parent.parent


def pinned() -> dict[str, str]:
    """{package name (lower case): version} from constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"constraints.txt pins exact versions, got {line!r}"
            pins[requirement.name.lower()] = specifier.version
    return pins


def install_requires() -> dict[str, Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    return {Requirement(line).name.lower(): Requirement(line) for line in lines}


def test_installed_torch_pair_is_the_pinned_one():
    pins = pinned()
    for package in ("torch", "torchaudio"):
        installed = Version(metadata.version(package)).base_version  # "2.11.0+cpu" -> "2.11.0"
        assert installed == pins[package], (
            f"{package} {metadata.version(package)} is installed but constraints.txt pins {pins[package]}: "
            'install with pip install -e ".[dev,demo]" -c constraints.txt'
        )


def test_the_code_names_the_pinned_pair():
    pins = pinned()
    assert (audio_utils.TESTED_TORCH, audio_utils.TESTED_TORCHAUDIO) == (pins["torch"], pins["torchaudio"])


def test_setup_ranges_admit_every_pinned_version():
    pins, requires = pinned(), install_requires()
    for name, requirement in requires.items():
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name]), f"setup.cfg's {requirement} excludes the pinned {pins[name]}"


def test_setup_ranges_exclude_the_known_broken_pair():
    requires = install_requires()
    broken = {"torch": "2.11.0", "torchaudio": "2.11.1"}  # libtorchaudio: undefined symbol
    assert not all(requires[name].specifier.contains(version) for name, version in broken.items())


@pytest.fixture
def torchaudio_fails(monkeypatch):
    """Make `import torchaudio.functional` fail as a mismatched build does (in this process only)."""

    def fail_with(error: BaseException):
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "torchaudio" or name.startswith("torchaudio."):
                    raise error
                return None

        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])

    yield fail_with
    importlib.invalidate_caches()


def test_a_linker_failure_becomes_a_clear_error(torchaudio_fails):
    torchaudio_fails(OSError(".../libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace"))
    with pytest.raises(audio_utils.TorchaudioMismatchError) as caught:
        audio_utils.check_torchaudio()
    message = str(caught.value)
    assert f"torch {metadata.version('torch')}" in message and metadata.version("torchaudio") in message
    assert "undefined symbol" in message  # the cause, in one line
    assert f"pip install torch=={audio_utils.TESTED_TORCH} torchaudio=={audio_utils.TESTED_TORCHAUDIO}" in message
    assert "constraints.txt" in message
    assert isinstance(caught.value, ImportError)


def test_a_missing_torchaudio_is_named(torchaudio_fails, monkeypatch):
    torchaudio_fails(ImportError("No module named 'torchaudio'"))
    monkeypatch.setattr(audio_utils, "_installed_version", lambda package: None)
    with pytest.raises(audio_utils.TorchaudioMismatchError, match=r"torchaudio \(not installed\)"):
        audio_utils.check_torchaudio()


def test_a_fitting_pair_passes():
    audio_utils.check_torchaudio()  # the environment under test has a working pair
