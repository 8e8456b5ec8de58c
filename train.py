"""Fine-tune an embedding model on question/answer pairs: `python train.py` (after `python split_data.py`).

Reads DATA_DIR/qa_training_set.csv and qa_validation_set.csv (columns Question, Answer), trains with in-batch
negatives (MultipleNegativesRankingLoss), keeps the checkpoint with the best validation NDCG@10 and saves it to
OUTPUT_DIR/final with a lineage.json and a training-curve PNG, but only if it beats the base model on validation
(scored before the first step); otherwise it says so, saves nothing and exits with code 1. A killed run resumes
from its last complete checkpoint. Checkpoints go to OUTPUT_DIR/checkpoints/; OUTPUT_DIR/.lock keeps a second run out
while this one runs. Multi-GPU: `torchrun --nproc_per_node=N train.py`.
"""

import codecs
import contextlib
import datetime
import difflib
import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tokenize
import unicodedata
from collections import deque
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from dotenv import dotenv_values, load_dotenv
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# --- Settings: edit here, or override any of them by name in .env or the environment (`--help` lists them) ---
DATA_DIR = "data"  # the folder of the splits and the split manifest
TRAIN_PATH = ""  # "" = DATA_DIR/qa_training_set.csv
VALIDATION_PATH = ""  # "" = DATA_DIR/qa_validation_set.csv
SPLIT_MANIFEST_PATH = ""  # "" = DATA_DIR/split_manifest.json (only read for lineage.json)
OUTPUT_DIR = "output"  # checkpoints/ and final/ go here
MODEL_NAME = "intfloat/multilingual-e5-base"  # hub id or local model folder
QUERY_PROMPT = "query: "  # E5's prefixes; set both to "" for models trained without prompts
PASSAGE_PROMPT = "passage: "  # ... the answers' prefix (the line above is the questions')
NUM_TRAIN_EPOCHS = 3  # passes over the training split (unless MAX_STEPS sets a step budget)
MAX_STEPS = 0  # optimizer-step budget (benchmarks compare runs at equal steps); 0 = train NUM_TRAIN_EPOCHS
BATCH_SIZE = 24  # per device; every other answer in a batch is a negative, so bigger batches train harder
LOSS_SCALE = 100.0  # 1 / temperature of the in-batch softmax: E5's own pre-training value; the recipe's 20 is too soft
SYMMETRIC_LOSS = True  # also rank the batch's questions for each answer (MNRL directions query_to_doc + doc_to_query)
LEARNING_RATE = 2e-5  # peak learning rate of full fine-tuning (LoRA uses LORA_LEARNING_RATE)
WEIGHT_DECAY = 0.01  # AdamW weight decay
WARMUP_RATIO = 0.1  # fraction of all steps with a rising learning rate
EVAL_STEPS = 500  # evaluate and checkpoint every N steps (at least once per epoch)
SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk; the best one is always kept on top
EARLY_STOPPING_PATIENCE = 0  # stop after N evaluations without a better validation NDCG@10; 0 = off
VALIDATION_MAX_QUERIES = 500  # validation questions per evaluation, a seeded sample above this: keeps it cheap
VALIDATION_DISTRACTORS = 1500  # other answers (training, other validation) searched too, a seeded sample above this
SEED = 42  # seeds the shuffling, the initialisation of new weights and dropout
FP16 = True  # mixed precision; only on a CUDA GPU (the CPU trains in fp32)
NO_DUPLICATE_BATCHES = True  # no two rows of one split group (same answer, question or GROUP_COLUMN value) in a batch
NEIGHBOUR_ROWS = 3  # each random row brings N rows whose answers the base model confuses with its own; 0 = off
TRAIN_WITH_DROPOUT = True  # the model's dropout while training; false = off (more gain on XQuAD, less on the sample)
MIX_WITH_BASE = False  # WiSE-FT: keep the mix of fine-tuned and base weights that scores best on validation
REQUIRE_VALIDATION_GAIN = True  # save no final model unless it beats the base model on validation (False: the recipe)
GENERAL_VALIDATION_PATH = ""  # Q/A CSVs of other domains, comma-separated: keep a result that loses little on each
MAX_GENERAL_DROP = 0.01  # ... at most this NDCG@10 below the base on each (eval.py's gate rule of the same name)
RESUME = True  # continue a killed run from its last complete checkpoint; False = start fresh
MINE_HARD_NEGATIVES = False  # add one mined hard negative per pair (base model, before training)
HARD_NEGATIVE_MARGIN = 0.05  # a negative must score at least 5% below the positive (else likely a true answer)
HARD_NEGATIVE_MAX_SCORE = 0.95  # ... and below this cosine similarity to the question
CACHED_MINI_BATCH_SIZE = 0  # > 0: CachedMultipleNegativesRankingLoss (big BATCH_SIZE, small memory); 0 = plain MNRL
USE_LORA = False  # train a small LoRA adapter instead of all weights
LORA_RANK = 16  # rank of the LoRA matrices: more trainable weights per layer
LORA_ALPHA = 32  # LoRA scaling: the adapter's update is multiplied by LORA_ALPHA / LORA_RANK
LORA_LEARNING_RATE = 1e-4  # replaces LEARNING_RATE for LoRA: few fresh weights need bigger steps
MERGE_LORA = False  # also export the adapter merged into a full model, to OUTPUT_DIR/final/merged

PRIMARY_METRIC = "validation_cosine_ndcg@10"
GENERAL_METRIC = "general_cosine_ndcg@10"  # the same metric on a general validation set (its evaluator's name)
NEIGHBOUR_CANDIDATES = 32  # confusable answers kept per training row for the neighbour batches
MIX_WEIGHTS = (0.25, 0.5, 0.75)  # shares of fine-tuned weights tried between the base (0) and the best checkpoint (1)
# Settings that change nothing about the optimisation itself (the general guard only chooses after training): a run
# may resume when only these differ.
NOT_IN_RUN_FINGERPRINT = {
    "RESUME",
    "MERGE_LORA",
    "MIX_WITH_BASE",
    "REQUIRE_VALIDATION_GAIN",
    "GENERAL_VALIDATION_PATH",
    "MAX_GENERAL_DROP",
    "SAVE_TOTAL_LIMIT",
    "DATA_DIR",
    "TRAIN_PATH",
    "VALIDATION_PATH",
    "SPLIT_MANIFEST_PATH",
    "OUTPUT_DIR",
}
CPU_LINE = "No CUDA GPU found: training in fp32 on the CPU (fp16 needs CUDA)."

