"""Score the fine-tuned model against its base model and BM25 on the test split, and gate what ships.

Run from the repository root after split_data.py and train.py: `python eval.py`. It prints one line per metric,
`<metric>: base=<x> | fine-tuned=<x> | Δ=<±x> | bm25=<x>`, overall and per language, a verdict from a paired
bootstrap, the same for each general set named in GENERAL_TEST_PATH (other domains, each on its own answers), and the
gate's decision. Exit code: 0 = the gate passed, 1 = blocked (every reason printed), 2 = bad input.
Reads the three splits (DATA_DIR/qa_*_set.csv), the checkpoint (CHECKPOINT_PATH, default OUTPUT_DIR/final) with its
lineage.json, the base model and OUTPUT_DIR/registry.jsonl. Writes OUTPUT_DIR/eval_report.{json,md,png}, appends this
evaluation to the checkpoint's lineage.json, and last copies a passing model into OUTPUT_DIR/registry/v<NNNN>/ and
appends it to OUTPUT_DIR/registry.jsonl. OUTPUT_DIR/.lock keeps a second run out while this one runs.
"""

import codecs
import contextlib
import datetime as dt
import difflib
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import tokenize
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from dotenv import dotenv_values, load_dotenv

# --- Settings: edit here, or override any of them by name in .env or the environment (`--help` lists them) ---
DATA_DIR = "data"  # the folder of the three splits
TRAIN_PATH = ""  # "" -> DATA_DIR/qa_training_set.csv
VALIDATION_PATH = ""  # "" -> DATA_DIR/qa_validation_set.csv
TEST_PATH = ""  # "" -> DATA_DIR/qa_test_set.csv
OUTPUT_DIR = "output"  # train.py's output folder: the checkpoint, the reports and the registry
CHECKPOINT_PATH = ""  # "" -> OUTPUT_DIR/final, what train.py saved last
MODEL_NAME = "intfloat/multilingual-e5-base"  # the base model when lineage.json names none (as in train.py)
BASE_MODEL_NAME = ""  # "" -> the base model in the checkpoint's lineage.json, else MODEL_NAME
QUERY_PROMPT = "query: "  # E5's prefixes; set both to "" for models trained without prompts
PASSAGE_PROMPT = "passage: "  # ... the answers' prefix (the line above is the questions')
CORPUS_SCOPE = "all"  # "all": every distinct answer of the three splits, as a production index; "test": the recipe's
GROUP_IDENTICAL_ANSWERS = True  # False: the recipe's one corpus id per row (an identical copy of the answer is a miss)
LANGUAGE_COLUMN = "language"  # metrics per language when the test split has this column
BATCH_SIZE = 32  # texts per encoding batch
PRIMARY_METRIC = "ndcg@10"  # the metric of the verdict and the gate
MIN_IMPROVEMENT = 0.01  # the fine-tuned model must beat the base model by at least this on PRIMARY_METRIC
MAX_LANGUAGE_DROP = 0.01  # ... and no language may lose more than this on PRIMARY_METRIC
MAX_CONTAMINATION = 0.01  # largest fraction of test rows allowed to share a question or answer with training
GENERAL_TEST_PATH = ""  # Question/Answer CSVs from other domains, comma-separated, each scored on its own answers
MAX_GENERAL_DROP = 0.01  # no general set may lose more than this on PRIMARY_METRIC
BOOTSTRAP_RESAMPLES = 1000  # resamples of the paired bootstrap behind the verdict's 95% interval
BOOTSTRAP_SEED = 42  # seeds the bootstrap, so the same scores give the same interval
REPORT_METRICS = "ndcg@10,mrr@10,accuracy@1"  # the bar chart's panels and the per-language tables of eval_report.md

# What the settings block below allows: a rule per setting ('>0', '>=1', '[0,1)', '(0,1)', 'a|b', 'nonempty'; every
# float must be finite), checks across settings, the paths "" fills in, and the paths that must be different files.
LIMITS = {
    "DATA_DIR": "nonempty",
    "OUTPUT_DIR": "nonempty",
    "MODEL_NAME": "nonempty",
    "CORPUS_SCOPE": "all|test",
    "BATCH_SIZE": ">0",
    "PRIMARY_METRIC": "nonempty",
    "MIN_IMPROVEMENT": "[-1,1]",  # below 0: the fine-tuned model may lose that much (a smaller or faster model)
    "MAX_LANGUAGE_DROP": "[0,1]",
    "MAX_CONTAMINATION": "[0,1]",
    "MAX_GENERAL_DROP": "[0,1]",
    "BOOTSTRAP_RESAMPLES": ">=1",
    "BOOTSTRAP_SEED": ">=0",
}
CHECKS = []
DERIVED_PATHS = {
    "TRAIN_PATH": ("DATA_DIR", "qa_training_set.csv"),
    "VALIDATION_PATH": ("DATA_DIR", "qa_validation_set.csv"),
    "TEST_PATH": ("DATA_DIR", "qa_test_set.csv"),
    "CHECKPOINT_PATH": ("OUTPUT_DIR", "final"),
}
DISTINCT_PATHS = ("TRAIN_PATH", "VALIDATION_PATH", "TEST_PATH")
# How pandas, R, SQL and Excel exports write a missing value (as in split_data.py): such a group id links nothing.
missing_markers = {"nan", "na", "n/a", "#n/a", "<na>", "null"}

# --- settings block (identical in split_data.py, train.py, eval.py) ---
# The constants at the top are the settings: this block reads them from .env and the environment by each constant's
# type, fills in the empty paths of DERIVED_PATHS, refuses what LIMITS, CHECKS and DISTINCT_PATHS do not allow, answers
# --help and locks the output folder. It is copied on purpose, since the scripts share nothing but files on disk:
# tests/test_hostile.py fails when the three copies differ, so edit one and copy it to the other two.
ALL_SETTINGS = frozenset(
    "BASE_MODEL_NAME BATCH_SIZE BOOTSTRAP_RESAMPLES BOOTSTRAP_SEED CACHED_MINI_BATCH_SIZE CHECKPOINT_PATH "  # noqa: SIM905
    "CORPUS_SCOPE DATA_DIR DATA_PATH EARLY_STOPPING_PATIENCE EVAL_STEPS FP16 GENERAL_TEST_PATH "
    "GENERAL_VALIDATION_PATH GROUP_COLUMN GROUP_IDENTICAL_ANSWERS HARD_NEGATIVE_MARGIN "
    "HARD_NEGATIVE_MAX_SCORE LANGUAGE_COLUMN LEARNING_RATE LORA_ALPHA LORA_LEARNING_RATE LORA_RANK LOSS_SCALE "
    "MAX_CONTAMINATION MAX_GENERAL_DROP MAX_LANGUAGE_DROP MAX_STEPS MERGE_LORA MINE_HARD_NEGATIVES "
    "MIN_IMPROVEMENT MIX_WITH_BASE MODEL_NAME NEIGHBOUR_ROWS NO_DUPLICATE_BATCHES NUM_TRAIN_EPOCHS OUTPUT_DIR "
    "PASSAGE_PROMPT PRIMARY_METRIC QUERY_PROMPT REPORT_METRICS REQUIRE_VALIDATION_GAIN RESUME "
    "SAVE_TOTAL_LIMIT SCRUB_PII SEED SPLIT_MANIFEST_PATH SYMMETRIC_LOSS TEST_FRACTION TEST_PATH TRAIN_PATH "
    "TRAIN_WITH_DROPOUT USE_LORA VALIDATION_DISTRACTORS VALIDATION_FRACTION VALIDATION_MAX_QUERIES "
    "VALIDATION_PATH WARMUP_RATIO WEIGHT_DECAY".split()
)  # the settings of all three scripts, which one .env serves: any other name in it is likely a typo
LIBRARY_VARIABLES = (
    "WANDB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_", "TOKENIZERS_", "DATASETS_",
    "ACCELERATE_", "CUDA_", "CUDNN_", "PYTORCH_", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUBLAS_", "NCCL_",
    "GLOO_", "NVIDIA_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PYTHON", "TQDM_", "MPL",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE", "SSL_CERT_", "CURL_CA_BUNDLE", "LC_",
    "LANG", "TZ", "TMPDIR", "XDG_", "PATH", "HOME",
)  # fmt: skip  # prefixes of variables the libraries and Python read: .env may set them without a warning
LOCK_FILE, LOCK_HOLDER_FILE = ".lock", ".lock-holder.json"  # in the locked folder; removed when the run ends
run_started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
held_locks: dict = {}  # folder -> this process's FileLock on it


class InputError(Exception):
    """Bad input the user can fix: printed as one `error: ...` line, exit code 2."""


class Result(Exception):
    """A run that ended as it should, with an outcome that is not a success (e.g. nothing beat the base model): its
    message is printed as is to stdout, exit code 1."""


