"""What train.py's validation costs against its training, and whether its bounded validation chooses as the full one.

    python benchmarks/validation_cost.py                              # cost: 100,000 synthetic rows, 1,500 steps
    python benchmarks/validation_cost.py --checkpoint-choice xquad    # choice: all-MiniLM-L6-v2, 60 steps
    python benchmarks/validation_cost.py --checkpoint-choice sample --max-queries 50 --distractors 100

Cost: a seeded synthetic EN/DE Question/Answer CSV of 100,000 rows (a question and its translation share an id
and each has its own answer, as in the tutorial's data) is split by split_data.py (GROUP_COLUMN=id: 80,000
training pairs), and train.py trains the tests' tiny model (tests/conftest.py's build_tiny_model, built here, no
download) with its defaults: batch 24, MAX_STEPS=1500, evaluated at step 0 and every EVAL_STEPS=500 steps. Its
validation seconds are the eval_runtime of every evaluation the trainer logs, its training seconds the
train_runtime minus those. To save CPU, the recipe's evaluator (validation answers only) and the previous one (every
training and validation answer, all validation questions) do not train: each is timed for one evaluation of the
trained model (trainer.evaluate: the validation loss on its pairs and the retrieval evaluator), multiplied by the
number of evaluations. The tutorial's full run (10,000 steps, evaluated at the start and every 500 steps) is
estimated from the measured seconds per step and per evaluation. Saved to benchmarks/results/validation_cost.md/json.

Choice: one train.py run on XQuAD sentences (GROUP_COLUMN=id) or the bundled sample (GROUP_COLUMN=faq_id) with a
checkpoint every EVAL_STEPS, its own validation bounded by --max-queries and --distractors; then every checkpoint
is scored on the full validation (every validation question against every training and validation answer). The
check: the checkpoint the bounded scores choose is the full scores' choice, or within 0.005 NDCG@10 of it. Saved to
benchmarks/results/checkpoint_choice.md/json.
"""

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from run import (
    DATASETS,
    RESULTS_DIR,
    git_commit,
    library_versions,
    load_train,
    machine_info,
    machine_line,
    markdown_table,
    minilm_folder,
    run_script,
    trainer_logs,
    write_atomic,
)
from split_scale import WORDS

REPO = Path(__file__).resolve().parents[1]
ROWS = 100_000  # 80,000 training pairs after split_data.py's default 80/10/10
MAX_STEPS = 1500
FULL_RUN_STEPS = 10_000  # the tutorial's run: ~80,000 pairs, 3 epochs at batch 24
METRIC = "eval_validation_cosine_ndcg@10"
TOLERANCE = 0.005  # the NDCG@10 difference between two checkpoint choices that counts as the same choice
GERMAN_WORDS = [
    "Passwort", "Laptop", "Drucker", "Urlaub", "Spesen", "Ausweis", "Monitor", "Vertrag", "Rechnung", "Konto",
    "Netzwerk", "Besprechung", "Raum", "Parkplatz", "Gehalt", "Schicht", "Schulung", "Lizenz", "Telefon", "Postfach",
    "Kalender", "Reise", "Budget", "Einarbeitung", "Tastatur",
]  # fmt: skip


