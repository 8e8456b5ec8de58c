"""Benchmark of train.py's general guard: what fine-tuning costs outside its domain, with and without the guard.

    python benchmarks/general.py                      # both directions, every share scored on the test halves
    python benchmarks/general.py --directions xquad-to-sample --shares guard   # one direction, two candidates

Two directions, multilingual-e5-small with the project's default prompts, one seed:
  sample-to-xquad: trained on the bundled sample (GROUP_COLUMN=faq_id, train.py's default 3 epochs), general set the
                   XQuAD EN/DE paragraph CSV (long answers);
  xquad-to-sample: trained on the XQuAD sentence CSV (GROUP_COLUMN=id, 79 steps), general set the bundled sample.
Never choose on a test file: each general set is cut at run time into a general-validation half, which train.py's
guard chooses on (GENERAL_VALIDATION_PATH), and a general-test half, which only eval.py scores (GENERAL_TEST_PATH).
The halves are cut by group (questions linked by a normalised question, an answer or the group column: an XQuAD
paragraph with its translation, an FAQ entry with its translation), seeded, in a temporary folder.
Then eval.py scores, on the in-domain test split and the general-test half, the unguarded result (the best
checkpoint: what train.py keeps without the guard), the guarded result (train.py's final model) and every other
candidate the guard weighed (the mixes of the best checkpoint with the base at MIX_WEIGHTS), so the trade-off between
in-domain gain and general drop is seen for each share (`--shares guard`: the first two only, ~4 eval.py runs less).
On 2 shared CPU cores a direction takes 30-60 minutes. The report is printed and saved to
benchmarks/results/general.md and general.json; a run of one direction keeps the other's earlier result there.
"""

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from run import (
    REPO,
    RESULTS_DIR,
    SPLIT_SEED,
    InputError,
    ScriptFailed,
    e5_small_folder,
    git_commit,
    library_versions,
    load_train,
    machine_info,
    machine_line,
    markdown_table,
    run_script,
    write_atomic,
)

SHARED = REPO.parent / "shared" / "data" / "xquad"
SAMPLE = {"path": REPO / "data" / "qa_data.csv", "group": "faq_id"}
DIRECTIONS = {
    "sample-to-xquad": {"train": SAMPLE, "max_steps": None,
                        "general": {"path": SHARED / "xquad_en_de_paragraph.csv", "group": "id"}},
    "xquad-to-sample": {"train": {"path": SHARED / "xquad_en_de_sentence.csv", "group": "id"}, "max_steps": 79,
                        "general": SAMPLE},
}  # fmt: skip
HALVES_SEED = 42  # which groups of a general set validate and which test
METRIC = "ndcg@10"
MAX_GENERAL_DROP = 0.01  # train.py's and eval.py's default
TABLE_HEADER = ["share", "candidate", "in-domain test Δ", "of unguarded gain", "general test Δ",
                "in-domain validation", "general validation", "eval.py gate"]  # fmt: skip
MIN_GAIN_KEPT = 0.8  # the target: the guarded result keeps >= 80% of the unguarded in-domain test gain


train = load_train()


def main() -> None:
    # 1. Model and data: fail in a second when something is missing.
    args = arguments()
    model = e5_small_folder(args.model)
    directions = {name: DIRECTIONS[name] for name in args.directions.split(",")}
    for spec in directions.values():
        for part in ("train", "general"):
            if not spec[part]["path"].is_file():
                raise InputError(f"{spec[part]['path']} not found (the benchmark reads it from there)")
    started_at, machine = dt.datetime.now(dt.UTC), machine_info()
    print(f"general-guard benchmark: {', '.join(directions)}; machine: {machine_line(machine)}")

    # 2. Per direction: split, cut the general halves, train with the guard, score every candidate on the test halves.
    report = {"date": started_at.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine, "versions": library_versions(),
              "git_commit": git_commit(), "model": model, "split_seed": SPLIT_SEED, "halves_seed": HALVES_SEED,
              "max_general_drop": MAX_GENERAL_DROP, "directions": earlier_directions()}  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="benchmark-general-") as temporary:
        for name, spec in directions.items():
            workdir = Path(temporary) / name
            workdir.mkdir()
            result = direction_result(spec, workdir, model, args.shares == "all")
            report["directions"][name] = result | {"date": report["date"], "git_commit": report["git_commit"]}
            report["wall_seconds"] = round(time.perf_counter() - started)
            save(report)  # after each direction: a later failure must not cost the figures so far

    # 3. The report.
    print()
    print(report_markdown(report))
    print(f"saved {RESULTS_DIR / 'general.md'}, {RESULTS_DIR / 'general.json'}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the multilingual-e5-small folder (default: as benchmarks/run.py)")
    parser.add_argument("--directions", default=",".join(DIRECTIONS), help=f"comma-separated, of {list(DIRECTIONS)}")
    parser.add_argument(
        "--shares",
        choices=("all", "guard"),
        default="all",
        help="score every candidate share on the test halves, or the unguarded and the kept only",
    )
    return parser.parse_args()