# What the settings block below allows: a rule per setting ('>0', '>=1', '[0,1)', '(0,1)', 'a|b', 'nonempty'; every
# float must be finite), checks across settings, the paths "" fills in, and the paths that must be different files.
# A new number setting needs its rule here (tests/test_hostile.py checks that each has one).
LIMITS = {
    "DATA_DIR": "nonempty",
    "OUTPUT_DIR": "nonempty",
    "MODEL_NAME": "nonempty",
    "NUM_TRAIN_EPOCHS": ">=0",
    "MAX_STEPS": ">=0",
    "BATCH_SIZE": ">0",
    "LOSS_SCALE": ">0",
    "LEARNING_RATE": ">0",
    "WEIGHT_DECAY": ">=0",
    "WARMUP_RATIO": "[0,1)",
    "EVAL_STEPS": ">=1",
    "SAVE_TOTAL_LIMIT": ">=1",
    "EARLY_STOPPING_PATIENCE": ">=0",
    "VALIDATION_MAX_QUERIES": ">=1",
    "VALIDATION_DISTRACTORS": ">=0",
    "SEED": "[0,4294967295]",
    "HARD_NEGATIVE_MARGIN": "[0,1)",
    "HARD_NEGATIVE_MAX_SCORE": "(0,1]",
    "CACHED_MINI_BATCH_SIZE": ">=0",
    "NEIGHBOUR_ROWS": ">=0",
    "LORA_RANK": ">=1",
    "LORA_ALPHA": ">0",
    "LORA_LEARNING_RATE": ">0",
    "MAX_GENERAL_DROP": "[0,1]",
}
CHECKS = [
    (
        ("NEIGHBOUR_ROWS", "NO_DUPLICATE_BATCHES"),
        lambda v: v["NEIGHBOUR_ROWS"] == 0 or v["NO_DUPLICATE_BATCHES"],
        "neighbour batches build on the grouped batches: set NO_DUPLICATE_BATCHES=true or NEIGHBOUR_ROWS=0",
    ),
    (
        ("NUM_TRAIN_EPOCHS", "MAX_STEPS"),
        lambda v: v["NUM_TRAIN_EPOCHS"] >= 1 or v["MAX_STEPS"] > 0,
        "with MAX_STEPS=0 (no step budget) NUM_TRAIN_EPOCHS must be at least 1, or the untrained model is saved",
    ),
    (
        ("USE_LORA", "GENERAL_VALIDATION_PATH"),
        lambda v: not (v["USE_LORA"] and v["GENERAL_VALIDATION_PATH"].strip()),
        "the general guard chooses among mixes of the fine-tuned weights with the base's, which a LoRA run does not "
        "make; train all weights (USE_LORA=false) or leave GENERAL_VALIDATION_PATH empty",
    ),
]
DERIVED_PATHS = {
    "TRAIN_PATH": ("DATA_DIR", "qa_training_set.csv"),
    "VALIDATION_PATH": ("DATA_DIR", "qa_validation_set.csv"),
    "SPLIT_MANIFEST_PATH": ("DATA_DIR", "split_manifest.json"),
}
DISTINCT_PATHS = ("TRAIN_PATH", "VALIDATION_PATH", "SPLIT_MANIFEST_PATH")
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
def main() -> None:
    # 1. Settings, device and precision; the output folder is writable and locked for this run (rank 0)
    s = settings()
    r = run_context(s)
    import torch  # after the settings, so that a typo in .env is reported before the slow imports

    r.cuda = torch.cuda.is_available()
    r.fp16 = s.FP16 and r.cuda
    output_dir, checkpoints_dir = Path(s.OUTPUT_DIR), Path(s.OUTPUT_DIR) / "checkpoints"
    if r.is_main:
        if not r.cuda:
            print(CPU_LINE)
        check_writable(output_dir)
        lock_folders([s.OUTPUT_DIR])  # a second run in this folder would move this one's live checkpoints aside

    # 2. Data: the training and validation splits (the test split stays unopened for eval.py); what each evaluation
    #    scores (validation questions against their answers and distractors, seeded samples above the caps); the
    #    general validation sets, refused when they share a row with either split
    train, validation, manifest = training_data(s, r.is_main)
    scored = scored_validation(s, train, validation, r.is_main)
    general_sets = general_validation_sets(s, train, validation)

    # 3. Model, with the prompts it will carry into encode_query / encode_document, and the datasets
    model, train_dataset, validation_dataset, base_weights = model_and_datasets(s, train, scored.pairs, r.is_main)

    # 4. Loss and validation evaluator
    loss = training_loss(model, s, r.world_size)
    evaluator = grouped_ir_evaluator(scored.pairs, scored.corpus, "validation", s.QUERY_PROMPT, s.PASSAGE_PROMPT)

    # 5. Steps: evaluate (and checkpoint) at least once per epoch, even when an epoch is shorter than EVAL_STEPS
    r.total_steps, eval_steps = step_budget(s, len(train_dataset), r.world_size, r.is_main)

    # 6. Training arguments, with batches that keep split groups apart (and with NEIGHBOUR_ROWS bring confusable rows
    #    together, found by the base model)
    group_of_question = group_values_by_question([train, validation], manifest_group_column(manifest))
    neighbours = confusable_neighbours(model, train_dataset, group_of_question, s, r.is_main)
    batch_plan = (group_of_question, neighbours)
    args = training_arguments(s, r, checkpoints_dir, eval_steps, batch_plan, train_dataset.column_names)

    # 7. Resume or start fresh; the main process arranges the checkpoint folder first, the others then read it
    fingerprint = run_fingerprint(s, r.world_size)
    r.resume_from = resume_checkpoint(args, checkpoints_dir, fingerprint, s.RESUME, r)
    args.eval_on_start = r.resume_from is None  # the base model's validation score, the bar every checkpoint must clear

    # 8. Train
    trainer = finished_trainer(s, r, model, args, (train_dataset, validation_dataset), loss, evaluator)
    if not r.is_main:
        return

    # 9. The result must beat the base model on validation: the best checkpoint or its best mix with the base; with
    #    general validation sets, the best of those that lose at most MAX_GENERAL_DROP on each
    choice = chosen_result(s, trainer, model, (base_weights, evaluator, general_sets), checkpoints_dir)

    # 10. Save the chosen model atomically to OUTPUT_DIR/final, with lineage.json and the training curve
    data = data_lineage(s, manifest, Path(s.SPLIT_MANIFEST_PATH), fingerprint, len(train), len(validation))
    data["validation"]["scored"] = scored.counts
    lineage = final_lineage(s, r, model, trainer, choice, data, len(train_dataset))
    final = saved_final(model, output_dir, lineage, trainer.state.log_history, s.USE_LORA and s.MERGE_LORA)
    mark_finished(checkpoints_dir, final)
    score = lineage["validation"].get(PRIMARY_METRIC)
    print(f"best checkpoint: {choice['best']} (validation NDCG@10 = {score if score is None else round(score, 4)})")
    print(f"final model saved to {final}")


