"""bench/leave_one_corpus_out.py's model-card block: added once, replaced on a rerun, kept by eval.py."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loco():
    spec = importlib.util.spec_from_file_location("leave_one_corpus_out", REPO / "bench" / "leave_one_corpus_out.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_card_block_is_added_then_replaced(loco, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# m\n\n## Evaluation\n\n<!-- eval: test -->\n### test\n\n| a |\n<!-- /eval -->\n\nUA = ...\n")
    loco.write_card_block(card, "## Held out: ased\n\n| method | K=0 |\n|---|---:|\n| icl | 20.0 |\n")
    text = card.read_text()
    assert text.index("<!-- eval: test -->") < text.index("<!-- eval: leave one corpus out -->") < text.index("UA = ...")
    assert "### Held out: ased" in text and "| icl | 20.0 |" in text
    loco.write_card_block(card, "## Held out: ased\n\n| icl | 30.0 |\n")
    text = card.read_text()
    assert text.count("<!-- eval: leave one corpus out -->") == 1 and "30.0" in text and "20.0" not in text
    # eval.py keeps every block when it rewrites a card
    blocks = re.findall(r"<!-- eval: .*? -->.*?<!-- /eval -->", text, flags=re.DOTALL)
    assert [b.split(" -->")[0] for b in blocks] == ["<!-- eval: test", "<!-- eval: leave one corpus out"]


def test_card_block_fills_an_empty_evaluation_section_and_refuses_a_missing_card(loco, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("## Evaluation\n\n[No evaluation results recorded yet: run eval.py.]\n")
    loco.write_card_block(card, "## Held out: ravdess\n")
    assert "[No evaluation results" not in card.read_text() and "### Held out: ravdess" in card.read_text()
    with pytest.raises(ValueError, match="no model card"):
        loco.write_card_block(tmp_path / "missing" / "README.md", "x")