def settings() -> SimpleNamespace:
    """The constants at the top, each overridden by the environment variable of its name or its line in .env (the
    environment wins), parsed by the constant's type and checked against LIMITS, CHECKS and DISTINCT_PATHS."""
    from_dotenv = dotenv_names()
    values = {
        name: checked_value(name, default, os.environ.get(name), setting_source(name, from_dotenv))
        for name, default in setting_defaults().items()
    }
    for name, (folder, file_name) in DERIVED_PATHS.items():
        values[name] = values[name] or os.path.join(values[folder], file_name)
    for names, holds, allowed in CHECKS:
        if not holds(values):
            shown = " and ".join(f"{name}={values[name]!r}" for name in names)
            raise InputError(f"{shown} do not go together: {allowed}; change them in .env or the environment")
    seen = {}
    for name in DISTINCT_PATHS:
        other = seen.setdefault(Path(values[name]).resolve(), name)
        if other != name:
            raise InputError(
                f"{other}={values[other]!r} and {name}={values[name]!r} are the same file; one would overwrite the "
                f"other, so set them to different files"
            )
    return SimpleNamespace(**values)


def print_settings(s: SimpleNamespace) -> None:
    print("settings:")
    for name, value in vars(s).items():
        print(f"  {name} = {value}")


def setting_comments() -> dict[str, str]:
    """Each setting's name and comment, in order: the `NAME = value  # comment` lines from the `# --- Settings`
    line at the top of this file to the first blank line after it."""
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("# --- Settings")) + 1
    end = next((number for number in range(start, len(lines)) if not lines[number].strip()), len(lines))
    comments, name = {}, None
    for token in tokenize.generate_tokens(io.StringIO("\n".join(lines[start:end]) + "\n").readline):
        if token.type == tokenize.NAME and token.start[1] == 0:
            name = token.string
            comments[name] = ""
        elif token.type == tokenize.COMMENT and name:
            comments[name] = token.string.lstrip("#").strip()
    return comments


def setting_defaults() -> dict:
    """Each setting's value as the constant at the top of this file sets it."""
    return {name: globals()[name] for name in setting_comments()}


def setting_source(name: str, from_dotenv: set[str]) -> str:
    if name in from_dotenv:
        return "from .env"
    return "from the environment" if name in os.environ else f"the constant in {Path(__file__).name}"


def parsed_value(raw: str, default):
    """`raw` as the type of `default` (yes/no words for a bool), or None when it is not one."""
    if isinstance(default, bool):
        words = {"1": True, "true": True, "yes": True, "on": True}
        words |= {"0": False, "false": False, "no": False, "off": False}
        return words.get(raw.strip().lower())
    if not isinstance(default, int | float):
        return raw
    try:
        return type(default)(raw.strip())
    except ValueError:
        return None


def allowed_values(default, rule: str) -> str:
    """What a LIMITS rule allows, in words: '>0' for an int is 'a whole number above 0'."""
    kind = (
        "true or false (or 1/0, yes/no, on/off)" if isinstance(default, bool)
        else "a whole number" if isinstance(default, int)
        else "a finite number" if isinstance(default, float)
        else "a text"
    )  # fmt: skip
    if "|" in rule:
        return "one of " + ", ".join(repr(choice) for choice in rule.split("|"))
    if rule == "nonempty":
        return "a non-empty text"
    if interval := re.fullmatch(r"([\[(])(.+),(.+)([\])])", rule):
        low, high = interval[2], interval[3]
        if interval[1] == "[":
            return f"{kind} from {low} to " + (high if interval[4] == "]" else f"below {high}")
        return f"{kind} above {low} and " + (f"at most {high}" if interval[4] == "]" else f"below {high}")
    if bound := re.fullmatch(r"(>=|>|<=|<)(.+)", rule):
        words = {">": "above", ">=": "of at least", "<": "below", "<=": "of at most"}
        return f"{kind} {words[bound[1]]} {bound[2]}"
    return kind


def within(value, rule: str) -> bool:
    """Whether `value` keeps a LIMITS rule: '>0', '>=1', '[0,1)', '(0,1)', 'all|test', 'nonempty' or '' (any);
    a float must be finite in any case."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if "|" in rule:
        return value in rule.split("|")
    if rule == "nonempty":
        return bool(str(value).strip())
    if interval := re.fullmatch(r"([\[(])(.+),(.+)([\])])", rule):
        low, high = float(interval[2]), float(interval[3])
        above = value >= low if interval[1] == "[" else value > low
        return above and (value <= high if interval[4] == "]" else value < high)
    if bound := re.fullmatch(r"(>=|>|<=|<)(.+)", rule):
        limit = float(bound[2])
        return {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[bound[1]]
    return True


def checked_value(name: str, default, raw: str | None, source: str):
    """The setting's value: `raw` parsed by the type of `default` (or `default` when unset), if LIMITS allows it."""
    value = default if raw is None else parsed_value(raw, default)
    rule = LIMITS.get(name, "")
    if value is None or not within(value, rule):
        allowed = allowed_values(default, rule)
        raise InputError(
            f"{name}={default if raw is None else raw!r} ({source}) is not {allowed} (the default is {default!r}); "
            f"fix it in .env or the environment"
        )
    return value


def dotenv_names(path: str = ".env") -> set[str]:
    """Put the lines of .env into the environment where it has no value yet, and return the names it set. .env may be
    UTF-8 (with or without BOM) or UTF-16 or UTF-32 with a BOM. A name that no script and no library reads is
    warned about: a typo such as BATCHSIZE=64 would otherwise change nothing without a word."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}; make it a readable file or remove it") from None
    boms = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
            (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]  # fmt: skip
    encoding = next((name for bom, name in boms if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
        if "\x00" in text:
            raise UnicodeDecodeError(encoding, raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not readable as {encoding} ({error.reason} at byte {error.start}); save it as UTF-8 text"
        ) from None
    values = dotenv_values(stream=io.StringIO(text))
    for name in values:
        if name not in ALL_SETTINGS and not name.upper().startswith(LIBRARY_VARIABLES):
            close = difflib.get_close_matches(name.upper(), ALL_SETTINGS, n=1)
            print(
                f"warning: {path} sets {name}, which is not a setting of split_data.py, train.py or eval.py"
                + (f" (did you mean {close[0]}?)" if close else "")
                + "; it changes nothing"
            )
    new = {name for name, value in values.items() if value is not None and name not in os.environ}
    load_dotenv(stream=io.StringIO(text))
    return new


def help_text() -> str:
    """The module's docstring (what the script reads and writes), then every setting: its value in effect and where
    that comes from, its default, its comment and what is allowed."""
    script = Path(__file__).name
    lines = [
        (__doc__ or "").strip(),
        "",
        f"Settings are the constants at the top of {script}; override any of them by name in .env or the environment",
        f"(NAME=value python {script}). Each: its value in effect (source; default), its comment [what is allowed].",
        "",
    ]
    from_dotenv = dotenv_names()
    for name, comment in setting_comments().items():
        default, raw = globals()[name], os.environ.get(name)
        rule = LIMITS.get(name, "")
        value = default if raw is None else parsed_value(raw, default)
        if raw is None:
            shown = f"{default!r}  (default)"
        elif value is None or not within(value, rule):
            shown = f"{raw!r}  ({setting_source(name, from_dotenv)}, NOT VALID; default {default!r})"
        else:
            shown = f"{value!r}  ({setting_source(name, from_dotenv)}; default {default!r})"
        lines += [f"  {name} = {shown}", f"      {comment or '(no comment)'} [{allowed_values(default, rule)}]"]
    return "\n".join(lines)


def lock_folders(folders: list[str]) -> None:
    """Lock each output folder for this run until the process ends: a side file names the holder (pid, start time),
    a second run is refused with one line naming it. The OS drops the lock of a process that dies, so a killed run's
    lock is taken over. Under torchrun only rank 0 locks. The locks are released by release_locks()."""
    if os.environ.get("RANK", "0") != "0":
        return
    from filelock import FileLock, Timeout

    release_locks()  # those of an earlier main() in this process (tests call main() directly)
    for folder in dict.fromkeys(folders):
        lock, holder_file = FileLock(os.path.join(folder, LOCK_FILE)), Path(folder, LOCK_HOLDER_FILE)
        try:
            os.makedirs(folder, exist_ok=True)
            lock.acquire(blocking=False)
        except Timeout:
            raise InputError(
                f"{folder} is in use by another run ({lock_holder(holder_file)}); wait for it to end or stop it, or "
                f"point this run at another folder"
            ) from None
        except OSError as error:
            raise InputError(f"cannot lock {folder}: {error.strerror}; make it a writable folder") from None
        held_locks[folder] = lock
        if holder_file.exists():
            print(f"lock: {folder} was locked by a run that ended without releasing it ({lock_holder(holder_file)})")
        holder = {"script": Path(__file__).name, "pid": os.getpid(), "started_at": run_started_at}
        holder_file.write_text(json.dumps(holder) + "\n", encoding="utf-8")


def lock_holder(holder_file: Path) -> str:
    """The holder named in a lock's side file, as words."""
    try:
        holder = json.loads(holder_file.read_text(encoding="utf-8"))
        return f"{holder['script']}, pid {holder['pid']}, started {holder['started_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown: {holder_file} is missing or unreadable"