def main() -> None:
    args = arguments()
    started_at = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="validation-cost-") as temporary:
        workdir = Path(temporary)
        if args.checkpoint_choice:
            report = checkpoint_choice(args, workdir)
            name = "checkpoint_choice"  # which data it checked is in the report
        else:
            report = validation_cost(workdir)
            name = "validation_cost"
    report |= {
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS_DIR / f"{name}.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    markdown = (choice_markdown if args.checkpoint_choice else cost_markdown)(report)
    print()
    print(markdown)
    write_atomic(RESULTS_DIR / f"{name}.md", markdown)
    print(f"saved {RESULTS_DIR / name}.md and .json")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-choice", choices=("xquad", "sample"), help="the checkpoint-choice check instead")
    parser.add_argument("--model", help="the model of the choice check (default: all-MiniLM-L6-v2, no prompts)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the choice check")
    parser.add_argument("--eval-steps", type=int, default=10, help="checkpoint interval of the choice check")
    parser.add_argument("--max-queries", type=int, help="VALIDATION_MAX_QUERIES of the choice check's run")
    parser.add_argument("--distractors", type=int, help="VALIDATION_DISTRACTORS of the choice check's run")
    return parser.parse_args()


train = load_train()


# --- cost ---


def validation_cost(workdir: Path) -> dict:
    # 1. The synthetic CSV, split as a user splits it, and the tiny model, its vocabulary learnt from the data
    data = workdir / "data" / "qa_data.csv"
    data.parent.mkdir()
    frame = synthetic_frame(ROWS)
    frame.to_csv(data, index=False)
    split = run_script("split_data.py", workdir, {"GROUP_COLUMN": "id"})
    model = tiny_model(workdir, frame)

    # 2. train.py with its defaults (its bounded validation), the step budget and a saved result either way
    settings = {"MODEL_NAME": str(model), "MAX_STEPS": str(MAX_STEPS), "REQUIRE_VALIDATION_GAIN": "false"}
    run = run_script("train.py", workdir, settings, allowed=(0,))
    logs = trainer_logs(run.output)
    evaluations = [log["eval_runtime"] for log in logs if "eval_runtime" in log]
    train_runtime = next(log["train_runtime"] for log in logs if "train_runtime" in log)
    training_seconds = train_runtime - sum(evaluations)
    printed = [line for _, line in run.output if line.startswith(("validation corpus:", "validation queries:"))]

    # 3. One evaluation of each evaluator on the trained model, in this process
    splits = {
        kind: train.read_split(workdir / "data" / f"qa_{kind}_set.csv", kind) for kind in ("training", "validation")
    }
    timed = one_evaluation_each(workdir / "output" / "final", splits["training"], splits["validation"])

    evaluators = {}
    for name, one in timed.items():
        logged = name == "bounded (new default)"
        seconds = sum(evaluations) if logged else one["seconds"] * len(evaluations)
        evaluators[name] = one | {
            "validation_seconds_1500": round(seconds, 1),
            "from": "the trainer's logs" if logged else f"one evaluation x {len(evaluations)}",
            "ratio_1500": round(seconds / training_seconds, 3),
            "ratio_10000": round(
                full_run_evaluations() * (np.mean(evaluations) if logged else one["seconds"])
                / (FULL_RUN_STEPS * training_seconds / MAX_STEPS),
                3,
            ),
        }  # fmt: skip
    return {
        "kind": "validation_cost",
        "rows": ROWS,
        "split_counts": {kind: len(frame) for kind, frame in splits.items()},
        "split_seconds": round(split.seconds, 1),
        "max_steps": MAX_STEPS,
        "train_runtime": round(train_runtime, 1),
        "training_seconds": round(training_seconds, 1),
        "seconds_per_step": round(training_seconds / MAX_STEPS, 4),
        "evaluation_runtimes": [round(seconds, 2) for seconds in evaluations],
        "train_py_lines": printed,
        "evaluators": evaluators,
    }


def full_run_evaluations() -> int:
    """Evaluations of the tutorial's full run at train.py's EVAL_STEPS: the one at the start and one every interval."""
    return 1 + FULL_RUN_STEPS // train.EVAL_STEPS


def synthetic_frame(rows: int, seed: int = 0):
    """FAQ-like EN/DE rows: a question and its translation share an id; every question has its own answer of 25 to
    55 words, as the tutorial's pairs do."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    item = np.arange(rows) // 2
    words = {"en": np.array(WORDS), "de": np.array(GERMAN_WORDS)}
    questions, answers, languages = [], [], []
    for i in range(rows):
        language = "en" if i % 2 == 0 else "de"
        w = words[language][rng.integers(0, len(WORDS), 3 + rng.integers(20, 50))]
        filler = " ".join(w[3:])
        if language == "en":
            questions.append(f"How do I handle the {w[0]} for the {w[1]} in case {item[i]}?")
            answers.append(f"Case {item[i]}: open the {w[2]} portal, choose the {w[0]} form and then {filler}.")
        else:
            questions.append(f"Wie bearbeite ich {w[0]} für {w[1]} im Fall {item[i]}?")
            answers.append(f"Fall {item[i]}: Öffne das Portal {w[2]}, wähle das Formular {w[0]} und dann {filler}.")
        languages.append(language)
    return pd.DataFrame({"Question": questions, "Answer": answers, "language": languages, "id": "q" + item.astype(str)})


def tiny_model(workdir: Path, frame) -> Path:
    """The tests' tiny 2-layer model, its WordPiece vocabulary learnt from a sample of the data and the prompts."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model

    sample = frame.sample(n=min(len(frame), 5000), random_state=0)
    return build_tiny_model(workdir / "tiny", [*sample["Question"], *sample["Answer"], "query: passage:"])


def one_evaluation_each(model_path: Path, training, validation) -> dict:
    """Seconds of one trainer.evaluate() (validation loss and retrieval evaluator) of each evaluator, on one model."""
    import pandas as pd
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    s = SimpleNamespace(**train.setting_defaults())
    bounded = train.scored_validation(s, training, validation, verbose=False)
    everything = pd.concat([training["Answer"], validation["Answer"]])
    evaluators = {
        "recipe (validation answers only)": (validation, validation["Answer"]),
        "previous (every training and validation answer)": (validation, everything),
        "bounded (new default)": (bounded.pairs, bounded.corpus),
    }
    model = SentenceTransformer(str(model_path))
    results = {}
    for name, (pairs, corpus) in evaluators.items():
        dataset = Dataset.from_dict({"anchor": list(pairs["Question"]), "positive": list(pairs["Answer"])})
        arguments = SentenceTransformerTrainingArguments(
            output_dir=str(model_path.parent / "evaluate"),
            per_device_eval_batch_size=s.BATCH_SIZE,
            use_cpu=True,
            report_to="none",
            prompts=train.training_prompts(s.QUERY_PROMPT, s.PASSAGE_PROMPT, dataset.column_names),
        )
        evaluator = train.grouped_ir_evaluator(pairs, corpus, "validation", s.QUERY_PROMPT, s.PASSAGE_PROMPT)
        trainer = SentenceTransformerTrainer(
            model=model,
            args=arguments,
            eval_dataset=dataset,
            loss=train.training_loss(model, s, world_size=1),
            evaluator=evaluator,
        )
        print(f"  one evaluation: {name}", flush=True)
        started = time.perf_counter()
        metrics = trainer.evaluate()
        results[name] = {
            "queries": len(evaluator.queries),
            "corpus_documents": len(evaluator.corpus),
            "loss_pairs": len(dataset),
            "seconds": round(time.perf_counter() - started, 2),
            "ndcg@10": round(metrics[METRIC], 4),
        }
    return results


def cost_markdown(report: dict) -> str:
    rows = [
        [name, e["queries"], f"{e['corpus_documents']:,}", f"{e['loss_pairs']:,}", e["seconds"],
         f"{e['validation_seconds_1500']} ({e['from']})", f"{e['ratio_1500']:.3f}", f"{e['ratio_10000']:.3f}"]
        for name, e in report["evaluators"].items()
    ]  # fmt: skip
    counts = report["split_counts"]
    lines = [
        f"# Validation cost inside train.py, {report['date']}",
        "",
        f"- machine: {machine_line(report['machine'])}; OMP_NUM_THREADS={report['omp_num_threads']}; git "
        f"{report['git_commit']}",
        f"- data: {report['rows']:,} synthetic EN/DE rows, split by split_data.py (GROUP_COLUMN=id, "
        f"{report['split_seconds']} s): {counts['training']:,} training, {counts['validation']:,} validation pairs",
        f"- train.py, the tests' tiny model, defaults (batch 24, EVAL_STEPS={train.EVAL_STEPS}, eval at step 0), "
        f"MAX_STEPS={report['max_steps']}: train_runtime {report['train_runtime']} s, of which training "
        f"{report['training_seconds']} s ({report['seconds_per_step']} s/step) and validation "
        f"{sum(report['evaluation_runtimes']):.1f} s ({', '.join(map(str, report['evaluation_runtimes']))})",
        *(f"- train.py printed: `{line}`" for line in report["train_py_lines"]),
        f"- the recipe's and the previous evaluators did not train: one evaluation of the trained model each "
        f"(trainer.evaluate, in one process), times {len(report['evaluation_runtimes'])} evaluations; the "
        f"{FULL_RUN_STEPS:,}-step estimate is {full_run_evaluations()} evaluations x seconds per evaluation / "
        f"({FULL_RUN_STEPS:,} x seconds per training step)",
        "",
    ]
    lines += markdown_table(
        ["evaluator", "queries", "corpus", "loss pairs", "s per evaluation", f"validation s at {MAX_STEPS:,} steps",
         f"validation / training at {MAX_STEPS:,}", f"estimated at {FULL_RUN_STEPS:,}"],
        rows,
    )  # fmt: skip
    return "\n".join(lines) + "\n"


# --- checkpoint choice ---


def checkpoint_choice(args: argparse.Namespace, workdir: Path) -> dict:
    # 1. Split the dataset as the README does, then one run that keeps a checkpoint per evaluation
    spec = DATASETS[args.checkpoint_choice]
    run_script("split_data.py", workdir, {"DATA_PATH": str(spec["path"]), "GROUP_COLUMN": spec["group"]})
    model = args.model or minilm_folder()
    prompts = {} if args.model else {"QUERY_PROMPT": "", "PASSAGE_PROMPT": ""}
    caps = {"VALIDATION_MAX_QUERIES": args.max_queries, "VALIDATION_DISTRACTORS": args.distractors}
    caps = {name: value for name, value in caps.items() if value is not None}
    settings = {
        "MODEL_NAME": model, **prompts, "MAX_STEPS": str(args.steps), "EVAL_STEPS": str(args.eval_steps),
        "SAVE_TOTAL_LIMIT": str(args.steps // args.eval_steps + 1), "REQUIRE_VALIDATION_GAIN": "false",
        **{name: str(value) for name, value in caps.items()},
    }  # fmt: skip
    run = run_script("train.py", workdir, settings)
    printed = [line for _, line in run.output if line.startswith(("validation corpus:", "validation queries:"))]

    # 2. The bounded scores train.py logged, and every checkpoint's score on the full validation
    checkpoints = sorted((workdir / "output" / "checkpoints").glob("checkpoint-*"), key=train.checkpoint_step)
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    bounded = {entry["step"]: entry[METRIC] for entry in history if METRIC in entry}
    s = SimpleNamespace(**train.setting_defaults() | prompts)
    training = train.read_split(workdir / "data" / "qa_training_set.csv", "training")
    validation = train.read_split(workdir / "data" / "qa_validation_set.csv", "validation")
    full_evaluator = train.grouped_ir_evaluator(
        validation, list(training["Answer"]) + list(validation["Answer"]), "validation", s.QUERY_PROMPT,
        s.PASSAGE_PROMPT,
    )  # fmt: skip
    candidates = {0: model} | {train.checkpoint_step(checkpoint): checkpoint for checkpoint in checkpoints}
    full = {step: score(path, full_evaluator) for step, path in candidates.items()}

    # 3. The two choices among the checkpoints (step 0 is the base model, the bar, not a candidate)
    steps = [step for step in full if step > 0]
    by_bounded = max(steps, key=lambda step: bounded[step])
    by_full = max(steps, key=lambda step: full[step])
    return {
        "kind": "checkpoint_choice",
        "data": str(spec["path"]),
        "model": model,
        "settings": settings,
        "train_py_lines": printed,
        "scores": {step: {"bounded": round(bounded[step], 4), "full": round(full[step], 4)} for step in full},
        "chosen_by_bounded": by_bounded,
        "chosen_by_full": by_full,
        "full_score_difference": round(full[by_full] - full[by_bounded], 4),
        "agrees": by_bounded == by_full or full[by_full] - full[by_bounded] <= TOLERANCE,
    }


def score(model_path, evaluator) -> float:
    from sentence_transformers import SentenceTransformer

    print(f"  scoring {model_path} on the full validation", flush=True)
    return evaluator(SentenceTransformer(str(model_path)))[METRIC.removeprefix("eval_")]


def choice_markdown(report: dict) -> str:
    rows = [[step, s["bounded"], s["full"]] for step, s in report["scores"].items()]
    verdict = "agree" if report["agrees"] else "DISAGREE"
    lines = [
        f"# Checkpoint choice, bounded vs full validation, {report['date']}",
        "",
        f"- data: `{report['data']}`; model `{report['model']}`; git {report['git_commit']}",
        "- train.py settings: "
        + " ".join(
            f"{name}={value}" for name, value in report["settings"].items() if name != "MODEL_NAME"
        ),  # fmt: skip
        *(f"- train.py printed: `{line}`" for line in report["train_py_lines"]),
        f"- chosen by the bounded validation: step {report['chosen_by_bounded']}; by the full validation: step "
        f"{report['chosen_by_full']}; full NDCG@10 difference {report['full_score_difference']:+.4f}: {verdict} "
        f"(same step, or within {TOLERANCE})",
        "",
    ]
    lines += markdown_table(["step (0 = base)", "bounded NDCG@10 (train.py's log)", "full NDCG@10"], rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
