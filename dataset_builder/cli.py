"""Command-line helpers shared by train.py and eval.py."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, TypeVar

from transformers import HfArgumentParser

Arguments = TypeVar("Arguments")


def parse_corpus_options(text: Optional[str]) -> dict[str, Any]:
    """``--corpus_options`` (a JSON object of synthetic-generator options) as a dict.

    Raises:
        ValueError: the text is not a JSON object.
    """
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--corpus_options must be a JSON object ({error}).") from None
    if not isinstance(options, dict):
        raise ValueError(f"--corpus_options must be a JSON object, got {text!r}.")
    return options


SETTINGS_FILES = (".yaml", ".yml", ".json")


def settings_file_flags(path: str) -> list[str]:
    """A YAML/JSON settings file as command-line tokens (``{"max_steps": 5}`` → ``--max_steps 5``).

    Raises:
        ValueError: the file is missing or does not hold a mapping of flag names to values.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            settings = yaml.safe_load(handle)  # JSON is YAML too
    except OSError as error:
        raise ValueError(f"Cannot read settings file {path!r} ({error.strerror}).") from None
    if not isinstance(settings, dict):
        raise ValueError(f"Settings file {path!r} must hold a mapping of flag names to values.")
    tokens: list[str] = []
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            tokens += [f"--{name}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            tokens += [f"--{name}", *(str(v) for v in value)]
        else:
            tokens += [f"--{name}", str(value)]
    return tokens


def parse_arguments(dataclass_type: type[Arguments], argv: Optional[list[str]] = None) -> Arguments:
    """Parse flags into ``dataclass_type``, or a YAML/JSON file of them; then ``validate()``.

    A settings file may be followed by flags, which override it:
    ``train.py configs/real-speech.yaml --max_steps 20``.
    """
    parser = HfArgumentParser(dataclass_type)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 and argv[0].endswith(SETTINGS_FILES) and not argv[0].startswith("-"):
        (args,) = parser.parse_args_into_dataclasses(settings_file_flags(argv[0]) + list(argv[1:]))
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    args.validate()
    return args