def release_locks() -> None:
    """Remove the lock files while still holding them (filelock retries a removed file), then release the locks."""
    for folder, lock in list(held_locks.items()):
        for name in (LOCK_HOLDER_FILE, LOCK_FILE):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
        lock.release()
        del held_locks[folder]


def releasing_locks(main):
    """main(), releasing the locks it took on any exit, also when it is called directly (the tests do)."""

    @functools.wraps(main)
    def main_releasing_locks():
        try:
            return main()
        finally:
            release_locks()

    return main_releasing_locks


def run(main) -> None:
    """The script as a command: `--help` (or `-h`) prints the help; another argument is refused, since settings are
    constants and environment variables; else main(). An InputError is one `error:` line and exit code 2; a Result
    is its message on stdout and exit code 1."""
    code = 0
    try:
        if sys.argv[1:] in (["--help"], ["-h"]):
            print(help_text())
        elif sys.argv[1:]:
            script = Path(__file__).name
            raise InputError(
                f"unknown argument {sys.argv[1]!r}: {script} takes no arguments but --help; its settings are the "
                f"constants at the top of {script}, overridden by name in .env or the environment "
                f"(NAME=value python {script})"
            )
        else:
            code = main() or 0
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except Result as result:
        print(result)
        code = 1
    finally:
        release_locks()
    sys.exit(code)


# --- end of settings block ---


@releasing_locks
def main() -> int:
    # 1. Settings; the output folder is writable and locked for this run; the registry is readable (before scoring).
    s = settings()
    print_settings(s)
    output_dir, checkpoint = Path(s.OUTPUT_DIR), Path(s.CHECKPOINT_PATH)
    ensure_writable(output_dir)
    lock_folders([s.OUTPUT_DIR])
    registry = read_registry(output_dir / "registry.jsonl")

    # 2. The checkpoint, its lineage and the base model it was trained from.
    lineage, base_name = checkpoint_lineage_and_base(checkpoint, output_dir, s)

    # 3. The test queries and the corpus they search, built the way train.py builds its validation evaluator.
    test = read_split(Path(s.TEST_PATH))
    queries, corpus, relevant_docs, query_languages = ir_inputs(
        test, corpus_frames(s, test), s.GROUP_IDENTICAL_ANSWERS, s.LANGUAGE_COLUMN
    )
    print(f"test: {len(test)} rows, {len(queries)} queries; corpus ({s.CORPUS_SCOPE}): {len(corpus)} documents")

    # 4. Contamination: did the test set leak into the training data behind this checkpoint? The general sets are
    #    read and checked here too, before any model is loaded.
    contamination = contamination_report(test, lineage, checkpoint, Path(s.TEST_PATH))
    print_contamination(contamination)
    general_sets = read_general_sets(s, test, lineage)

    # 5. Score base, fine-tuned and BM25 on the same queries and corpus; the same evaluator for both models.
    evaluator = test_evaluator(queries, corpus, relevant_docs, s.QUERY_PROMPT, s.PASSAGE_PROMPT, s.BATCH_SIZE)
    if s.PRIMARY_METRIC not in metric_names(evaluator):
        raise InputError(f"PRIMARY_METRIC={s.PRIMARY_METRIC!r} is not one of {metric_names(evaluator)}; fix it in .env")
    models, rankings = models_and_rankings(evaluator, checkpoint, base_name)
    scopes, scores = scope_scores(evaluator, rankings, query_languages)
    if len(scopes) == 1:
        print(f"per language: the test split has no {s.LANGUAGE_COLUMN!r} column, so overall metrics only")

    # 6. Print the recipe's lines, then a verdict from a paired bootstrap over queries on the primary metric; then
    #    the same, without BM25, for each general set (scored by the same two model objects).
    for line in metric_lines("test", scores, evaluator.score_function_names[0]):  # "cosine" for these models
        print(line)
    bootstrap, per_query = verdict_bootstrap(rankings, relevant_docs, evaluator.queries_ids, scores, s)
    general = general_report(general_sets, {"base": models["base"], "finetuned": models["finetuned"]}, s)
    print_general(general)

    # 7. The gate fails closed: NaN or inf anywhere blocks, and every reason to block is printed, not just the first.
    reasons = non_finite_reasons(models, rankings, scores, general) + gate_reasons(scores, contamination, s, general)
    print("\n".join(["gate: PASSED" if not reasons else "gate: BLOCKED"] + [f"  - {reason}" for reason in reasons]))

    # 8. Keep the result: lineage (history), reports (the latest evaluation), and last the registry (what may ship),
    #    so that a failure on the way leaves no half-registered version.
    report = evaluation_report(s, base_name, len(corpus), scopes, scores, bootstrap, per_query, contamination, general,
                               reasons)  # fmt: skip
    inside_registry = Path(s.OUTPUT_DIR, "registry").resolve() in checkpoint.resolve().parents
    append_evaluation(checkpoint, lineage, report, inside_registry)
    plan = registration_plan(checkpoint, output_dir, registry) if not reasons and not inside_registry else None
    report["registry"] = plan and {key: plan[key] for key in ("version", "path", "new")}
    write_reports(output_dir, report)
    if plan:
        register(plan, checkpoint, output_dir, lineage, report)
    return 0 if not reasons else 1


def models_and_rankings(evaluator, checkpoint: Path, base_name: str) -> tuple[dict, dict]:
    """The fine-tuned and the base model, and their and BM25's rankings of the test queries. The checkpoint loads
    first: a broken one should fail at once, not after the base model was scored."""
    models = {
        "finetuned": load_model(str(checkpoint), "CHECKPOINT_PATH"),
        "base": load_model(base_name, "BASE_MODEL_NAME"),
    }
    rankings = {system: model_rankings(evaluator, models[system]) for system in ("base", "finetuned")}
    rankings["bm25"] = bm25_rankings(evaluator)
    return models, rankings


def checkpoint_lineage_and_base(checkpoint: Path, output_dir: Path, s: SimpleNamespace) -> tuple[dict | None, str]:
    """The checkpoint's lineage.json (None for a model trained elsewhere) and the name of its base model; warns when
    the prompts differ from the ones it was trained with."""
    if not checkpoint.is_dir():
        raise InputError(f"checkpoint {checkpoint} not found; {existing_checkpoints_hint(output_dir)}")
    if checkpoint.resolve() == output_dir.resolve() or checkpoint.resolve() in output_dir.resolve().parents:
        raise InputError(
            f"CHECKPOINT_PATH={str(checkpoint)!r} holds OUTPUT_DIR={str(output_dir)!r}, where the reports and the "
            f"registry are written; set CHECKPOINT_PATH to the model folder (e.g. {output_dir / 'final'})"
        )
    lineage = read_lineage(checkpoint)
    base_name = s.BASE_MODEL_NAME or (lineage or {}).get("base_model", {}).get("name") or s.MODEL_NAME
    print(f"checkpoint: {checkpoint}" + (" (LoRA adapter, loaded on its base)" if (lineage or {}).get("lora") else ""))
    print(f"base model: {base_name}")
    trained_settings = (lineage or {}).get("settings", {})
    for name in ("QUERY_PROMPT", "PASSAGE_PROMPT"):
        trained = trained_settings.get(name)
        if trained is not None and trained != vars(s)[name]:
            print(f"warning: the model was trained with {name}={trained!r} but is scored with {vars(s)[name]!r}")
    return lineage, base_name


def corpus_frames(s: SimpleNamespace, test: pd.DataFrame) -> list[pd.DataFrame]:
    """The splits whose answers form the corpus: all three (CORPUS_SCOPE=all), or the test split only."""
    if s.CORPUS_SCOPE == "test":
        return [test]
    return [read_split(Path(path)) for path in (s.TRAIN_PATH, s.VALIDATION_PATH, s.TEST_PATH)]


