"""Leave one corpus out (issue 24, G1/G2): each fold model of a release run, tested on every
speaker of the corpus it never heard, beside the conventional methods fitted on the other corpora.

A release run with ``--route_weights_from held_out_corpora`` (``configs/real-speech.yaml``) leaves
``<run>/folds/<corpus>/final`` (a model meta-trained without that corpus) and
``<run>/folds/<corpus>/nested_route_weights.json`` (per-K route weights chosen on the *other*
folds only, so the corpus tested on never chose them). For each corpus this script runs eval.py
on every speaker of it (content-disjoint enrollment where the corpus has texts, the same queries
at every K), with and without ``--unlabelled``, and writes one markdown table per corpus: the
mixture, each route alone, and the conventional methods, per K.

    python bench/leave_one_corpus_out.py outputs/real-speech [--episodes_per_speaker 10] [--unlabelled 16]
        [--corpora ravdess,ased] [--output_dir outputs/leave-one-corpus-out]

The test speakers are scored once per reported number; nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataset_builder import TEXTLESS_CORPORA, parse_corpora  # noqa: E402

METHOD_ORDER = ("icl", "icl_lm", "icl_si", "icl_prototype", "si", "si_norm", "si_finetune", "prototypes",
                "speaker_embedding", "enroll_prototypes")
CONVENTIONAL = ("si", "si_norm", "si_finetune", "prototypes", "speaker_embedding", "enroll_prototypes")


def run_eval(run: Path, corpus: str, folder: str, others: list[tuple[str, str]], args, unlabelled: int) -> Path:
    """eval.py for one held-out corpus; returns its output folder (reused when results.json exists)."""
    out = Path(args.output_dir) / f"{corpus}-u{unlabelled}"
    if (out / "results.json").is_file():
        return out
    command = [
        sys.executable, str(ROOT / "eval.py"), "--model", str(run / "folds" / corpus / "final"),
        "--corpus", corpus, "--data_dir", folder, "--test_speakers", "all",
        "--baseline_corpus", ",".join(name for name, _ in others),
        "--baseline_data_dir", ",".join(str(path) for _, path in others),
        "--route_weights", str(run / "folds" / corpus / "nested_route_weights.json"),
        "--episodes_per_speaker", str(args.episodes_per_speaker), "--k", *map(str, args.k),
        "--unlabelled", str(unlabelled), "--output_dir", str(out), "--n_bootstrap", str(args.n_bootstrap),
    ]
    if corpus not in TEXTLESS_CORPORA:
        command.append("--content_disjoint")
    subprocess.run(command, check=True, cwd=ROOT)
    return out


def results_of(out: Path) -> list[dict]:
    """A run's results; rows of a later `--methods enroll_prototypes` rerun (its `enroll_prototypes/`
    subfolder, same episodes) replace that method's."""
    results = json.loads((out / "results.json").read_text())["results"]
    rerun = out / "enroll_prototypes" / "results.json"
    if rerun.is_file():
        extra = json.loads(rerun.read_text())["results"]
        results = [r for r in results if r["method"] != "enroll_prototypes"] + extra
    return results