def earlier_directions() -> dict:
    """The directions of the last saved report, which a run of other directions keeps."""
    saved = RESULTS_DIR / "general.json"
    if not saved.is_file():
        return {}
    report = json.loads(saved.read_text(encoding="utf-8"))
    stamp = {"date": report["date"], "git_commit": report["git_commit"]}
    return {name: stamp | result for name, result in report["directions"].items()}


def direction_result(spec: dict, workdir: Path, model: str, every_share: bool) -> dict:
    """Split, cut the general set's halves, train with the guard, then eval.py on each candidate."""
    split = {"DATA_PATH": str(spec["train"]["path"]), "GROUP_COLUMN": spec["train"]["group"], "SEED": str(SPLIT_SEED)}
    run_script("split_data.py", workdir, split)
    halves = general_halves(spec["general"], workdir / "general")
    training = {"MODEL_NAME": model, "GENERAL_VALIDATION_PATH": str(halves["validation"])}
    if spec["max_steps"]:
        training["MAX_STEPS"] = str(spec["max_steps"])
    trained = run_script("train.py", workdir, training, allowed=(0, 1))
    final = workdir / "output" / "final"
    lineage = json.loads((final / "lineage.json").read_text(encoding="utf-8")) if trained.exit_code == 0 else None
    best = workdir / best_checkpoint(trained)
    chosen = lineage["general_guard"]["fine_tuned_share"] if lineage else None
    candidates = {1.0: best} | {share: None for share in train.MIX_WEIGHTS if every_share or share == chosen}
    for share in candidates:
        if share == chosen:
            candidates[share] = final  # train.py's own final model, with its lineage (eval.py checks the halves on it)
        elif candidates[share] is None:
            candidates[share] = mixed_model(model, best, share, workdir / f"mix-{share:g}")
    scored = {share: scores(workdir, model, path, halves["test"]) for share, path in sorted(candidates.items())}
    return {
        "train": str(spec["train"]["path"]), "general": str(spec["general"]["path"]),
        "general_halves": {part: {"rows": len(pd.read_csv(path)), "sha256": train.sha256(path)}
                           for part, path in halves.items()},
        "train_exit_code": trained.exit_code, "train_seconds": round(trained.seconds),
        "guard_lines": guard_lines(trained),
        "guard": lineage and lineage["general_guard"], "validation_scores": lineage and lineage["mix_with_base"],
        "chosen_share": chosen, "candidates": {f"{share:g}": figures for share, figures in scored.items()},
    }  # fmt: skip


def general_halves(spec: dict, folder: Path) -> dict[str, Path]:
    """The general set cut into a validation and a test half, whole groups each (split_data.py's groups: linked by a
    normalised question, an answer or the group column), in a seeded order."""
    frame = pd.read_csv(spec["path"], dtype=str, keep_default_na=False)
    questions = frame["Question"].map(train.normalised_question)
    groups = train.group_ids(questions, frame["Answer"], train.group_values(frame[spec["group"]]))
    order = np.random.default_rng(HALVES_SEED).permutation(groups.max() + 1)
    in_validation = order[groups] % 2 == 0
    folder.mkdir()
    paths = {half: folder / f"{spec['path'].stem}-{half}.csv" for half in ("validation", "test")}
    frame[in_validation].to_csv(paths["validation"], index=False)
    frame[~in_validation].to_csv(paths["test"], index=False)
    return paths


def best_checkpoint(trained) -> str:
    """The best checkpoint's path, from train.py's validation line (also printed when the guard kept nothing)."""
    line = next(line for _, line in trained.output if line.startswith("validation NDCG@10:"))
    return line.split("best checkpoint ", 1)[1].split("(", 1)[1].split(")", 1)[0]


def guard_lines(trained) -> list[str]:
    """train.py's lines from its validation line to its result: the candidates' scores and the guard's choice."""
    lines = [line for _, line in trained.output]
    start = next(i for i, line in enumerate(lines) if line.startswith("validation NDCG@10:"))
    ends = ("best checkpoint:", "final model saved", "earlier final model")
    return [line for line in lines[start:] if not line.startswith(ends) and "it/s]" not in line]