def non_finite_reasons(models: dict, rankings: dict, scores: dict, general: dict | None = None) -> list[str]:
    """Reasons to block for NaN or inf in the models' weights, their similarity scores or any metric (of the test
    split and of the general sets): NaN compares false with every threshold, so without these a broken model could
    pass the rules below."""
    import torch

    names = {"finetuned": "the fine-tuned model", "base": "the base model", "bm25": "BM25"}
    reasons = []
    for system, model in models.items():
        tensors = [p for p in model.state_dict().values() if torch.is_floating_point(p)]
        broken = sum(not bool(torch.isfinite(p).all()) for p in tensors)
        if broken:
            reasons.append(f"{names[system]} has NaN or inf in {broken} of {len(tensors)} weight tensors")
    for system, ranking in rankings.items():
        broken = sum(not all(math.isfinite(hit["score"]) for hit in hits) for hits in ranking.values())
        if broken:
            reasons.append(f"{names[system]} gives NaN or inf similarity scores for {broken} of {len(ranking)} queries")
    scored = {"": scores} | {
        f" of general set {g['name']}": {"all": g["metrics"]} | g["by_language"]
        for g in (general or {}).get("sets", [])
    }
    for where, scope_systems in scored.items():
        for scope, systems in scope_systems.items():
            for system, metrics in systems.items():
                bad = [m for m, value in metrics.items() if not math.isfinite(value)] if system in names else []
                if bad:
                    what = f"{names[system]}'s {', '.join(bad)} on {scope} queries{where}"
                    reasons.append(f"{what} are not finite numbers")
    return reasons


def evaluation_report(s: SimpleNamespace, base_name: str, documents: int, scopes: dict, scores: dict, bootstrap: dict,
                      per_query: dict, contamination: dict, general: dict, reasons: list[str]) -> dict:  # fmt: skip
    """What eval_report.json records and lineage.json and the registry take their entries from."""
    language_of = {qid: scope for scope, qids in scopes.items() if scope != "all" for qid in qids}
    return {
        "evaluated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "checkpoint": s.CHECKPOINT_PATH,
        "base_model": base_name,
        "corpus": {"scope": s.CORPUS_SCOPE, "documents": documents, "grouped": s.GROUP_IDENTICAL_ANSWERS},
        "queries": len(scopes["all"]),
        "settings": vars(s),
        "gate": {
            "passed": not reasons,
            "reasons": reasons,
            "primary_metric": s.PRIMARY_METRIC,
            "min_improvement": s.MIN_IMPROVEMENT,
            "max_language_drop": s.MAX_LANGUAGE_DROP,
            "max_contamination": s.MAX_CONTAMINATION,
            "max_general_drop": s.MAX_GENERAL_DROP,
        },
        "metrics": scores["all"],
        "by_language": by_language(scopes, scores),
        "bootstrap": bootstrap,
        # the primary metric per test query (what the bootstrap resamples), for benchmarks that pool runs
        "per_query": {qid: scores | {"language": language_of.get(qid)} for qid, scores in per_query.items()},
        "contamination": contamination,
        "general": general,
        "registry": None,
    }


def ensure_writable(output_dir: Path) -> None:
    """Fail before the slow part when the reports could not be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(
            f"cannot write to OUTPUT_DIR {output_dir}: {e.strerror}; make it writable or set OUTPUT_DIR"
        ) from None


def existing_checkpoints_hint(output_dir: Path) -> str:
    """Which checkpoints do exist, as the second half of the missing-checkpoint error."""
    steps = sorted(output_dir.glob("checkpoints/checkpoint-*"), key=lambda p: (len(p.name), p.name))  # 500 < 1000
    found = sorted(output_dir.glob("final*")) + steps
    found += sorted(output_dir.glob("registry/v*"))
    found = [str(path) for path in found if path.is_dir()]
    if not found:
        return f"no checkpoints exist under {output_dir}; run train.py first or set CHECKPOINT_PATH to a model folder"
    return f"existing checkpoints: {', '.join(found)}; set CHECKPOINT_PATH in .env to one of them"


def read_lineage(checkpoint: Path) -> dict | None:
    """The lineage.json train.py wrote beside the model, or None for a model trained elsewhere."""
    path = checkpoint / "lineage.json"
    if not path.exists():
        return None
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); restore it from the training run") from None
    # The parts eval.py reads, and their types: valid JSON of another shape is as unusable as broken JSON.
    shape = {"base_model": dict, "settings": dict, "data": dict, "evaluations": list, "lora": bool}
    wrong = [
        key
        for key, kind in shape.items()
        if isinstance(lineage, dict) and not isinstance(lineage.get(key, kind()), kind)
    ]
    data = lineage.get("data", {}) if isinstance(lineage, dict) else {}
    wrong += [
        f"data.{key}"
        for key in ("train", "split_manifest")
        if isinstance(data, dict) and not isinstance(data.get(key, {}), dict)
    ]
    if not isinstance(lineage, dict) or wrong:
        what = ", ".join(wrong) if isinstance(lineage, dict) else f"a JSON {type(lineage).__name__}, not an object"
        raise InputError(
            f"{path} is not a lineage.json as train.py writes it ({what}); restore it from the training run"
        )
    return lineage


def read_split(path: Path, setting: str | None = None) -> pd.DataFrame:
    """A split CSV in the contract's format: Question and Answer columns, no empty cells.

    With `setting` (a general set named in GENERAL_TEST_PATH: a file split_data.py did not write) the Question and
    Answer columns may have any capitalisation, and each error says how to fix the file rather than to re-split.
    """
    own = setting is not None
    if not path.is_file():
        fix = f"fix {setting} (comma-separated CSV paths)" if own else "run split_data.py first or set its path"
        raise InputError(f"{path} not found; {fix}" + ("" if own else " (TEST_PATH, ...) in .env"))
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        detail = str(e).splitlines()[0]
        fix = "save it as UTF-8 (Excel: CSV UTF-8)" if own else "re-run split_data.py"
        raise InputError(f"{path} is not a readable UTF-8 CSV ({detail}); {fix}") from None
    if own:
        frame = frame.rename(columns={c: c.capitalize() for c in frame.columns if c.lower() in ("question", "answer")})
    for column in ("Question", "Answer"):
        if column not in frame.columns:
            fix = "name the columns Question and Answer in the first line" if own else "re-run split_data.py"
            raise InputError(f"{path} has no {column} column (columns: {list(frame.columns)}); {fix}")
        empty = frame.index[frame[column].str.strip() == ""]
        if len(empty):
            fix = "fill or delete such rows" if own else "re-run split_data.py, which drops such rows"
            raise InputError(f"{path} row {empty[0] + 2}: empty {column}; {fix}")
    if frame.empty:
        raise InputError(
            f"{path} has no rows; " + (f"add rows or fix {setting}" if own else "re-run split_data.py on more data")
        )
    return frame


def ir_inputs(
    test: pd.DataFrame, corpus_frames: list[pd.DataFrame], group: bool, language_column: str
) -> tuple[dict, dict, dict, dict]:
    """queries, corpus, relevant_docs for InformationRetrievalEvaluator, and each query's language.

    Grouped: one corpus id per distinct answer text and one query id per distinct question text, so that the
    identical copy of the right answer is the right answer. Ungrouped: the recipe's one id per row.
    Ids are zero-padded so that the evaluator's tie-break (ascending id) follows corpus order.
    """
    # Found regardless of case and surrounding spaces, as split_data.py finds its columns.
    wanted = language_column.strip().casefold()
    language_column = next((c for c in test.columns if wanted and c.strip().casefold() == wanted), language_column)
    has_language = language_column in test.columns
    queries, relevant_docs, languages = {}, {}, {}
    if group:
        answers = pd.concat([frame["Answer"] for frame in corpus_frames]).drop_duplicates().tolist()
        corpus = {f"d{i:07d}": answer for i, answer in enumerate(answers)}
        answer_ids = {answer: cid for cid, answer in corpus.items()}
        question_ids = {}
        for row in test.to_dict("records"):
            qid = question_ids.setdefault(row["Question"], f"q{len(question_ids):07d}")
            queries[qid] = row["Question"]
            relevant_docs.setdefault(qid, set()).add(answer_ids[row["Answer"]])
            languages.setdefault(qid, (row[language_column] or None) if has_language else None)
        return queries, corpus, relevant_docs, languages
    corpus = {}
    for split, frame in enumerate(corpus_frames):
        corpus |= {f"d{split}-{i:07d}": answer for i, answer in enumerate(frame["Answer"])}
    test_split = len(corpus_frames) - 1  # the test split is the last corpus frame in both scopes
    for i, row in enumerate(test.to_dict("records")):
        qid = f"q{i:07d}"
        queries[qid] = row["Question"]
        relevant_docs[qid] = {f"d{test_split}-{i:07d}"}
        languages[qid] = (row[language_column] or None) if has_language else None
    return queries, corpus, relevant_docs, languages


def normalised(text: str) -> str:
    """Casefolded, punctuation stripped, whitespace collapsed: 'How do I…?' == 'how do i'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def contamination_counts(test: pd.DataFrame, train: pd.DataFrame, group_column: str | None = None) -> dict:
    """How many test rows repeat a training question (exactly or normalised) or a training answer, or share a
    group id with training (GROUP_COLUMN of the split: a translation has other words but the same id)."""
    exact = test["Question"].isin(set(train["Question"]))
    near = test["Question"].map(normalised).isin(set(train["Question"].map(normalised)))
    answers = test["Answer"].map(normalised).isin(set(train["Answer"].map(normalised)))
    leaked = exact | near | answers
    counts = {
        "test_rows": len(test),
        "exact_duplicate_questions": int(exact.sum()),
        "normalised_duplicate_questions": int(near.sum()),
        "shared_answers": int(answers.sum()),
    }
    if group_column and group_column in test.columns and group_column in train.columns:
        test_groups = group_values(test[group_column])
        shared_groups = test_groups.ne("") & test_groups.isin(set(group_values(train[group_column])))
        leaked |= shared_groups
        counts |= {"group_column": group_column, "shared_group_ids": int(shared_groups.sum())}
    return counts | {"leaked_rows": int(leaked.sum()), "leaked_fraction": float(leaked.mean())}