def table(results: list[dict], ks: list[int]) -> list[str]:
    """Rows method, columns K (UA %), then the paired K8 − K0 gain of icl."""
    cells = {(r["method"], r["k"]): r for r in results}
    lines = ["| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for method in METHOD_ORDER:
        if any((method, k) in cells for k in ks):
            lines.append(f"| {method} | " + " | ".join(
                f"{100 * cells[(method, k)]['ua']:.1f}" if (method, k) in cells else "–" for k in ks) + " |")
    top = max(ks)
    best = max((cells[(m, top)]["ua"], m) for m in CONVENTIONAL if (m, top) in cells)
    icl = cells.get(("icl", top))
    gain = icl.get("ua_gain_ci") if icl else None
    lines.append("")
    lines.append(f"ICL K={top}: {100 * icl['ua']:.1f}; best conventional at K={top}: {100 * best[0]:.1f} ({best[1]}); "
                 f"ICL − best = {100 * (icl['ua'] - best[0]):+.1f}."
                 + (f" Paired ICL K{top} − K{min(ks)}: {100 * icl['ua_gain']:+.1f} [{100 * gain[0]:+.1f}, {100 * gain[1]:+.1f}]."
                    if gain else " Paired gain: not defined (different queries per K)."))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="The release run's output_dir (with folds/).")
    parser.add_argument("--episodes_per_speaker", type=int, default=10)
    parser.add_argument("--unlabelled", type=int, default=16, help="U for the second evaluation (0 = skip it).")
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--corpora", default=None, help="Only these held-out corpora (comma-separated).")
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    parser.add_argument("--output_dir", default="outputs/leave-one-corpus-out")
    parser.add_argument("--model_card", default=None, help="Also put the tables into this model folder's card "
                        "(README.md), as its leave-one-corpus-out evaluation block (e.g. outputs/real-speech/final).")
    args = parser.parse_args()
    run = Path(args.run)
    # The release run's corpora: its export's settings, or (while it still trains) its folds'.
    exported = run / "final" / "training_args.json"
    if exported.is_file():
        settings = json.loads(exported.read_text())
        specs = parse_corpora(settings["corpus"], settings["data_dir"])
    else:
        specs = {}
        for fold in sorted((run / "folds").glob("*/final/training_args.json")):
            settings = json.loads(fold.read_text())
            specs.update(dict(parse_corpora(settings["corpus"], settings["data_dir"])))
        specs = sorted(specs.items())
    wanted = set(args.corpora.split(",")) if args.corpora else {name for name, _ in specs}
    report = []
    for corpus, folder in specs:
        if corpus not in wanted:
            continue
        others = [(name, path) for name, path in specs if name != corpus]
        nested = json.loads((run / "folds" / corpus / "nested_route_weights.json").read_text())
        report += [f"## Held out: {corpus}", "", "Route weights (chosen without it): "
                   + "; ".join(f"K={k}: " + ", ".join(f"{n} {w:.1f}" for n, w in ws.items() if w)
                               for k, ws in nested["weights"].items()), ""]
        for unlabelled in sorted({0, args.unlabelled}):
            out = run_eval(run, corpus, str(folder), others, args, unlabelled)
            results = results_of(out)
            report += [f"### {corpus}, every speaker, U = {unlabelled} unlabelled utterances ({out})", "",
                       *table(results, args.k), ""]
    text = "\n".join(report) + "\n"
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "summary.md").write_text(text)
    if args.model_card:
        write_card_block(Path(args.model_card) / "README.md", text)
    print(text)


CARD_KEY = "leave one corpus out"


def write_card_block(card: Path, text: str) -> None:
    """Put ``text`` (headings one level down) into the card as its ``<!-- eval: leave one corpus out -->``
    block: replacing that block, else after the last evaluation block, else in place of the
    empty-evaluation placeholder. eval.py keeps every block when it rewrites the card. Written
    to a temporary file, then renamed."""
    if not card.is_file():
        raise ValueError(f"--model_card: no model card at {card}; pass the exported model folder (with README.md).")
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in text.strip().splitlines())
    block = (f"<!-- eval: {CARD_KEY} -->\n### Leave one corpus out: each fold model on a corpus it never heard\n\n"
             "Fold models of this run (meta-trained without the corpus), route weights chosen on the other folds, "
             f"conventional methods fitted on the other corpora (bench/leave_one_corpus_out.py).\n\n{body}\n<!-- /eval -->")
    old = card.read_text(encoding="utf-8")
    pattern = re.compile(rf"<!-- eval: {re.escape(CARD_KEY)} -->.*?<!-- /eval -->", flags=re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    elif "<!-- /eval -->" in old:
        head, _, tail = old.rpartition("<!-- /eval -->")
        new = f"{head}<!-- /eval -->\n\n{block}{tail}"
    elif "[No evaluation results recorded yet: run eval.py.]" in old:
        new = old.replace("[No evaluation results recorded yet: run eval.py.]", block, 1)
    else:
        raise ValueError(f"{card} has no evaluation section to add the block to; rewrite it with eval.py --update_model_card.")
    temporary = card.with_name(card.name + ".tmp")
    temporary.write_text(new, encoding="utf-8")
    temporary.replace(card)


if __name__ == "__main__":
    main()