def mixed_model(base: str, best: Path, share: float, folder: Path) -> Path:
    """base + share * (best - base), saved as a model folder, as train.py's guard builds its candidates."""
    from sentence_transformers import SentenceTransformer

    base_weights = SentenceTransformer(base, device="cpu").state_dict()
    model = SentenceTransformer(str(best), device="cpu")
    model.load_state_dict(train.mixed_weights(base_weights, model.state_dict(), share))
    model.save(str(folder))
    return folder


def scores(workdir: Path, model: str, checkpoint: Path, general_test: Path) -> dict:
    """eval.py on one candidate: NDCG@10 base vs candidate on the in-domain test split and the general-test half."""
    output = f"eval-{checkpoint.name}"
    settings = {"MODEL_NAME": model, "CHECKPOINT_PATH": str(checkpoint), "OUTPUT_DIR": output,
                "GENERAL_TEST_PATH": str(general_test)}  # fmt: skip
    run_script("eval.py", workdir, settings, allowed=(0, 1))  # 1: a blocked gate, a result
    report = json.loads((workdir / output / "eval_report.json").read_text(encoding="utf-8"))
    (general,) = report["general"]["sets"]
    test, kept = report["metrics"], general["metrics"]
    return {
        "test_base": test["base"][METRIC], "test": test["finetuned"][METRIC],
        "test_gain": test["finetuned"][METRIC] - test["base"][METRIC],
        "general_base": kept["base"][METRIC], "general": kept["finetuned"][METRIC],
        "general_drop": kept["base"][METRIC] - kept["finetuned"][METRIC],
        "gate": "passed" if report["gate"]["passed"] else "blocked",
    }  # fmt: skip


def report_markdown(report: dict) -> str:
    lines = [
        "# General guard: in-domain gain vs general drop",
        "",
        f"{report['date']}, {machine_line(report['machine'])}, git {report['git_commit']}; multilingual-e5-small, "
        f"project default prompts, one seed; general sets cut into a validation half (chosen on) and a test half "
        f"(scored here), seed {report['halves_seed']}. NDCG@10 on the test halves from eval.py; "
        f"MAX_GENERAL_DROP={report['max_general_drop']}, target: general drop <= {report['max_general_drop']} while "
        f"keeping >= {MIN_GAIN_KEPT:.0%} of the unguarded in-domain gain.",
    ]
    for name, d in report["directions"].items():
        unguarded = d["candidates"]["1"]
        rows = []
        for share, c in sorted(d["candidates"].items(), key=lambda item: -float(item[0])):
            role = "unguarded (best checkpoint)" if share == "1" else "mix with the base"
            if d["chosen_share"] is not None and float(share) == d["chosen_share"]:
                role += ", **kept by the guard**"
            kept = c["test_gain"] / unguarded["test_gain"] if unguarded["test_gain"] > 0 else None
            validation = (d["validation_scores"] or {}).get("validation_scores", {}).get(f"{float(share)}")
            general_validation = (d["guard"] or {"sets": [{}]})["sets"][0].get("tried", {}).get(f"{float(share)}")
            kept_cell = "" if kept is None else f"{kept:.0%}"
            rows.append([share, role, f"{c['test_gain']:+.4f}", kept_cell, f"{-c['general_drop']:+.4f}",
                         fmt(validation), fmt(general_validation), c["gate"]])  # fmt: skip
        base = d["candidates"]["1"]
        guard = d["guard"]
        base_validation = guard["sets"][0]["base"] if guard else None
        lines += [
            "",
            f"## {name}: trained on `{Path(d['train']).name}`, general set `{Path(d['general']).name}`",
            "",
            f"Run {d['date']}, git {d['git_commit']}.",
            "",
            f"Base: in-domain test {base['test_base']:.4f}, general test {base['general_base']:.4f}, general "
            f"validation {fmt(base_validation)}; halves: validation {d['general_halves']['validation']['rows']} rows, "
            f"test {d['general_halves']['test']['rows']} rows; train.py exit {d['train_exit_code']}, "
            f"{d['train_seconds']} s; kept share: {d['chosen_share']}.",
            "",
            *markdown_table(TABLE_HEADER, rows),
            "",
            "train.py's lines:",
            "",
            "```text",
            *d["guard_lines"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def save(report: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS_DIR / "general.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(RESULTS_DIR / "general.md", report_markdown(report))


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ScriptFailed as failure:
        print(f"failed: {failure}", file=sys.stderr)
        sys.exit(1)
