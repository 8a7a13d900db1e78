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


def parse_arguments(dataclass_type: type[Arguments], argv: Optional[list[str]] = None) -> Arguments:
    """Parse flags into ``dataclass_type``, or a single YAML/JSON file of them; then ``validate()``."""
    parser = HfArgumentParser(dataclass_type)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    args.validate()
    return args