def run_context(s: SimpleNamespace) -> SimpleNamespace:
    """This process's place in the run (rank, world size, start time, experiment tracking); the main process prints
    the settings. The device fields and what the later steps learn are added by main()."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    started_at = now()
    if rank == 0:
        print_settings(s)
    tracking = "wandb" if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline" else "none"
    return SimpleNamespace(
        rank=rank, world_size=world_size, is_main=rank == 0, started_at=started_at, tracking=tracking
    )


def training_data(s: SimpleNamespace, verbose: bool) -> tuple[pd.DataFrame, pd.DataFrame, dict | None]:
    """The training and validation splits and the split manifest (None when there is none)."""
    train = read_split(Path(s.TRAIN_PATH), "training")
    validation = read_split(Path(s.VALIDATION_PATH), "validation")
    manifest_path = Path(s.SPLIT_MANIFEST_PATH)
    manifest = read_split_manifest(manifest_path)
    if verbose:
        print(
            f"training pairs: {len(train)} from {s.TRAIN_PATH}; validation pairs: {len(validation)} from "
            f"{s.VALIDATION_PATH}"
        )
        if manifest is None:
            print(f"warning: no split manifest at {manifest_path}; lineage.json records the split as unknown (null)")
    return train, validation, manifest


def scored_validation(s: SimpleNamespace, train: pd.DataFrame, validation: pd.DataFrame, verbose: bool):
    """What every evaluation scores, bounded: up to VALIDATION_MAX_QUERIES distinct validation questions with all
    their pairs (`pairs`, also the validation loss's), and a `corpus` of their answers plus up to
    VALIDATION_DISTRACTORS other answers (training ones and those of the unsampled questions), so that the search
    stays as hard as a production index makes it while its cost stops growing with the data. Both samples are
    seeded by SEED and depend on the splits alone, so every torchrun rank and every resumed run scores the same set.
    Below both caps it is the whole validation split against every training and validation answer, in the order
    of the splits. `counts` goes to lineage.json."""
    rng = np.random.default_rng(s.SEED)
    questions = list(dict.fromkeys(validation["Question"]))
    sampled = seeded_subset(questions, s.VALIDATION_MAX_QUERIES, rng)
    pairs = validation[validation["Question"].isin(set(sampled))]
    answers = list(dict.fromkeys(pd.concat([train["Answer"], validation["Answer"]])))
    relevant = set(pairs["Answer"])
    others = [answer for answer in answers if answer not in relevant]
    distractors = set(seeded_subset(others, s.VALIDATION_DISTRACTORS, rng))
    corpus = [answer for answer in answers if answer in relevant or answer in distractors]
    if verbose:
        if len(sampled) < len(questions):
            print(
                f"validation queries: {len(sampled)} of {len(questions)} (seeded sample; {len(pairs)} pairs for the "
                "validation loss)"
            )
        print(
            f"validation corpus: {len(corpus)} documents ("
            + (
                f"{len(distractors)} sampled from {len(others)} training and other validation answers)"
                if len(distractors) < len(others)
                else "every training and validation answer)"
            )
        )
    counts = {
        "max_queries": s.VALIDATION_MAX_QUERIES,
        "queries": len(sampled),
        "of_queries": len(questions),
        "pairs": len(pairs),
        "max_distractors": s.VALIDATION_DISTRACTORS,
        "distractors": len(distractors),
        "of_other_answers": len(others),
        "corpus_documents": len(corpus),
    }
    return SimpleNamespace(pairs=pairs, corpus=corpus, counts=counts)


def seeded_subset(items: list, cap: int, rng: np.random.Generator) -> list:
    """`items` when there are at most `cap`, else `cap` of them drawn by `rng`, in their original order."""
    if len(items) <= cap:
        return items
    return [items[i] for i in np.sort(rng.choice(len(items), cap, replace=False))]


def manifest_group_column(manifest: dict | None) -> str | None:
    """The GROUP_COLUMN the splits were made with, from the split manifest; None without one."""
    manifest_settings = (manifest or {}).get("settings")
    return (manifest_settings.get("GROUP_COLUMN") if isinstance(manifest_settings, dict) else None) or None


def model_and_datasets(s: SimpleNamespace, train: pd.DataFrame, validation: pd.DataFrame, verbose: bool):
    """The model to train (with its prompts, a LoRA adapter if USE_LORA), the training and validation datasets, and
    a copy of the base weights when MIX_WITH_BASE or the general guard needs them (else None)."""
    from datasets import Dataset

    model = load_model(s.MODEL_NAME)
    model.prompts = {key: p for key, p in (("query", s.QUERY_PROMPT), ("document", s.PASSAGE_PROMPT)) if p}
    if not s.TRAIN_WITH_DROPOUT:
        switch_off_dropout(model)
    train_dataset = Dataset.from_dict({"anchor": list(train["Question"]), "positive": list(train["Answer"])})
    validation_dataset = Dataset.from_dict(
        {"anchor": list(validation["Question"]), "positive": list(validation["Answer"])}
    )  # for the validation loss beside the training loss
    if s.MINE_HARD_NEGATIVES:
        train_dataset = mined_triplets(train_dataset, model, s, verbose=verbose)
    mixing = s.MIX_WITH_BASE or s.GENERAL_VALIDATION_PATH.strip()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()} if mixing and not s.USE_LORA else None
    if s.USE_LORA:
        from peft import LoraConfig, TaskType

        model.add_adapter(
            LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=s.LORA_RANK, lora_alpha=s.LORA_ALPHA, lora_dropout=0.1)
        )
    return model, train_dataset, validation_dataset, base_weights


def switch_off_dropout(model) -> None:
    """Every dropout layer of the model at p=0. At LOSS_SCALE 100 dropout's noise in a cosine (std 0.011 for e5-small
    on XQuAD) is as large as the margins the loss learns from. The saved config keeps its rates: encoding never uses
    them. A LoRA adapter, added after this, keeps its own."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def training_loss(model, s: SimpleNamespace, world_size: int):
    """MultipleNegativesRankingLoss (cached when CACHED_MINI_BATCH_SIZE > 0) at LOSS_SCALE, symmetric if asked."""
    from sentence_transformers.sentence_transformer import losses

    # gather_across_devices: under torchrun every question also sees the answers of the other GPUs' batches.
    directions = ("query_to_doc", "doc_to_query") if s.SYMMETRIC_LOSS else ("query_to_doc",)
    loss_options = {"scale": s.LOSS_SCALE, "directions": directions, "gather_across_devices": world_size > 1}
    if s.CACHED_MINI_BATCH_SIZE > 0:
        return losses.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=s.CACHED_MINI_BATCH_SIZE, **loss_options
        )
    return losses.MultipleNegativesRankingLoss(model, **loss_options)


def step_budget(s: SimpleNamespace, train_rows: int, world_size: int, verbose: bool) -> tuple[int, int]:
    """The run's total optimizer steps and its evaluation interval: at least one evaluation per epoch."""
    steps_per_epoch = math.ceil(math.ceil(train_rows / s.BATCH_SIZE) / world_size)
    total_steps = s.MAX_STEPS or steps_per_epoch * s.NUM_TRAIN_EPOCHS
    eval_steps = min(s.EVAL_STEPS, steps_per_epoch, total_steps)
    if verbose and eval_steps != s.EVAL_STEPS:
        print(
            f"EVAL_STEPS={s.EVAL_STEPS} is more than the {min(steps_per_epoch, total_steps)} steps of "
            f"{'one epoch' if steps_per_epoch <= total_steps else 'the run'}: evaluating and saving every "
            f"{eval_steps} steps instead"
        )
    return total_steps, eval_steps


def training_arguments(s: SimpleNamespace, r: SimpleNamespace, checkpoints_dir: Path, eval_steps: int,
                       batch_plan: tuple, columns: list[str]):  # fmt: skip
    """The trainer's arguments: the settings, the device, the grouped batches and the checkpoint schedule."""
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    return SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints_dir),
        num_train_epochs=s.NUM_TRAIN_EPOCHS,
        max_steps=s.MAX_STEPS or -1,
        per_device_train_batch_size=s.BATCH_SIZE,
        per_device_eval_batch_size=s.BATCH_SIZE,
        learning_rate=s.LORA_LEARNING_RATE if s.USE_LORA else s.LEARNING_RATE,
        weight_decay=s.WEIGHT_DECAY,
        warmup_steps=s.WARMUP_RATIO,  # a float below 1 is a fraction of all steps (transformers 5)
        fp16=r.fp16,
        **dataloader_options(r.cuda, r.world_size),
        use_cpu=not r.cuda,  # without it, torchrun on CPUs would train separate, unsynchronised models
        ddp_backend="gloo" if r.world_size > 1 and not r.cuda else None,
        batch_sampler=(
            partial(grouped_batch_sampler, group_of_question=batch_plan[0], neighbours=batch_plan[1])
            if s.NO_DUPLICATE_BATCHES
            else BatchSamplers.BATCH_SAMPLER
        ),
        prompts=training_prompts(s.QUERY_PROMPT, s.PASSAGE_PROMPT, columns),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=s.SAVE_TOTAL_LIMIT,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{PRIMARY_METRIC}",
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 5),
        seed=s.SEED,
        report_to=r.tracking,
        run_name=f"{Path(s.MODEL_NAME).name}-{r.started_at}",
    )