def group_values(column: pd.Series) -> pd.Series:
    """A GROUP_COLUMN's values stripped, with the markers of a missing value ("NULL", "NA", ...) as "": as in
    split_data.py, they link nothing."""
    values = column.str.strip()
    return values.mask(values.str.casefold().isin(missing_markers), "")


def split_group_column(lineage: dict) -> str | None:
    """The GROUP_COLUMN the training split was made with, from the split manifest named in the lineage."""
    manifest_path = ((lineage.get("data") or {}).get("split_manifest") or {}).get("path")
    if not isinstance(manifest_path, str) or not manifest_path:
        return None
    try:
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = manifest.get("settings") if isinstance(manifest, dict) else None
    if not isinstance(settings, dict) or not isinstance(settings.get("GROUP_COLUMN", ""), str):
        raise InputError(
            f"{manifest_path} (the split manifest named in lineage.json) is not a manifest as split_data.py writes it "
            "(no settings object with a text GROUP_COLUMN); restore it, or rerun split_data.py and train.py"
        )
    return settings.get("GROUP_COLUMN") or None


def contamination_report(test: pd.DataFrame, lineage: dict | None, checkpoint: Path, test_path: Path) -> dict:
    """Compare the test split with the training split recorded in the checkpoint's lineage.

    Without a lineage (a model trained elsewhere) the check is skipped with a warning: our TRAIN_PATH is not what
    that model saw, so checking it would only give false comfort.
    """
    if lineage is None:
        return {"checked": False, "warnings": [f"no lineage.json in {checkpoint}: contamination check skipped"]}
    train_info = lineage.get("data", {}).get("train", {})
    if not isinstance(train_info.get("path"), str) or not train_info["path"]:
        raise InputError(f"{checkpoint / 'lineage.json'} has no data.train.path; restore it from the training run")
    train_path = Path(train_info["path"])
    if not train_path.is_file():
        raise InputError(
            f"training split {train_path} named in {checkpoint / 'lineage.json'} not found; restore it (split_data.py "
            "with the same settings rewrites it) so the test set can be checked for leaks"
        )
    warnings = []
    if train_info.get("sha256") and sha256_of(train_path) != train_info["sha256"]:
        warnings.append(
            f"{train_path} changed since this model was trained (sha256 differs from lineage.json): the check runs "
            "on the current file, which is not the data the model saw"
        )
    test_sha = lineage.get("data", {}).get("test_sha256")
    if test_sha and sha256_of(test_path) != test_sha:
        warnings.append(f"{test_path} changed since this model was trained (sha256 differs from lineage.json)")
    counts = contamination_counts(test, read_split(train_path), split_group_column(lineage))
    return {"checked": True, "train_path": str(train_path), "warnings": warnings} | counts


def print_contamination(contamination: dict) -> None:
    for warning in contamination["warnings"]:
        print(f"warning: {warning}")
    if contamination["checked"]:
        c = contamination
        print(
            f"contamination vs {c['train_path']}: {c['exact_duplicate_questions']} exact-duplicate questions, "
            f"{c['normalised_duplicate_questions']} normalised-duplicate questions, {c['shared_answers']} shared "
            f"answers"
            + (f", {c['shared_group_ids']} shared {c['group_column']} values" if "group_column" in c else "")
            + f"; {c['leaked_rows']} of {c['test_rows']} test rows leaked ({c['leaked_fraction']:.1%})"
        )


def read_general_sets(s: SimpleNamespace, test: pd.DataFrame, lineage: dict | None) -> list[dict]:
    """The general sets named in GENERAL_TEST_PATH, each read and checked before any model is scored.

    A general set stands for everything the model is not trained on, so it must be neither the test split nor
    overlap it or the training data behind the checkpoint (checked as the test split is, by contamination_counts),
    nor a general validation set train.py chose this model on: that one would flatter it.
    """
    paths = [Path(p.strip()) for p in s.GENERAL_TEST_PATH.split(",") if p.strip()]
    if not paths:
        return []
    test_path, test_sha = Path(s.TEST_PATH), sha256_of(Path(s.TEST_PATH))
    group_column = split_group_column(lineage) if lineage else None
    train_path = Path(lineage["data"]["train"]["path"]) if lineage else None  # contamination_report checked it
    train = read_split(train_path) if train_path else None
    chosen_on = chosen_on_sets(lineage)
    general_sets, names = [], {}
    for path in paths:
        name = path.stem
        if name in names:
            raise InputError(
                f"GENERAL_TEST_PATH names two general sets called {name!r} ({names[name]}, {path}); "
                "list each file once and give each its own file name"
            )
        names[name] = path
        if path.is_file() and (path.resolve() == test_path.resolve() or sha256_of(path) == test_sha):
            same = "the same file as" if path.resolve() == test_path.resolve() else "a copy (same sha256) of"
            raise InputError(
                f"general set {path} is {same} the test split {test_path}; a general set holds questions from other "
                "domains: set GENERAL_TEST_PATH to such a CSV"
            )
        if path.is_file() and sha256_of(path) in chosen_on:
            raise InputError(
                f"general set {path} is the general validation set train.py chose this model on (same sha256 as "
                f"{chosen_on[sha256_of(path)]} in its lineage.json), so it would flatter the model; never score on a "
                "set that was chosen on: set GENERAL_TEST_PATH to a held-out general set"
            )
        frame = read_split(path, "GENERAL_TEST_PATH")
        overlaps = {}
        for kind, other_path, other in (("test split", test_path, test), ("training data", train_path, train)):
            if other is None:
                continue
            counts = contamination_counts(frame, other, group_column)
            if counts["leaked_fraction"] > s.MAX_CONTAMINATION:
                raise InputError(
                    f"general set {path} overlaps the {kind} {other_path}: {counts['leaked_rows']} of "
                    f"{len(frame)} rows ({counts['leaked_fraction']:.1%}) share a question or an answer "
                    f"(MAX_CONTAMINATION={s.MAX_CONTAMINATION:.1%}); remove those rows from the general set"
                )
            overlaps[kind.split()[0]] = {"path": str(other_path)} | {
                k: v for k, v in counts.items() if k != "test_rows"
            }
        language = next((c for c in frame.columns if c.casefold() == s.LANGUAGE_COLUMN.casefold()), None)
        general_sets.append(
            {"name": name, "path": str(path), "sha256": sha256_of(path), "frame": frame, "language_column": language,
             "contamination": overlaps}
        )  # fmt: skip
    return general_sets


def chosen_on_sets(lineage: dict | None) -> dict[str, str]:
    """sha256 -> path of each general validation set train.py chose this model on (lineage.json's general_guard)."""
    guard = (lineage or {}).get("general_guard")
    sets = guard.get("sets") if isinstance(guard, dict) else None
    return {g["sha256"]: str(g.get("path")) for g in (sets if isinstance(sets, list) else [])
            if isinstance(g, dict) and isinstance(g.get("sha256"), str)}  # fmt: skip


def general_report(general_sets: list[dict], models: dict, s: SimpleNamespace) -> dict:
    """Each general set scored by the same model objects on its own answers as the corpus (one document per
    distinct answer, as the test corpus), overall and per language, with the paired bootstrap interval."""
    if not general_sets:
        return {"checked": False, "note": "GENERAL_TEST_PATH is empty", "sets": []}
    results = []
    for g in general_sets:
        frame = g["frame"]
        queries, corpus, relevant_docs, query_languages = ir_inputs(
            frame, [frame], True, g["language_column"] or s.LANGUAGE_COLUMN
        )
        evaluator = test_evaluator(queries, corpus, relevant_docs, s.QUERY_PROMPT, s.PASSAGE_PROMPT, s.BATCH_SIZE)
        rankings = {system: model_rankings(evaluator, model) for system, model in models.items()}
        scopes, scores = scope_scores(evaluator, rankings, query_languages)
        per_query = {k: per_query_scores(rankings[k], relevant_docs, evaluator.queries_ids, s.PRIMARY_METRIC)
                     for k in rankings}  # fmt: skip
        bootstrap = {"metric": s.PRIMARY_METRIC} | bootstrap_report(
            per_query["base"], per_query["finetuned"], None, s.BOOTSTRAP_RESAMPLES, s.BOOTSTRAP_SEED
        )
        results.append(
            {key: g[key] for key in ("name", "path", "sha256", "language_column", "contamination")}
            | {"rows": len(frame), "queries": len(queries), "documents": len(corpus),
               "score_function": evaluator.score_function_names[0], "metrics": scores["all"],
               "by_language": by_language(scopes, scores), "bootstrap": bootstrap}
        )  # fmt: skip
    return {"checked": True, "note": None, "sets": results}