def dataloader_options(cuda: bool, processes: int) -> dict:
    """Worker processes and pinned memory prepare the next batches while a GPU computes: up to 4 per training
    process, sharing the cores but one. On the CPU the cores a worker would take are the ones training, so the main
    process tokenises the batches itself."""
    workers = max(0, min(4, ((os.cpu_count() or 1) - 1) // processes)) if cuda else 0
    return {"dataloader_num_workers": workers, "dataloader_pin_memory": cuda}


def resume_checkpoint(args, checkpoints_dir: Path, fingerprint: dict, resume: bool, r: SimpleNamespace) -> Path | None:
    """The checkpoint to resume from (None: start fresh); the main process arranges the folder first."""
    with args.main_process_first(local=False, desc="checkpoint folder"):
        if r.is_main:
            for line in prepare_checkpoints(checkpoints_dir, fingerprint, resume, r.world_size):
                print(line)
        return last_complete_checkpoint(checkpoints_dir, r.world_size)


def finished_trainer(s: SimpleNamespace, r: SimpleNamespace, model, args, datasets: tuple, loss, evaluator):
    """The trainer after training (resumed from r.resume_from if set); it stops at NaN or inf."""
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import EarlyStoppingCallback

    callbacks = [EarlyStoppingCallback(s.EARLY_STOPPING_PATIENCE)] if s.EARLY_STOPPING_PATIENCE > 0 else []
    callbacks.append(stop_on_non_finite_loss())
    train_dataset, validation_dataset = datasets
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=validation_dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=callbacks,
    )
    if r.is_main:
        pinned = ", pinned memory" if args.dataloader_pin_memory else ""
        print(
            f"training {r.total_steps} steps on {r.world_size} process(es), {'fp16' if r.fp16 else 'fp32'}, "
            f"{args.dataloader_num_workers} data-loader workers{pinned}, tracking: {r.tracking}"
            + (f", resuming from {r.resume_from}" if r.resume_from else "")
        )
    trainer.train(resume_from_checkpoint=str(r.resume_from) if r.resume_from else None)
    print(f"rank {r.rank} of {r.world_size}: finished training at step {trainer.state.global_step}")
    return trainer


def chosen_result(s: SimpleNamespace, trainer, model, judges: tuple, checkpoints_dir: Path):
    """The result loaded into `model`: the best checkpoint or its best mix with the base (best_mix_with_base; with
    general validation sets guarded_mix_with_base), with the best checkpoint's path and the base model's validation
    score. Result (exit 1) when REQUIRE_VALIDATION_GAIN and it does not beat the base model, or when no candidate keeps
    the general sets."""
    base_weights, evaluator, general_sets = judges
    best, best_score = trainer.state.best_model_checkpoint, trainer.state.best_metric
    base_score = validation_metrics_at_step(trainer.state.log_history, 0).get(PRIMARY_METRIC)
    gain_bar = base_score if s.REQUIRE_VALIDATION_GAIN else None  # None: no bar (the recipe, or a resumed run)
    if general_sets:
        choice = guarded_mix_with_base(model, base_weights, evaluator, (best_score, gain_bar), general_sets, s)
    else:
        choice = best_mix_with_base(model, base_weights, evaluator, best_score)
    print(choice_line(base_score, best, choice))
    if general_sets:
        print(general_guard_block(choice["general_guard"]))
    if choice["share"] is None:
        mark_finished(checkpoints_dir, None)
        raise Result(
            f"result: no candidate kept general strength: neither the best checkpoint nor a mix of it with the base "
            f"{'beat the base model on validation NDCG@10 and ' if gain_bar is not None else ''}lost at most "
            f"MAX_GENERAL_DROP={s.MAX_GENERAL_DROP:g} on every general validation set; nothing was saved as the final "
            f"model: keep using {s.MODEL_NAME}, or lower LEARNING_RATE or train fewer steps"
        )
    if s.REQUIRE_VALIDATION_GAIN and base_score is not None and choice["score"] <= base_score:
        mark_finished(checkpoints_dir, None)
        raise Result(
            f"result: no fine-tuned model beat the base model on validation NDCG@10 (base {base_score:.4f}, best "
            f"{choice['score']:.4f}); nothing was saved as the final model: keep using {s.MODEL_NAME}, or add "
            "training pairs, lower LEARNING_RATE or train fewer steps"
        )
    return choice | {"best": best, "base_score": base_score}


def final_lineage(s: SimpleNamespace, r: SimpleNamespace, model, trainer, choice: dict, data: dict, train_rows: int):
    """lineage.json of the final model: base model, data, settings, versions, device, validation and training."""
    import torch

    return {
        "base_model": {
            "name": s.MODEL_NAME,
            "revision": getattr(model.transformers_model.config, "_commit_hash", None),
        },
        "data": data,
        "settings": vars(s),
        "versions": versions(),
        "git_commit": git_commit(),
        "started_at": r.started_at,
        "finished_at": now(),
        "device": f"cuda:0 ({torch.cuda.get_device_name(0)})" if r.cuda else "cpu",
        "precision": "fp16" if r.fp16 else "fp32",
        "best_checkpoint": choice["best"],
        "validation": choice["metrics"]
        or validation_metrics_at_step(trainer.state.log_history, trainer.state.best_global_step),
        "base_validation": choice["base_score"],
        "mix_with_base": {"fine_tuned_share": choice["share"], "validation_scores": choice["tried"]},
        "general_guard": choice.get("general_guard"),
        "lora": s.USE_LORA,
        "training": {
            "global_step": trainer.state.global_step,
            "world_size": r.world_size,
            "train_rows": train_rows,
            "resumed_from": str(r.resume_from) if r.resume_from else None,
            "tracking": r.tracking,
        },
        "evaluations": [],
    }


def saved_final(model, output_dir: Path, lineage: dict, log_history: list[dict], merge_lora: bool) -> Path:
    """save_final(), with a full disk or lost permissions as one error line: the run is not finished, so a rerun
    resumes and saves."""
    try:
        return save_final(model, output_dir, lineage, log_history, merge_lora=merge_lora)
    except OSError as e:
        raise InputError(
            f"cannot save the final model to '{output_dir / 'final'}' ({e.strerror or e}); free disk space or fix "
            "permissions and rerun train.py: it resumes from the last checkpoint (an earlier final model is unchanged)"
        ) from None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact(timestamp: str) -> str:
    """2026-11-22T04:15:00Z -> 20261122T041500Z, for folder names."""
    return timestamp.replace("-", "").replace(":", "")


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".write-test").write_text("ok")
        (folder / ".write-test").unlink()
    except OSError as e:
        raise InputError(
            f"cannot write to output folder '{folder}' ({e.strerror or e}); set OUTPUT_DIR in .env to a writable folder"
        ) from None


def read_split(path: Path, kind: str) -> pd.DataFrame:
    """A split CSV as strings (Question, Answer and the columns split_data.py carried over, such as GROUP_COLUMN);
    anything a user must fix raises InputError."""
    if not path.is_file():
        raise InputError(
            f"{kind} split '{path}' not found; run `python split_data.py` first or set "
            f"{'TRAIN_PATH' if kind == 'training' else 'VALIDATION_PATH'} in .env"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{kind} split '{path}' is not a UTF-8 CSV ({reason}); rerun `python split_data.py`") from None
    missing = [column for column in ("Question", "Answer") if column not in frame.columns]
    if missing:
        raise InputError(
            f"{kind} split '{path}' has no {' or '.join(missing)} column (columns: "
            f"{', '.join(frame.columns)}); rerun `python split_data.py`"
        )
    empty = frame["Question"].str.strip().eq("") | frame["Answer"].str.strip().eq("")
    if empty.any():
        row = int(empty.to_numpy().argmax()) + 2  # +1 for the header, +1 for counting from 1
        raise InputError(f"{kind} split '{path}' row {row} has an empty Question or Answer; fix or drop that row")
    if frame.empty:
        raise InputError(f"{kind} split '{path}' has no rows; rerun `python split_data.py` on more data")
    return frame


def general_validation_sets(s: SimpleNamespace, train: pd.DataFrame, validation: pd.DataFrame) -> list[dict]:
    """The general validation sets of GENERAL_VALIDATION_PATH (path, sha256, rows, frame). A general set stands for
    what the model must not forget, so a row that shares a normalised question or an answer with the training or
    validation split would let in-domain learning pass for general strength: such a set is refused."""
    general_sets = []
    for path in [Path(p.strip()) for p in s.GENERAL_VALIDATION_PATH.split(",") if p.strip()]:
        frame = read_general_set(path)
        questions = frame["Question"].map(normalised_question)
        splits = (("training", s.TRAIN_PATH, train), ("validation", s.VALIDATION_PATH, validation))
        for kind, split_path, split in splits:
            shared_questions = questions.isin(set(split["Question"].map(normalised_question)))
            shared_answers = frame["Answer"].isin(set(split["Answer"]))
            if (shared_questions | shared_answers).any():
                raise InputError(
                    f"general validation set {path} overlaps the {kind} split {split_path}: "
                    f"{int((shared_questions | shared_answers).sum())} of {len(frame)} rows share a normalised "
                    f"question ({int(shared_questions.sum())}) or an answer ({int(shared_answers.sum())}) with it; a "
                    "general set holds questions from other domains: remove those rows"
                )
        general_sets.append({"path": str(path), "sha256": sha256(path), "rows": len(frame), "frame": frame})
    return general_sets


def read_general_set(path: Path) -> pd.DataFrame:
    """A general validation set read as eval.py reads its general sets: Question and Answer columns in any
    capitalisation, no empty cells, UTF-8; each error says how to fix the file."""
    if not path.is_file():
        raise InputError(f"{path} not found; fix GENERAL_VALIDATION_PATH (comma-separated CSV paths)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        detail = str(e).splitlines()[0]
        fix = "save it as UTF-8 (Excel: CSV UTF-8)"
        raise InputError(f"{path} is not a readable UTF-8 CSV ({detail}); {fix}") from None
    frame = frame.rename(columns={c: c.capitalize() for c in frame.columns if c.lower() in ("question", "answer")})
    for column in ("Question", "Answer"):
        if column not in frame.columns:
            raise InputError(
                f"{path} has no {column} column (columns: {list(frame.columns)}); name the columns Question and "
                "Answer in the first line"
            )
        empty = frame.index[frame[column].str.strip() == ""]
        if len(empty):
            raise InputError(f"{path} row {empty[0] + 2}: empty {column}; fill or delete such rows")
    if frame.empty:
        raise InputError(f"{path} has no rows; add rows or fix GENERAL_VALIDATION_PATH")
    return frame


def read_json(path: Path) -> dict | None:
    """A JSON object file's content, or None when it is missing or unreadable. Valid JSON of another shape (a list, a
    number) is an InputError: it parses, but it is not the file that was written there."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict):
        raise InputError(
            f"'{path}' holds a JSON {type(content).__name__}, not the object train.py and split_data.py write there; "
            "restore it or move it away"
        )
    return content


def read_split_manifest(path: Path) -> dict | None:
    """split_data.py's manifest (None when there is none), with the test split's sha256 that lineage.json records."""
    manifest = read_json(path)
    outputs = (manifest or {}).get("outputs", {})
    test = outputs.get("test") if isinstance(outputs, dict) else None
    if manifest is not None and not (isinstance(test, dict) and isinstance(test.get("sha256"), str)):
        raise InputError(
            f"split manifest '{path}' has no outputs.test.sha256, so it is not one split_data.py wrote; rerun "
            "`python split_data.py` (or set SPLIT_MANIFEST_PATH)"
        )
    return manifest


def load_model(name: str):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(name)
    except Exception as e:
        if Path(name).exists():
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable model folder'}"
        elif name.startswith(("/", ".", "~")):
            reason = "no such folder"
        else:
            reason = "no network or hub access"
        raise InputError(
            f"cannot load model '{name}': {reason}; set MODEL_NAME in .env to a local model folder"
        ) from None


def mined_triplets(pairs, model, s: SimpleNamespace, verbose: bool):
    """(anchor, positive, negative) rows: for each question, the training answer the base model ranks highest among
    the wrong ones, unless it scores so close to the right answer that it is probably another right answer."""
    from sentence_transformers.util import mine_hard_negatives

    triplets = mine_hard_negatives(
        pairs,
        model,
        relative_margin=s.HARD_NEGATIVE_MARGIN,
        max_score=s.HARD_NEGATIVE_MAX_SCORE,
        num_negatives=1,
        sampling_strategy="top",
        query_prompt=s.QUERY_PROMPT or None,
        corpus_prompt=s.PASSAGE_PROMPT or None,
        batch_size=s.BATCH_SIZE,
        output_format="triplet",
        verbose=verbose,
    )
    if len(triplets) == 0:
        raise InputError(
            f"no hard negative passed HARD_NEGATIVE_MARGIN={s.HARD_NEGATIVE_MARGIN} and HARD_NEGATIVE_MAX_SCORE="
            f"{s.HARD_NEGATIVE_MAX_SCORE} for any of the {len(pairs)} pairs; lower the margin, raise the maximum "
            "score, or set MINE_HARD_NEGATIVES=false"
        )
    if verbose:
        print(
            f"hard negatives: {len(triplets)} (anchor, positive, negative) rows from {len(pairs)} pairs "
            f"({len(pairs) - len(triplets)} pairs without a negative that passes the margin are left out)"
        )
    return triplets


def group_values_by_question(splits: list[pd.DataFrame], group_column: str | None) -> dict[str, str]:
    """Question -> its GROUP_COLUMN value (e.g. the id a question shares with its translation); empty without one."""
    if not group_column or any(group_column not in split.columns for split in splits):
        return {}
    return {q: g for split in splits for q, g in zip(split["Question"], group_values(split[group_column]), strict=True)}


def group_values(column: pd.Series) -> pd.Series:
    """A GROUP_COLUMN's values stripped, with the markers of a missing value ("NULL", "NA", ...) as "": as in
    split_data.py, they link nothing."""
    values = column.str.strip()
    return values.mask(values.str.casefold().isin(missing_markers), "")


def batch_groups(dataset, group_of_question: dict[str, str]) -> list[str]:
    """Each row's split group, formed as split_data.py forms it, written as a value no question or answer can be."""
    questions = pd.Series(dataset["anchor"])
    group_values = questions.map(group_of_question).fillna("") if group_of_question else None
    groups = group_ids(questions.map(normalised_question), pd.Series(dataset["positive"]), group_values)
    return [f"\x1fsplit group {group}" for group in groups]


def grouped_batch_sampler(dataset, group_of_question: dict[str, str], neighbours=None, **sampler_options):
    """sentence-transformers' NoDuplicatesBatchSampler over the rows plus their split group: no value, and so no
    group, appears twice in a batch, and the first pass over the shuffled rows still yields every row once. For the
    training rows with `neighbours` (confusable_neighbours), the NeighbourBatchSampler's batches instead."""
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    if neighbours is not None and neighbours.anchors == dataset["anchor"]:
        sampler = neighbour_batch_sampler_class()
        return sampler(dataset, neighbours.groups, neighbours.rows, neighbours.per_row, **sampler_options)
    groups = batch_groups(dataset, group_of_question)
    return NoDuplicatesBatchSampler(dataset.add_column("split_group", groups), **sampler_options)


def confusable_neighbours(model, dataset, group_of_question: dict[str, str], s: SimpleNamespace, verbose: bool):
    """For each training row, up to NEIGHBOUR_CANDIDATES other rows, best first, whose answers the base model scores
    highest for the row's question: the in-batch negatives that teach most. Rows of the same split group never count,
    nor answers the base scores above the row's own (more likely a second right answer than a wrong one). Computed
    before training from the base model alone, so a resumed run or another torchrun rank finds the same. Returned with
    the rows' split group numbers, which the sampler needs too; None when NEIGHBOUR_ROWS is 0."""
    if not s.NEIGHBOUR_ROWS:
        return None
    import torch

    started = time.perf_counter()
    anchors = dataset["anchor"]
    answer_of_row, answers = pd.factorize(pd.Series(dataset["positive"]))  # each distinct answer encoded once
    options = {"batch_size": s.BATCH_SIZE, "convert_to_tensor": True, "normalize_embeddings": True}
    questions = model.encode_query(anchors, **options)
    documents = model.encode_document(list(answers), **options)[torch.as_tensor(answer_of_row)]
    group_numbers = pd.factorize(pd.Series(batch_groups(dataset, group_of_question)))[0]
    groups = torch.as_tensor(group_numbers, device=questions.device)
    k = min(NEIGHBOUR_CANDIDATES, len(anchors) - 1)
    rows = []
    for start in range(0, len(anchors), 512):
        scores = questions[start : start + 512] @ documents.T
        own = (questions[start : start + 512] * documents[start : start + 512]).sum(dim=1, keepdim=True)
        scores[(groups[start : start + 512, None] == groups[None, :]) | (scores > own)] = -torch.inf
        best = scores.topk(k, dim=1)
        rows.append(torch.where(best.values > -torch.inf, best.indices, -1).cpu())
    if verbose:
        print(
            f"neighbour batches: each random row brings up to {s.NEIGHBOUR_ROWS} of the {k} answers the base model "
            f"confuses most with its own ({time.perf_counter() - started:.0f} s)"
        )
    rows = torch.cat(rows).numpy()
    return SimpleNamespace(anchors=anchors, groups=group_numbers, rows=rows, per_row=s.NEIGHBOUR_ROWS)


@cache
def neighbour_batch_sampler_class():
    """NeighbourBatchSampler, built on first use: sentence-transformers loads slowly, after the settings are read."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class NeighbourBatchSampler(DefaultBatchSampler):
        """Batches of neighbourhoods: the next row of a seeded shuffle and up to `per_row` of its confusable
        neighbours not yet used this epoch, then the next row, until the batch is full. No split group twice in a
        batch; every row once per epoch (a row whose group is already in the batch waits for the next one)."""

        def __init__(self, dataset, groups, neighbours, per_row, batch_size, drop_last, valid_label_columns=None,
                     generator=None, seed=0):  # fmt: skip
            super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
            self.groups, self.neighbours, self.per_row = groups, neighbours, per_row

        def __iter__(self):
            import torch

            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            waiting = deque(torch.randperm(len(self.groups), generator=generator).tolist())
            used = np.zeros(len(self.groups), dtype=bool)
            while waiting:
                batch, taken, skipped = [], set(), []
                while waiting and len(batch) < self.batch_size:
                    row = waiting.popleft()
                    if used[row]:
                        continue
                    if self.groups[row] in taken:
                        skipped.append(row)
                        continue
                    room = min(self.per_row, self.batch_size - len(batch) - 1)
                    for i in [row, *self.free_neighbours(row, used, taken, room)]:
                        used[i] = True
                        taken.add(self.groups[i])
                        batch.append(i)
                waiting.extendleft(reversed(skipped))
                if batch and (len(batch) == self.batch_size or not self.drop_last):
                    yield batch

        def free_neighbours(self, row: int, used: np.ndarray, taken: set, room: int) -> list[int]:
            """Up to `room` of the row's neighbours, best first, unused and of groups new to the batch."""
            found, groups = [], {self.groups[row]}
            for neighbour in self.neighbours[row]:
                if len(found) == room:
                    break
                group = self.groups[neighbour]
                if neighbour >= 0 and not used[neighbour] and group not in taken and group not in groups:
                    found.append(int(neighbour))
                    groups.add(group)
            return found

        def __len__(self):
            rows = len(self.groups)
            return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    return NeighbourBatchSampler


@cache
def punctuation_table() -> dict[int, None]:
    """str.translate's table that deletes every Unicode punctuation character (categories Pc, Pd, Ps, Pe, Pi, Pf,
    Po); three times faster than a regular expression of them, which matters at a million questions."""
    return dict.fromkeys(c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == "P")


def normalised_question(question: str) -> str:
    """The question as near-duplicates share it: case-folded, punctuation removed, whitespace collapsed."""
    key = " ".join(question.casefold().translate(punctuation_table()).split())
    return key or question.casefold()


def group_ids(question_keys: pd.Series, answers: pd.Series, group_values: pd.Series | None) -> np.ndarray:
    """Each row's group: connected components of rows linked by normalised question, answer or group value."""
    question_codes, questions = pd.factorize(question_keys)
    answer_codes, answer_texts = pd.factorize(answers)
    sources, targets = [question_codes], [len(questions) + answer_codes]
    nodes = len(questions) + len(answer_texts)
    if group_values is not None:
        group_codes, values = pd.factorize(group_values.where(group_values != ""))
        has_group = group_codes >= 0
        sources.append(question_codes[has_group])
        targets.append(nodes + group_codes[has_group])
        nodes += len(values)
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)), shape=(nodes, nodes))
    _, components = connected_components(graph, directed=False)
    return pd.factorize(components[question_codes])[0]