def print_general(general: dict) -> None:
    """The general sets' block: per set a header, the metric lines (overall, per language) and a verdict."""
    if not general["checked"]:
        print(
            f"general: not checked ({general['note']}): a loss outside this domain would go unseen; set "
            "GENERAL_TEST_PATH to Question/Answer CSVs from other domains"
        )
        return
    for g in general["sets"]:
        languages = f"per {g['language_column']!r}" if g["by_language"] else "no language column, overall only"
        print(
            f"general[{g['name']}]: {g['path']}, {g['rows']} rows, {g['queries']} queries; corpus (its own answers): "
            f"{g['documents']} documents; {languages}"
        )
        scores = {"all": g["metrics"]} | g["by_language"]
        for line in metric_lines(f"general[{g['name']}]", scores, g["score_function"]):
            print(line)
        print(f"general[{g['name']}] {verdict_line(g['bootstrap']['metric'], g['bootstrap'])}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(name: str, setting: str):
    """A SentenceTransformer, or a one-line InputError saying what to fix.

    A LoRA adapter folder loads the same way: sentence-transformers finds adapter_config.json and loads the adapter
    on the base model named there (peft is installed).
    """
    from sentence_transformers import SentenceTransformer

    local = Path(name).exists()
    if not local and (os.path.isabs(name) or name.startswith((".", "~"))):
        raise InputError(f"model folder {name} not found; set {setting} in .env to an existing model folder")
    adapter_config = Path(name, "adapter_config.json")
    base = adapter_base_model(adapter_config) if adapter_config.is_file() else None
    try:
        return SentenceTransformer(name, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1" or local)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if base:
            raise InputError(
                f"cannot load LoRA adapter {name!r}: {detail}; its base model {base!r} (base_model_name_or_path in "
                f"{adapter_config}) must be a loadable model folder or hub name"
            ) from None
        if local:
            raise InputError(
                f"cannot load model {name!r}: {detail}; the folder is incomplete or corrupt (missing or damaged "
                f"weights?): re-run train.py or set {setting} to another model folder"
            ) from None
        raise InputError(
            f"cannot load model {name!r}: no network or hub access ({detail}); set {setting} in .env to a local "
            "model folder"
        ) from None


def adapter_base_model(adapter_config: Path) -> str:
    """The base model a LoRA adapter names in its adapter_config.json."""
    try:
        config = json.loads(adapter_config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(
            f"{adapter_config} is not valid JSON ({e}); restore the adapter from the training run"
        ) from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise InputError(
            f"{adapter_config} is not an adapter config as peft writes it (no base_model_name_or_path text); restore "
            "the adapter from the training run"
        )
    return base


def test_evaluator(queries: dict, corpus: dict, relevant_docs: dict, query_prompt: str, passage_prompt: str,
                   batch_size: int = 32):  # fmt: skip
    """The library's IR evaluator, named "test" (metrics `test_cosine_ndcg@10`, ...), keeping its rankings.

    The prompts are passed explicitly, even when empty: an explicit prompt replaces the one configured in the model
    (train.py saves E5's prompts into it), so a prefix is applied exactly once and base and fine-tuned models see
    the same inputs.
    """
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    return InformationRetrievalEvaluator(
        queries, corpus, relevant_docs, batch_size=batch_size, name="test", write_csv=False, write_predictions=True,
        query_prompt=query_prompt, corpus_prompt=passage_prompt,
    )  # fmt: skip


def metric_names(evaluator) -> list[str]:
    """The evaluator's metrics in its own order, e.g. accuracy@1 ... ndcg@10, map@100."""
    return (
        [f"accuracy@{k}" for k in evaluator.accuracy_at_k]
        + [f"precision@{k}" for k in evaluator.precision_recall_at_k]
        + [f"recall@{k}" for k in evaluator.precision_recall_at_k]
        + [f"mrr@{k}" for k in evaluator.mrr_at_k]
        + [f"ndcg@{k}" for k in evaluator.ndcg_at_k]
        + [f"map@{k}" for k in evaluator.map_at_k]
    )


def model_rankings(evaluator, model) -> dict[str, list[dict]]:
    """Each query's ranked hits ({"corpus_id", "score"}) from the library evaluator's own retrieval.

    Its predictions file gives the per-query ranking the bootstrap and the per-language metrics need.
    """
    with tempfile.TemporaryDirectory() as folder:
        evaluator(model, output_path=folder)
        (predictions,) = Path(folder).glob("*_predictions_*.jsonl")
        lines = predictions.read_text(encoding="utf-8").splitlines()
    return {row["query_id"]: row["results"] for row in map(json.loads, lines)}


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    """Lowercased word tokens (Unicode-aware, so umlauts and ß stay in words) without English or German stopwords."""
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_GERMAN

    stopwords = list(STOPWORDS_EN) + list(STOPWORDS_GERMAN)
    return bm25s.tokenize(texts, lower=True, stopwords=stopwords, return_ids=False, show_progress=False)


def bm25_rankings(evaluator) -> dict[str, list[dict]]:
    """BM25 over the evaluator's corpus, in the same ranked-hits shape and tie order as the evaluator's."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25_tokens(evaluator.corpus), show_progress=False)
    top_k = max(*evaluator.accuracy_at_k, *evaluator.precision_recall_at_k, *evaluator.mrr_at_k,
                *evaluator.ndcg_at_k, *evaluator.map_at_k)  # fmt: skip
    rankings = {}
    for qid, tokens in zip(evaluator.queries_ids, bm25_tokens(evaluator.queries), strict=True):
        doc_scores = retriever.get_scores_from_ids(retriever.get_tokens_ids(tokens))
        hits = sorted(zip(doc_scores.tolist(), evaluator.corpus_ids, strict=True), key=lambda h: (-h[0], h[1]))
        rankings[qid] = [{"corpus_id": cid, "score": score} for score, cid in hits[:top_k]]
    return rankings


def metrics_of(evaluator, rankings: dict[str, list[dict]], query_ids: list[str]) -> dict[str, float]:
    """The library's metrics (InformationRetrievalEvaluator.compute_metrics) for these queries' rankings."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    texts = dict(zip(evaluator.queries_ids, evaluator.queries, strict=True))
    subset = InformationRetrievalEvaluator(
        {qid: texts[qid] for qid in query_ids},
        {},
        evaluator.relevant_docs,
        write_csv=False,
        accuracy_at_k=evaluator.accuracy_at_k,
        precision_recall_at_k=evaluator.precision_recall_at_k,
        mrr_at_k=evaluator.mrr_at_k,
        ndcg_at_k=evaluator.ndcg_at_k,
        map_at_k=evaluator.map_at_k,
    )
    nested = subset.compute_metrics([rankings[qid] for qid in subset.queries_ids])
    flat = {f"{name.removesuffix('@k')}@{k}": float(v) for name, values in nested.items() for k, v in values.items()}
    return {name: flat[name] for name in metric_names(evaluator)}


def per_query_scores(
    rankings: dict[str, list[dict]], relevant_docs: dict[str, set], query_ids: list[str], metric: str
) -> np.ndarray:
    """One value of `metric` per query, defined as the library defines it (their mean is the library's number)."""
    name, k = metric.split("@")
    k = int(k)
    values = []
    for qid in query_ids:
        relevant = relevant_docs[qid]
        hits = [hit["corpus_id"] in relevant for hit in rankings[qid][:k]]
        if name == "ndcg":
            ideal = sum(1 / np.log2(i + 2) for i in range(min(len(relevant), k)))
            values.append(sum(1 / np.log2(i + 2) for i, hit in enumerate(hits) if hit) / ideal)
        elif name == "mrr":
            values.append(next((1 / (i + 1) for i, hit in enumerate(hits) if hit), 0.0))
        elif name == "accuracy":
            values.append(float(any(hits)))
        elif name == "precision":
            values.append(sum(hits) / k)
        elif name == "recall":
            values.append(sum(hits) / len(relevant))
        else:  # map
            precisions = [sum(hits[: i + 1]) / (i + 1) for i, hit in enumerate(hits) if hit]
            values.append(sum(precisions) / min(k, len(relevant)))
    return np.array(values, dtype=float)


def verdict_bootstrap(
    rankings: dict, relevant_docs: dict, query_ids: list[str], scores: dict, s: SimpleNamespace
) -> tuple[dict, dict]:
    """The paired bootstrap of the primary metric's gain (printed as the verdict line), and a note when BM25 wins;
    also the per-query scores it resampled, {query id: {"base", "finetuned"}}, which the report keeps."""
    metric = s.PRIMARY_METRIC
    per_query = {
        k: per_query_scores(rankings[k], relevant_docs, query_ids, metric) for k in ("base", "finetuned", "bm25")
    }
    bootstrap = {"metric": metric} | bootstrap_report(*per_query.values(), s.BOOTSTRAP_RESAMPLES, s.BOOTSTRAP_SEED)
    print(verdict_line(metric, bootstrap))
    bm25, finetuned = scores["all"]["bm25"][metric], scores["all"]["finetuned"][metric]
    if bm25 > finetuned:
        print(f"note: BM25 beats the fine-tuned model on {metric} ({bm25:.4f} vs {finetuned:.4f})")
    pairs = zip(query_ids, per_query["base"], per_query["finetuned"], strict=True)
    return bootstrap, {qid: {"base": float(base), "finetuned": float(tuned)} for qid, base, tuned in pairs}


def paired_bootstrap_ci(base: np.ndarray, finetuned: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean per-query delta, resampling queries with replacement (both systems together)."""
    deltas = finetuned - base
    rng = np.random.default_rng(seed)
    means = [deltas[rng.integers(0, len(deltas), len(deltas))].mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_report(
    base: np.ndarray, finetuned: np.ndarray, bm25: np.ndarray | None, resamples: int, seed: int
) -> dict:
    """Delta, its interval and the verdict: improved / regressed only when the interval excludes zero."""
    low, high = paired_bootstrap_ci(base, finetuned, resamples, seed)
    verdict = "improved" if low > 0 else "regressed" if high < 0 else "no significant change"
    delta = float((finetuned - base).mean())
    return {"delta": delta, "ci_low": low, "ci_high": high, "verdict": verdict, "resamples": resamples, "seed": seed,
            "queries": len(base)}  # fmt: skip


def scope_scores(evaluator, rankings: dict, query_languages: dict) -> tuple[dict, dict]:
    """The query ids of each scope ("all", then each language) and every system's metrics on each."""
    languages = sorted(set(query_languages.values()) - {None})
    scopes = {"all": evaluator.queries_ids} | {
        lang: [qid for qid in evaluator.queries_ids if query_languages[qid] == lang] for lang in languages
    }
    scores = {
        scope: {system: metrics_of(evaluator, ranking, qids) for system, ranking in rankings.items()}
        for scope, qids in scopes.items()
    }
    return scopes, scores


def by_language(scopes: dict, scores: dict) -> dict:
    """The reports' per-language part: each language's query count and scores."""
    return {lang: {"queries": len(qids)} | scores[lang] for lang, qids in scopes.items() if lang != "all"}


def metric_lines(prefix: str, scores: dict, score_function: str) -> list[str]:
    """The recipe's lines, `<prefix>_cosine_ndcg@10: base=...`, overall then `<prefix>_<language>_...`."""
    lines = []
    for scope, systems in scores.items():
        name = prefix if scope == "all" else f"{prefix}_{scope}"
        present = [system for system in ("base", "finetuned", "bm25") if system in systems]
        for metric in systems["base"]:
            lines.append(metric_line(f"{name}_{score_function}_{metric}", *(systems[k][metric] for k in present)))
    return lines


def signed(value: float) -> str:
    return f"{round(value, 4) + 0.0:+.4f}"  # + 0.0 turns -0.0 into 0.0


def metric_line(metric: str, base: float, finetuned: float, bm25: float | None = None) -> str:
    """The recipe's line, with BM25 as a third column."""
    line = f"{metric}: base={base:.4f} | fine-tuned={finetuned:.4f} | Δ={signed(finetuned - base)}"
    return line if bm25 is None else f"{line} | bm25={bm25:.4f}"


def verdict_line(metric: str, bootstrap: dict) -> str:
    b = bootstrap
    return (
        f"verdict: {b['verdict']} ({metric} Δ={signed(b['delta'])}, 95% CI [{signed(b['ci_low'])}, "
        f"{signed(b['ci_high'])}], paired bootstrap over queries, {b['resamples']} resamples, seed {b['seed']})"
    )


def gate_reasons(scores: dict, contamination: dict, s: SimpleNamespace, general: dict | None = None) -> list[str]:
    """Every reason to block this model; empty means it passes."""
    # Each rule is written as "not (value within its limit)", so that a NaN value blocks instead of passing.
    metric, reasons = s.PRIMARY_METRIC, []
    if contamination["checked"] and not contamination["leaked_fraction"] <= s.MAX_CONTAMINATION:
        c = contamination
        reasons.append(
            f"the test set leaked into training: {c['leaked_rows']} of {c['test_rows']} test rows "
            f"({c['leaked_fraction']:.1%}) share a question or an answer with {c['train_path']} "
            f"(MAX_CONTAMINATION={s.MAX_CONTAMINATION:.1%}); these scores are inflated, re-split and retrain"
        )
    delta = scores["all"]["finetuned"][metric] - scores["all"]["base"][metric]
    if not delta >= s.MIN_IMPROVEMENT:
        reasons.append(f"no gain: {metric} Δ={signed(delta)} over the base model, MIN_IMPROVEMENT={s.MIN_IMPROVEMENT}")
    for lang, systems in scores.items():
        drop = systems["base"][metric] - systems["finetuned"][metric]
        if lang != "all" and not drop <= s.MAX_LANGUAGE_DROP:
            reasons.append(
                f"language {lang} regressed: {metric} {systems['base'][metric]:.4f} -> "
                f"{systems['finetuned'][metric]:.4f} (Δ={signed(-drop)}), MAX_LANGUAGE_DROP={s.MAX_LANGUAGE_DROP}"
            )
    for g in (general or {}).get("sets", []):
        base, finetuned = g["metrics"]["base"][metric], g["metrics"]["finetuned"][metric]
        if not base - finetuned <= s.MAX_GENERAL_DROP:
            reasons.append(
                f"general set {g['name']} ({g['path']}) regressed: {metric} {base:.4f} -> {finetuned:.4f} "
                f"(Δ={signed(finetuned - base)}), MAX_GENERAL_DROP={s.MAX_GENERAL_DROP}; the in-domain gain was "
                "bought with a loss outside the training domain"
            )
    return reasons


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a temp file beside `path`, fsync, then rename: a crash or a full disk leaves the old file intact."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            tmp = f.name
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise InputError(f"cannot write {path}: {e.strerror or e}; free disk space or fix permissions") from None


def append_evaluation(checkpoint: Path, lineage: dict | None, report: dict, inside_registry: bool) -> None:
    """Add this evaluation to the checkpoint's lineage.json: its history of evaluations is never rewritten. A
    registered version stays unchanged, and a model without lineage.json keeps this evaluation in the reports only."""
    if inside_registry:
        print(f"registry: {checkpoint} is a registered version: its lineage.json and the registry stay unchanged")
        return
    if lineage is None:
        print(f"lineage: {checkpoint} has no lineage.json; this evaluation is kept in the reports only")
        return
    keep = ("evaluated_at", "base_model", "corpus", "queries", "gate", "metrics", "by_language", "bootstrap", "general")
    evaluation = {key: report[key] for key in keep} | {
        "contamination": {k: v for k, v in report["contamination"].items() if k != "warnings"}
    }
    lineage.setdefault("evaluations", []).append(evaluation)
    write_atomic(checkpoint / "lineage.json", json.dumps(lineage, indent=2, ensure_ascii=False) + "\n")
    print(f"lineage: evaluation appended to {checkpoint / 'lineage.json'}")


def model_fingerprint(checkpoint: Path) -> str:
    """sha256 over the model's files, without lineage.json (which grows with every evaluation)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != "lineage.json"):
        digest.update(str(path.relative_to(checkpoint)).encode() + b"\0" + sha256_of(path).encode())
    return digest.hexdigest()


def registration_plan(checkpoint: Path, output_dir: Path, entries: list[dict]) -> dict:
    """The registry version of a passing model: the one it already has (the same model files passed before), or the
    next free one. register() then makes it so."""
    fingerprint = model_fingerprint(checkpoint)
    for entry in entries:
        if entry["model_sha256"] == fingerprint:
            return {"version": entry["version"], "path": entry["path"], "new": False, "model_sha256": fingerprint}
    numbers = [int(p.name[1:]) for p in (output_dir / "registry").glob("v[0-9]*") if p.name[1:].isdigit()]
    numbers += [int(entry["version"][1:]) for entry in entries]
    version = f"v{max(numbers, default=0) + 1:04d}"
    return {
        "version": version,
        "path": str(output_dir / "registry" / version),
        "new": True,
        "model_sha256": fingerprint,
    }


def register(plan: dict, checkpoint: Path, output_dir: Path, lineage: dict | None, report: dict) -> None:
    """Copy a passing model to registry/v<NNNN>/ (read-only) and append one line to registry.jsonl.

    The registry is append-only: earlier lines are never rewritten, earlier versions never touched. The same model
    files passing again are not registered twice.
    """
    if not plan["new"]:
        print(f"registry: this model is already registered as {plan['version']} ({plan['path']})")
        return
    registry_file, version, target = output_dir / "registry.jsonl", plan["version"], Path(plan["path"])
    staging = output_dir / "registry" / f".{version}.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint, staging)
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o444)  # immutable by convention and by permission
        os.rename(staging, target)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(
            f"cannot copy {checkpoint} to {target}: {e.strerror or e}; free disk space (the reports name {version}, "
            "which is not registered: rerun eval.py)"
        ) from None
    lineage = lineage or {}
    data = lineage.get("data") or {}
    entry = {
        "version": version,
        "path": str(target),
        "registered_at": report["evaluated_at"],
        "source": str(checkpoint),
        "model_sha256": plan["model_sha256"],
        "lineage": {
            "base_model": report["base_model"],
            "train_sha256": (data.get("train") or {}).get("sha256"),
            "test_sha256": data.get("test_sha256"),
            "git_commit": lineage.get("git_commit"),
            "finished_at": lineage.get("finished_at"),
            "lora": lineage.get("lora", False),
        },
        "scores": {system: report["metrics"][system][report["gate"]["primary_metric"]] for system in report["metrics"]}
        | {"metric": report["gate"]["primary_metric"], "bootstrap": report["bootstrap"]},
        "general": general_scores(report),
    }
    with open(registry_file, "ab") as f:
        size = f.tell()
        try:
            f.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:  # no torn last line, no version folder without its line
            f.truncate(size)
            shutil.rmtree(target, ignore_errors=True)
            raise InputError(
                f"cannot append to {registry_file}: {e.strerror or e}; free disk space (the reports name {version}, "
                "which is not registered: rerun eval.py)"
            ) from None
    print(f"registry: registered {version} at {target} (line appended to {registry_file})")


def general_scores(report: dict) -> dict:
    """The registry's record of the general sets: each one's file and its primary metric, base vs fine-tuned."""
    general, metric = report["general"], report["gate"]["primary_metric"]
    sets = [
        {"name": g["name"], "path": g["path"], "sha256": g["sha256"], "base": g["metrics"]["base"][metric],
         "finetuned": g["metrics"]["finetuned"][metric], "bootstrap": g["bootstrap"]}
        for g in general["sets"]
    ]  # fmt: skip
    return {"checked": general["checked"], "note": general["note"], "sets": sets}


def read_registry(registry_file: Path) -> list[dict]:
    """registry.jsonl's entries, each checked to be an object with a version, a path and a model_sha256, so that a
    damaged registry stops the run before the slow scoring."""
    if not registry_file.exists():
        return []
    try:
        text = registry_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {registry_file} ({e}); restore it from a backup (it is append-only)") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        expected = {"version": r"v\d+", "path": r".+", "model_sha256": r"[0-9a-f]{64}"}
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), str) and re.fullmatch(pattern, entry[key]) for key, pattern in expected.items()
        ):
            raise InputError(
                f"{registry_file} line {number} is not a registry entry (a JSON object with a version like v0001, a "
                "path and a model_sha256); restore the file from a backup (it is append-only)"
            )
        entries.append(entry)
    return entries


def write_reports(output_dir: Path, report: dict) -> None:
    """eval_report.json/.md/.png: the latest evaluation, replaced each run (history: lineage.json, registry)."""
    paths = [output_dir / name for name in ("eval_report.json", "eval_report.md", "eval_report.png")]
    if paths[0].exists():
        print(f"reports: replacing the previous evaluation's reports in {output_dir} (history is in lineage.json)")
    write_atomic(paths[2], chart_png(report))
    write_atomic(paths[1], report_markdown(report))
    write_atomic(paths[0], json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"reports: {', '.join(str(p) for p in paths)}")


def report_metrics(report: dict) -> list[str]:
    return [name.strip() for name in report["settings"]["REPORT_METRICS"].split(",") if name.strip()]


def chart_png(report: dict) -> bytes:
    """Bars of base / fine-tuned / BM25, overall and per language, one panel per main metric."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"all": report["metrics"]} | report["by_language"]
    wanted = dict.fromkeys((report["gate"]["primary_metric"], *report_metrics(report)))
    metrics = [m for m in wanted if m in report["metrics"]["base"]]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    x = np.arange(len(groups))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for offset, (system, label) in enumerate((("base", "base"), ("finetuned", "fine-tuned"), ("bm25", "BM25"))):
            ax.bar(x + (offset - 1) * 0.27, [g[system][metric] for g in groups.values()], 0.27, label=label)
        ax.set_xticks(x, list(groups))
        ax.set_ylim(0, 1)
        ax.set_title(metric)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def report_markdown(report: dict) -> str:
    gate, b, c = report["gate"], report["bootstrap"], report["contamination"]
    lines = [
        "# Evaluation report",
        "",
        f"- evaluated at: {report['evaluated_at']}",
        f"- checkpoint: `{report['checkpoint']}`; base model: `{report['base_model']}`",
        f"- {report['queries']} test queries; corpus: {report['corpus']['documents']} documents "
        f"(scope `{report['corpus']['scope']}`, identical answers grouped: {report['corpus']['grouped']})",
        f"- gate: **{'PASSED' if gate['passed'] else 'BLOCKED'}**" + "".join(f"\n  - {r}" for r in gate["reasons"]),
        f"- verdict on {gate['primary_metric']}: **{b['verdict']}**, Δ={signed(b['delta'])}, "
        f"95% CI [{signed(b['ci_low'])}, {signed(b['ci_high'])}] ({b['resamples']} paired bootstrap resamples)",
    ]
    if c["checked"]:
        lines.append(
            f"- contamination vs `{c['train_path']}`: {c['exact_duplicate_questions']} exact / "
            f"{c['normalised_duplicate_questions']} normalised duplicate questions, {c['shared_answers']} shared "
            f"answers, {c['leaked_rows']} of {c['test_rows']} test rows leaked"
        )
    lines += [f"- warning: {w}" for w in c["warnings"]]
    if report["registry"]:
        lines.append(f"- registry: {report['registry']['version']} at `{report['registry']['path']}`")
    lines += ["", "| metric | base | fine-tuned | Δ | BM25 |", "|---|---|---|---|---|"]
    m = report["metrics"]
    lines += [f"| {k} | {m['base'][k]:.4f} | {m['finetuned'][k]:.4f} | {signed(m['finetuned'][k] - m['base'][k])} "
              f"| {m['bm25'][k]:.4f} |" for k in m["base"]]  # fmt: skip
    for lang, systems in report["by_language"].items():
        lines += ["", f"## {lang} ({systems['queries']} queries)", "", "| metric | base | fine-tuned | Δ | BM25 |"]
        lines.append("|---|---|---|---|---|")
        lines += [f"| {k} | {systems['base'][k]:.4f} | {systems['finetuned'][k]:.4f} | "
                  f"{signed(systems['finetuned'][k] - systems['base'][k])} | {systems['bm25'][k]:.4f} |"
                  for k in report_metrics(report) if k in systems["base"]]  # fmt: skip
    lines += general_markdown(report)
    lines += ["", "![base vs fine-tuned vs BM25](eval_report.png)", ""]
    return "\n".join(lines)


def general_markdown(report: dict) -> list[str]:
    """The report's general-set section: one table per set (overall and per language), or why there is none."""
    general = report["general"]
    if not general["checked"]:
        return ["", "## General sets", "", f"General ability was not checked ({general['note']})."]
    lines = []
    for g in general["sets"]:
        b = g["bootstrap"]
        lines += [
            "",
            f"## General set {g['name']} (`{g['path']}`: {g['queries']} queries, {g['documents']} documents)",
            "",
            f"Verdict on {b['metric']}: **{b['verdict']}**, Δ={signed(b['delta'])}, "
            f"95% CI [{signed(b['ci_low'])}, {signed(b['ci_high'])}]",
            "",
            "| scope | metric | base | fine-tuned | Δ |",
            "|---|---|---|---|---|",
        ]
        for scope, systems in ({"all": g["metrics"]} | g["by_language"]).items():
            lines += [f"| {scope} | {k} | {systems['base'][k]:.4f} | {systems['finetuned'][k]:.4f} | "
                      f"{signed(systems['finetuned'][k] - systems['base'][k])} |"
                      for k in report_metrics(report) if k in systems["base"]]  # fmt: skip
    return lines


if __name__ == "__main__":
    run(main)