def training_prompts(query_prompt: str, passage_prompt: str, columns: list[str]) -> dict[str, str]:
    """Column -> prompt for the trainer, which prepends it to every text of that column."""
    prompts = {"anchor": query_prompt, "positive": passage_prompt, "negative": passage_prompt}
    return {column: prompt for column, prompt in prompts.items() if prompt and column in columns}


def grouped_ir_evaluator(pairs: pd.DataFrame, corpus_answers, name: str, query_prompt: str, corpus_prompt: str):
    """One document per distinct answer text and one query per distinct question, so that an identical copy of the
    right answer counts as a hit (eval.py builds its test evaluator the same way)."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    corpus_ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(corpus_answers))}
    query_ids: dict[str, str] = {}
    relevant_docs: dict[str, set[str]] = {}
    for question, answer in zip(pairs["Question"], pairs["Answer"], strict=True):
        query_id = query_ids.setdefault(question, f"q{len(query_ids)}")
        relevant_docs.setdefault(query_id, set()).add(corpus_ids[answer])
    return InformationRetrievalEvaluator(
        queries={query_id: question for question, query_id in query_ids.items()},
        corpus={doc_id: text for text, doc_id in corpus_ids.items()},
        relevant_docs=relevant_docs,
        name=name,
        query_prompt=query_prompt or None,
        corpus_prompt=corpus_prompt or None,
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(s: SimpleNamespace, world_size: int) -> dict:
    """What makes two runs the same optimisation: the data, the settings that shape it, the number of processes."""
    return {
        "train_sha256": sha256(Path(s.TRAIN_PATH)),
        "validation_sha256": sha256(Path(s.VALIDATION_PATH)),
        "world_size": world_size,
        "settings": {name: value for name, value in vars(s).items() if name not in NOT_IN_RUN_FINGERPRINT},
    }


def prepare_checkpoints(checkpoints_dir: Path, fingerprint: dict, resume: bool, world_size: int) -> list[str]:
    """Leave only checkpoints this run may resume from in `checkpoints_dir`; move everything else aside (never
    delete). Returns the lines to print about it."""
    run_file = checkpoints_dir / "run.json"
    checkpoints = sorted(checkpoints_dir.glob("checkpoint-*"), key=checkpoint_step)
    previous = read_json(run_file)
    reason = None  # stays None for a first run (nothing to resume or move aside) and for a run that may resume
    if not checkpoints and previous is None:
        pass
    elif not resume:
        reason = "RESUME=False"
    elif previous is None:
        reason = f"{run_file} is missing or unreadable, so the checkpoints may come from other data or settings"
    elif previous.get("finished_at"):
        reason = f"the previous run finished ({previous['finished_at']}, final model {previous.get('final')})"
    elif previous.get("fingerprint") != fingerprint:
        reason = (
            f"data or settings changed since the checkpoints were written ({fingerprint_diff(previous, fingerprint)})"
        )
    lines = []
    if reason and checkpoints_dir.exists():
        aside = move_aside(checkpoints_dir, f"checkpoints-{compact(now())}")
        lines.append(f"starting a new run: {reason}; old checkpoints moved to {aside}")
        previous, checkpoints = None, []
    for checkpoint in reversed(checkpoints):  # newest first: the ones a kill may have cut short
        problem = checkpoint_problem(checkpoint, world_size)
        if problem is None:
            break
        aside = move_aside(checkpoint, f"incomplete-{checkpoint.name}-{compact(now())}", parent=checkpoints_dir.parent)
        lines.append(f"skipping {checkpoint.name}: {problem}; moved to {aside}")
    if previous is None:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, {"fingerprint": fingerprint, "started_at": now(), "finished_at": None})
    return lines


def fingerprint_diff(previous: dict, fingerprint: dict) -> str:
    old, new = previous.get("fingerprint"), fingerprint
    old = old if isinstance(old, dict) else {}
    changed = [key for key in ("train_sha256", "validation_sha256", "world_size") if old.get(key) != new.get(key)]
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    changed += [name for name, value in new["settings"].items() if old_settings.get(name) != value]
    return "changed: " + ", ".join(changed) if changed else "unknown fingerprint format"


def checkpoint_step(path: Path) -> int:
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def last_complete_checkpoint(checkpoints_dir: Path, world_size: int) -> Path | None:
    checkpoints = sorted(checkpoints_dir.glob("checkpoint-*"), key=checkpoint_step, reverse=True)
    return next((path for path in checkpoints if checkpoint_problem(path, world_size) is None), None)


def checkpoint_problem(checkpoint: Path, world_size: int) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, empty or unloadable), or None if it is complete.
    The trainer writes trainer_state.json last, so a checkpoint killed mid-write lacks it or something before it."""
    import torch
    from safetensors import safe_open

    weights = [name for name in ("model.safetensors", "adapter_model.safetensors") if (checkpoint / name).exists()]
    if not weights:
        return "no model weights (model.safetensors or adapter_model.safetensors)"
    rng_files = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    needed = ["trainer_state.json", "modules.json", "optimizer.pt", "scheduler.pt", *rng_files, weights[0]]
    for name in needed:
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{name} missing or empty"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        json.loads((checkpoint / "modules.json").read_text())
        with safe_open(str(checkpoint / weights[0]), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                f.get_tensor(key)
        for name in ["optimizer.pt", "scheduler.pt", *rng_files]:
            torch.load(checkpoint / name, map_location="cpu", weights_only=False, mmap=name == "optimizer.pt")
    except Exception as e:
        return f"unreadable file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})"
    return None


def move_aside(path: Path, name: str, parent: Path | None = None) -> Path:
    """Rename `path` to `name` (in `parent`, default its own folder), adding a counter if that name is taken."""
    parent = parent or path.parent
    target, counter = parent / name, 1
    while target.exists():
        counter += 1
        target = parent / f"{name}-{counter}"
    os.replace(path, target)
    return target


def write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def mark_finished(checkpoints_dir: Path, final: Path) -> None:
    """Record that this run is done, so that the next `python train.py` starts a new run instead of resuming it."""
    run_file = checkpoints_dir / "run.json"
    run = read_json(run_file) or {}
    write_json_atomic(run_file, {**run, "finished_at": now(), "final": str(final)})


def data_lineage(
    s: SimpleNamespace,
    manifest: dict | None,
    manifest_path: Path,
    fingerprint: dict,
    train_rows: int,
    validation_rows: int,
) -> dict:
    """The data behind this model; the split hashes were taken for the run fingerprint, the rows counted at reading."""
    return {
        "split_manifest": {"path": str(manifest_path), "sha256": sha256(manifest_path) if manifest else None},
        "train": {"path": s.TRAIN_PATH, "sha256": fingerprint["train_sha256"], "rows": train_rows},
        "validation": {"path": s.VALIDATION_PATH, "sha256": fingerprint["validation_sha256"], "rows": validation_rows},
        "test_sha256": manifest["outputs"]["test"]["sha256"] if manifest else None,  # checked by read_split_manifest
    }


def versions() -> dict:
    import sentence_transformers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def validation_metrics_at_step(log_history: list[dict], step: int | None) -> dict:
    """The validation metrics logged at `step` (step 0: the base model, evaluated before the first step), without the
    trainer's `eval_`; empty when that step was not evaluated."""
    for entry in log_history:
        if entry.get("step") == step and f"eval_{PRIMARY_METRIC}" in entry:
            return {
                key.removeprefix("eval_"): value for key, value in entry.items() if key.startswith("eval_validation_")
            }
    return {}


def best_mix_with_base(model, base_weights: dict | None, evaluator, best_score: float) -> dict:
    """Load into `model` whichever scores best on validation: the best checkpoint (share 1.0) or a mix of its weights
    with the base's (WiSE-FT). Fine-tuning on a few thousand pairs moves the weights far in a few directions; part of
    the way often keeps the gain and loses less of what the base model knew. Returns the share, its score, the
    scores tried and (for a mix) its validation metrics."""
    tried = {1.0: best_score}
    if base_weights is None:
        return {"share": 1.0, "score": best_score, "tried": tried, "metrics": None}
    tuned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    metrics = {}
    for share in MIX_WEIGHTS:
        model.load_state_dict(mixed_weights(base_weights, tuned, share))
        metrics[share] = evaluator(model)
        tried[share] = metrics[share][PRIMARY_METRIC]
    share = max(tried, key=lambda k: (tried[k], k))  # on a tie, the larger share of the fine-tuned weights
    model.load_state_dict(mixed_weights(base_weights, tuned, share))
    return {"share": share, "score": tried[share], "tried": tried, "metrics": metrics.get(share)}


def guarded_mix_with_base(model, base_weights: dict, evaluator, bars: tuple, general_sets: list[dict], s) -> dict:
    """Load into `model` what the general guard keeps: of the best checkpoint (share 1.0) and its mixes with the base
    (MIX_WEIGHTS), the one with the best validation NDCG@10 among those that beat the base there (`bars`: the best
    checkpoint's score and the base's, None for no bar) and lose at most MAX_GENERAL_DROP on every general validation
    set, each scored as its own corpus, the base (share 0) too. Returns best_mix_with_base's fields, share None when
    no candidate qualifies, and the guard's record for lineage.json."""
    best_score, gain_bar = bars
    tuned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    judges = [grouped_ir_evaluator(g["frame"], g["frame"]["Answer"], "general", s.QUERY_PROMPT, s.PASSAGE_PROMPT)
              for g in general_sets]  # fmt: skip
    tried, general, metrics = {1.0: best_score}, {}, {}
    for share in (0.0, *MIX_WEIGHTS, 1.0):
        model.load_state_dict(mixed_weights(base_weights, tuned, share))
        if share in MIX_WEIGHTS:
            metrics[share] = evaluator(model)
            tried[share] = metrics[share][PRIMARY_METRIC]
        general[share] = [judge(model)[GENERAL_METRIC] for judge in judges]
    base_general = general.pop(0.0)
    names = [Path(g["path"]).name for g in general_sets]
    share, verdicts = guarded_share(tried, general, gain_bar, base_general, (names, s.MAX_GENERAL_DROP))
    model.load_state_dict(mixed_weights(base_weights, tuned, 1.0 if share is None else share))
    sets = [
        {key: g[key] for key in ("path", "sha256", "rows")}
        | {"base": base_general[i], "chosen": None if share is None else general[share][i],
           "tried": {k: scores[i] for k, scores in sorted(general.items())}}
        for i, g in enumerate(general_sets)
    ]  # fmt: skip
    guard = {"method": "mix_with_base", "fine_tuned_share": share, "max_general_drop": s.MAX_GENERAL_DROP,
             "sets": sets, "verdicts": verdicts}  # fmt: skip
    score = None if share is None else tried[share]
    return {"share": share, "score": score, "tried": tried, "metrics": metrics.get(share), "general_guard": guard}


def guarded_share(validation: dict, general: dict, gain_bar: float | None, base_general: list[float],
                  limit: tuple[list[str], float]) -> tuple[float | None, dict]:  # fmt: skip
    """The share of fine-tuned weights the general guard keeps (None: none qualifies) and each candidate's verdict in
    words. `validation`: share -> in-domain validation NDCG@10; `general`: share -> NDCG@10 per general set, in the
    order of `base_general` (the base's) and of the set names in `limit`, with MAX_GENERAL_DROP. Each rule is written
    as "not (within its limit)", so a NaN score disqualifies."""
    names, max_drop = limit
    verdicts = {}
    for share in sorted(validation, reverse=True):
        drops = [base - score for base, score in zip(base_general, general[share], strict=True)]
        worst = max(range(len(drops)), key=lambda i: (not drops[i] <= max_drop, drops[i]))
        if gain_bar is not None and not validation[share] > gain_bar:
            verdicts[share] = f"validation {validation[share]:.4f} does not beat the base's {gain_bar:.4f}"
        elif not drops[worst] <= max_drop:
            verdicts[share] = f"loses {drops[worst]:.4f} on {names[worst]}, more than MAX_GENERAL_DROP={max_drop:g}"
        else:
            verdicts[share] = "qualifies"
    qualified = [share for share, verdict in verdicts.items() if verdict == "qualifies"]
    return max(qualified, key=lambda k: (validation[k], k), default=None), verdicts


def general_guard_block(guard: dict) -> str:
    """The general guard's lines: base vs chosen per general set, each candidate's verdict, and what was kept."""
    share, limit = guard["fine_tuned_share"], guard["max_general_drop"]
    lines = [f"general guard (no general validation set may lose more than MAX_GENERAL_DROP={limit:g} NDCG@10):"]
    for g in guard["sets"]:
        kept = "nothing kept" if share is None else f"kept {g['chosen']:.4f} (Δ={g['chosen'] - g['base']:+.4f})"
        lines.append(f"  {g['path']} ({g['rows']} rows): base {g['base']:.4f} | {kept}")
    lines += [f"  share {k:g}: {verdict}" for k, verdict in guard["verdicts"].items()]
    if share is not None:
        lines.append(
            f"kept share {share:g}: the best validation NDCG@10 of the candidates that beat the base there and keep "
            "every general set within the limit"
        )
    return "\n".join(lines)


def mixed_weights(base: dict, tuned: dict, share: float) -> dict:
    """base + share * (tuned - base) for every floating-point tensor; integer buffers are taken from `tuned`."""
    return {
        name: base[name] + share * (tensor - base[name]) if tensor.is_floating_point() else tensor
        for name, tensor in tuned.items()
    }


def choice_line(base_score: float | None, best_checkpoint: str | None, choice: dict) -> str:
    tried = ", ".join(f"{share:g}: {score:.4f}" for share, score in sorted(choice["tried"].items()) if share < 1)
    base = "not evaluated (resumed run)" if base_score is None else f"{base_score:.4f}"
    line = f"validation NDCG@10: base {base} | best checkpoint {choice['tried'][1.0]:.4f} ({best_checkpoint})"
    if tried:
        line += f" | mixed with the base (share of fine-tuned weights: score) {tried}"
        line += "; kept none" if choice["share"] is None else f"; kept share {choice['share']:g}"
    return line


def save_final(model, output_dir: Path, lineage: dict, log_history: list[dict], merge_lora: bool) -> Path:
    """Write the model to a temporary folder, then swap it in as OUTPUT_DIR/final; an earlier final is renamed to
    final-<its finished_at>, never deleted. A kill at any point leaves the earlier final readable."""
    broken = non_finite_weights(model)
    if broken:
        raise InputError(
            f"the trained model is broken ({broken}); it is not saved as final: lower LEARNING_RATE (or "
            "LORA_LEARNING_RATE) and rerun"
        )
    partial = output_dir / ".final-partial"
    if partial.exists():
        shutil.rmtree(partial)  # our own unfinished write from a killed run: never a usable model
    model.save(str(partial))
    write_json_atomic(partial / "lineage.json", lineage)
    save_training_curve(log_history, partial / "training_curve.png")
    if merge_lora:
        merge_lora_into_base(model)
        model.save(str(partial / "merged"))
        write_json_atomic(partial / "merged" / "lineage.json", {**lineage, "lora": False, "merged_from_lora": True})
    final = output_dir / "final"
    if final.exists():
        try:
            old = read_json(final / "lineage.json") or {}
        except InputError:  # a damaged old lineage.json only loses its time stamp
            old = {}
        stamp = old.get("finished_at") or datetime.datetime.fromtimestamp(final.stat().st_mtime, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        print(f"earlier final model moved to {move_aside(final, f'final-{compact(stamp)}')}")
    os.replace(partial, final)
    return final


def non_finite_weights(model) -> str | None:
    """Which of the model's weight tensors hold NaN or inf, in words ("3 of 39 weight tensors, e.g. ..."), or None."""
    import torch

    tensors = {name: p for name, p in model.state_dict().items() if torch.is_floating_point(p)}
    broken = [name for name, p in tensors.items() if not bool(torch.isfinite(p).all())]
    return f"{len(broken)} of {len(tensors)} weight tensors, e.g. {broken[0]}, hold NaN or inf" if broken else None


def stop_on_non_finite_loss():
    """A trainer callback that stops the run with one error line as soon as a logged training loss or the weights
    hold NaN or inf: every later step and checkpoint would be broken too. The weights are checked as well because the
    trainer logs a NaN loss as a finite one (logging_nan_inf_filter); at each log and each evaluation (the first is
    the base model's, before step 1, so a model with NaN weights stops at step 0)."""
    from transformers import TrainerCallback

    def check(state, model, loss=None) -> None:
        broken = non_finite_weights(model) if model is not None else None
        if loss is not None and not math.isfinite(loss):
            broken = f"the training loss is {loss}"
        if broken:
            from tqdm.auto import tqdm

            bars = list(getattr(tqdm, "_instances", ()))
            for bar in bars:  # the trainer's progress bars: the error is the last line
                bar.close()
            if bars:  # a closed inner bar (the evaluation's) leaves the cursor at the end of the line above
                print(file=sys.stderr)
            raise InputError(
                f"training stopped at step {state.global_step}: NaN or inf in the training ({broken}); nothing is "
                "saved as final: lower LEARNING_RATE (or LORA_LEARNING_RATE), or check MODEL_NAME's weights, and rerun"
            )

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            check(state, kwargs.get("model"), (logs or {}).get("loss"))

        def on_evaluate(self, args, state, control, **kwargs):
            check(state, kwargs.get("model"))

    return StopOnNonFiniteLoss()


def merge_lora_into_base(model) -> None:
    """Fold the LoRA weights into the base weights and drop the adapter layers, so the model saves as a plain full
    model (peft's merge_and_unload, for a transformers model that holds its adapter itself)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    transformers_model = model.transformers_model
    for name, module in list(transformers_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(transformers_model.get_submodule(parent), child, module.get_base_layer())
    del transformers_model.peft_config
    transformers_model._hf_peft_config_loaded = False


def save_training_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> list[tuple[int, float]]:
        return [(entry["step"], entry[key]) for entry in log_history if key in entry]

    figure, (loss_axis, score_axis) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    # Validation loss rising while training loss falls is overfitting; both flat and high is underfitting.
    for key, label, style in (("loss", "training", "."), ("eval_loss", "validation", "o")):
        if points := series(key):
            loss_axis.plot(*zip(*points, strict=True), marker=style, label=label)
    loss_axis.set_ylabel("MNRL loss")
    loss_axis.legend()
    if scores := series(f"eval_{PRIMARY_METRIC}"):
        score_axis.plot(*zip(*scores, strict=True), marker="o", color="tab:green")
        if scores[0][0] == 0:
            score_axis.axhline(scores[0][1], color="grey", linestyle="--", label="base model (step 0)")
            score_axis.legend()
    score_axis.set_ylabel("validation NDCG@10")
    score_axis.set_xlabel("step")
    figure.suptitle("Training curve")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    run(main)
