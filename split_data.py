"""Curate a question/answer CSV and split it into train, validation and test sets without leaks.

Reads DATA_PATH (default data/qa_data.csv), cleans it, drops exact duplicates, groups the rows that must stay
together (same normalised question, same answer, same GROUP_COLUMN value) and puts whole groups into train,
validation and test (80/10/10). Rows that an earlier run already split keep their split, so the test set stays
the test set as the data grows. Writes the three split CSVs and DATA_DIR/split_manifest.json (a .lock beside them
keeps a second run out while this one runs).

    python split_data.py
    DATA_PATH=my_faq.csv GROUP_COLUMN=id python split_data.py
"""

import codecs
import contextlib
import csv
import difflib
import functools
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import tokenize
import unicodedata
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from dotenv import dotenv_values, load_dotenv
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# --- Settings: edit here, or override any of them by name in .env or the environment (`--help` lists them) ---
DATA_DIR = "data"  # the folder of the input, the splits and the manifest
DATA_PATH = ""  # "" -> DATA_DIR/qa_data.csv
TRAIN_PATH = ""  # "" -> DATA_DIR/qa_training_set.csv
VALIDATION_PATH = ""  # "" -> DATA_DIR/qa_validation_set.csv
TEST_PATH = ""  # "" -> DATA_DIR/qa_test_set.csv
SPLIT_MANIFEST_PATH = ""  # "" -> DATA_DIR/split_manifest.json
SEED = 42  # decides the order in which new groups are dealt out to the splits
VALIDATION_FRACTION = 0.1  # share of the rows that go to the validation split
TEST_FRACTION = 0.1  # share of the rows that go to the test split
GROUP_COLUMN = ""  # rows with the same non-empty value here share a split, e.g. "id" keeps XQuAD translations together
SCRUB_PII = False  # replace e-mail addresses, phone numbers and IBANs in questions and answers by placeholders

# What the settings block below allows: a rule per setting ('>0', '>=1', '[0,1)', '(0,1)', 'a|b', 'nonempty'; every
# float must be finite), checks across settings, the paths "" fills in, and the paths that must be different files.
LIMITS = {"DATA_DIR": "nonempty", "VALIDATION_FRACTION": "(0,1)", "TEST_FRACTION": "(0,1)"}
CHECKS = [
    (
        ("VALIDATION_FRACTION", "TEST_FRACTION"),
        lambda v: v["VALIDATION_FRACTION"] + v["TEST_FRACTION"] < 1,
        "their sum must stay below 1, or nothing is left to train on",
    )
]
DERIVED_PATHS = {
    "DATA_PATH": ("DATA_DIR", "qa_data.csv"),
    "TRAIN_PATH": ("DATA_DIR", "qa_training_set.csv"),
    "VALIDATION_PATH": ("DATA_DIR", "qa_validation_set.csv"),
    "TEST_PATH": ("DATA_DIR", "qa_test_set.csv"),
    "SPLIT_MANIFEST_PATH": ("DATA_DIR", "split_manifest.json"),
}
DISTINCT_PATHS = ("DATA_PATH", "TRAIN_PATH", "VALIDATION_PATH", "TEST_PATH", "SPLIT_MANIFEST_PATH")

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


# Lower-case on purpose: everything UPPER_CASE above is a setting.
split_names = ("train", "validation", "test")
split_settings = ("SEED", "VALIDATION_FRACTION", "TEST_FRACTION", "GROUP_COLUMN", "SCRUB_PII")
# Changing these regroups rows that are already split, which could put one group on both sides of a split.
grouping_settings = ("GROUP_COLUMN", "SCRUB_PII")
# How pandas, R, SQL and Excel exports write a missing value: such a cell is as empty as an empty one.
missing_markers = {"nan", "na", "n/a", "#n/a", "<na>", "null"}
# IBANs before phone numbers, whose digits they contain. A phone number starts with + or 0 and is separated by
# spaces, / or -, never dots, so that dates like 01.02.2024 are left alone.
pii_patterns = {
    "email": (re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}"), "[EMAIL]"),
    "iban": (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), "[IBAN]"),
    "phone": (
        re.compile(r"(?<![\w+])(?:\+\d{1,3}[ /-]?|\(?0\d{1,5}\)?[ /-]?)\d(?:[ /-]?\d){4,12}(?!\w)"),
        "[PHONE]",
    ),
}


@releasing_locks
def main() -> None:
    # 1. Settings: the constants above, overridden by .env and the environment.
    s = settings()
    print_settings(s)
    outputs = {"train": s.TRAIN_PATH, "validation": s.VALIDATION_PATH, "test": s.TEST_PATH}

    # 2. Read the input; lock the output folders; read the previous split. Split files that no longer match their
    #    manifest were edited by hand (or restored wrongly): refusing is the only way not to lose or replace them.
    raw = input_bytes(s.DATA_PATH)
    input_sha256 = hashlib.sha256(raw).hexdigest()
    lock_folders([os.path.dirname(path) or "." for path in [*outputs.values(), s.SPLIT_MANIFEST_PATH]])
    previous = previous_manifest(s, outputs)
    if previous and previous["input"]["sha256"] == input_sha256 and previous["settings"] == split_settings_of(s):
        print(f"input and settings unchanged since {s.SPLIT_MANIFEST_PATH}: the splits are up to date, nothing written")
        for name, output in previous["outputs"].items():
            print(f"  {name}: {output['rows']:,} rows in {output['path']}")
        return
    frame, encoding, delimiter = input_table(raw, s.DATA_PATH)
    rows_read = len(frame)
    del raw
    group_column = matching_column(frame, s.GROUP_COLUMN, s.DATA_PATH) if s.GROUP_COLUMN else None
    language_column = next((c for c in frame.columns if str(c).strip().casefold() == "language"), None)

    # 3. Clean: Unicode NFC and single spaces, then drop what cannot be a training pair.
    frame, counts = cleaned_pairs(frame, s)
    counts = {"rows_read": rows_read, **counts}

    # 4. Deduplicate and group: exact duplicate pairs go, and every row joins the connected component of rows
    #    that share its normalised question, its answer or its group value. A component never straddles splits.
    frame, question_keys, group = grouped_pairs(frame, group_column, counts, s.DATA_PATH)

    # 5. Assign: rows from the previous split keep it, new rows follow their group, new groups are dealt out.
    frame, split = assigned_rows(frame, group, question_keys, previous, outputs, counts, s)

    # 6. Write all splits to temporary files first, then rename them into place, the manifest last: a run that
    #    dies on the way leaves the previous files whole.
    contents = {
        name: frame[split == i].to_csv(index=False, lineterminator="\n").encode("utf-8")
        for i, name in enumerate(split_names)
    }
    if language_column:
        languages = frame[language_column].astype(str).str.strip().to_numpy()
        counts["by_language"] = {
            language: {name: int(((languages == language) & (split == i)).sum()) for i, name in enumerate(split_names)}
            for language in sorted(set(languages))
        }
    source = {"path": s.DATA_PATH, "sha256": input_sha256, "rows": rows_read, "encoding": encoding}
    manifest = split_manifest(source | {"delimiter": delimiter}, counts, outputs, contents, previous, s)
    files = {outputs[name]: contents[name] for name in split_names}
    files[s.SPLIT_MANIFEST_PATH] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomically(files)
    print_written(manifest, previous, s.SPLIT_MANIFEST_PATH)


def previous_manifest(s: SimpleNamespace, outputs: dict[str, str]) -> dict | None:
    """The previous run's manifest, its split files checked unchanged (None for a first run), after finishing the
    renames of a run killed while making them. Changing a grouping setting under an existing split is refused."""
    if finished_interrupted_write([*outputs.values(), s.SPLIT_MANIFEST_PATH]):
        print(f"finished the renames of an earlier run killed while making them: {s.SPLIT_MANIFEST_PATH} is that run's")
    previous = verified_previous_manifest(s.SPLIT_MANIFEST_PATH, outputs)
    for name in grouping_settings if previous else ():
        if previous["settings"].get(name) != vars(s)[name]:
            raise InputError(
                f"{name} changed from {previous['settings'].get(name)!r} to {vars(s)[name]!r} since "
                f"{s.SPLIT_MANIFEST_PATH} was written, which "
                f"would regroup rows that are already split; set {name} back, or delete the three split files and "
                f"the manifest to split from scratch"
            )
    return previous


def input_table(raw: bytes, path: str) -> tuple[pd.DataFrame, str, str]:
    """The input as a table with Question and Answer first, how it was decoded and its delimiter."""
    data, encoding = utf8_bytes(raw, path)
    frame, delimiter = read_table(data, path)
    print(
        f"2. read {path}: {len(frame):,} rows; columns {', '.join(frame.columns)}; {encoding}; delimiter {delimiter!r}"
    )
    return frame, encoding, delimiter


def cleaned_pairs(frame: pd.DataFrame, s: SimpleNamespace) -> tuple[pd.DataFrame, dict]:
    """The rows with a cleaned question and answer (PII scrubbed when SCRUB_PII), and the counts of what went."""
    frame["Question"] = cleaned(frame["Question"])
    frame["Answer"] = cleaned(frame["Answer"])
    header_repeats = (frame["Question"].str.casefold() == "question") & (frame["Answer"].str.casefold() == "answer")
    frame = frame[~header_repeats]
    for column in ("Question", "Answer"):
        if len(frame) and (frame[column] == "").all():
            raise InputError(f"column {column} of {s.DATA_PATH} is empty in every row; fill it in")
    empty = (frame["Question"] == "") | (frame["Answer"] == "")
    frame = frame[~empty]
    print(
        f"3. cleaned: {int(header_repeats.sum()):,} repeated header lines and {int(empty.sum()):,} rows with an "
        f"empty (or NaN/NULL) question or answer dropped"
    )
    counts = {"header_repeats": int(header_repeats.sum()), "dropped_empty": int(empty.sum())}
    if s.SCRUB_PII:
        frame["Question"], question_counts = scrubbed(frame["Question"])
        frame["Answer"], answer_counts = scrubbed(frame["Answer"])
        counts["pii_replaced"] = {kind: question_counts[kind] + answer_counts[kind] for kind in pii_patterns}
        print("   PII replaced: " + ", ".join(f"{n:,} {kind}" for kind, n in counts["pii_replaced"].items()))
    return frame, counts


def grouped_pairs(
    frame: pd.DataFrame, group_column: str | None, counts: dict, path: str
) -> tuple[pd.DataFrame, pd.Series, np.ndarray]:
    """The rows without exact duplicate pairs, their normalised questions and each row's group; adds the counts."""
    duplicates = frame.duplicated(["Question", "Answer"])
    frame = frame[~duplicates]
    if frame.empty:
        raise InputError(f"{path} has no rows with both a question and an answer; add some")
    question_keys = frame["Question"].map(normalised_question)
    group_values = cleaned(frame[group_column].astype(str)) if group_column else None  # "NULL", "NA": no group
    group = group_ids(question_keys, frame["Answer"], group_values)
    counts |= {"exact_duplicates": int(duplicates.sum()), "groups": int(group.max()) + 1}
    linked_by = "normalised question, answer" + (f" or {group_column}" if group_column else "")
    print(
        f"4. deduplicated: {int(duplicates.sum()):,} exact duplicate pairs dropped; {len(frame):,} rows in "
        f"{counts['groups']:,} groups (rows linked by {linked_by})"
    )
    return frame, question_keys, group


def assigned_rows(
    frame: pd.DataFrame,
    group: np.ndarray,
    question_keys: pd.Series,
    previous: dict | None,
    outputs: dict[str, str],
    counts: dict,
    s: SimpleNamespace,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows that are written and each one's split (0 train, 1 validation, 2 test); adds the counts."""
    previous_split = previous_splits(frame, outputs) if previous else np.full(len(frame), np.nan)
    split, bridging = assigned_splits(group, previous_split, question_keys.to_numpy(), s)
    new, held_out = int(np.isnan(previous_split).sum()), int(bridging.sum())
    kept = len(frame) - new
    print(
        f"5. assigned: {kept:,} rows kept their previous split, {new - held_out:,} new rows assigned, {held_out:,} "
        f"held out (each links groups that are already in different splits)"
    )
    for number, question in zip(frame.index[bridging][:3], frame["Question"][bridging][:3], strict=True):
        print(f"   held out: row {number + 1}: {question[:80]!r}")
    frame, split = frame[~bridging], split[~bridging].astype(int)
    by_split = {name: int((split == i).sum()) for i, name in enumerate(split_names)}
    for name, rows in by_split.items():
        if rows == 0:
            raise InputError(
                f"{s.DATA_PATH} has only {counts['groups']} group(s) of rows that must stay together, too few to fill "
                f"the {name} split; add rows with other questions and answers"
            )
    counts |= {"kept_previous_split": kept, "new_rows": new, "held_out_bridging": held_out, "by_split": by_split}
    return frame, split


def split_manifest(
    source: dict, counts: dict, outputs: dict, contents: dict, previous: dict | None, s: SimpleNamespace
) -> dict:
    """What split_manifest.json records: the input, the settings, every count, each split file and the history."""
    return {
        "input": source,
        "settings": split_settings_of(s),
        "counts": counts,
        "outputs": {
            name: {
                "path": outputs[name],
                "sha256": hashlib.sha256(contents[name]).hexdigest(),
                "rows": counts["by_split"][name],
            }
            for name in split_names
        },
        "history": history(previous, source["sha256"], s, counts),
    }


def print_written(manifest: dict, previous: dict | None, manifest_path: str) -> None:
    """Step 6's report: the rows of each split (and language), and what changed since the previous split."""
    by_split = manifest["counts"]["by_split"]
    print("6. wrote:")
    for name, output in manifest["outputs"].items():
        print(f"   {name}: {by_split[name]:,} rows ({by_split[name] / sum(by_split.values()):.1%}) in {output['path']}")
    for language, row in manifest["counts"].get("by_language", {}).items():
        print(f"   {language or '(no language)'}: " + ", ".join(f"{name} {n:,}" for name, n in row.items()))
    if previous:
        change = manifest["history"][-1]
        print(
            f"   since the previous split: input {'changed' if change['input_changed'] else 'unchanged'}, "
            f"settings changed: {change['settings_changed'] or 'none'}; rows kept {change['rows_kept']:,}, added "
            f"{change['rows_added']:,}, removed {change['rows_removed']:,}, held out {change['rows_held_out']:,}"
        )
    print(f"   manifest: {manifest_path}")


def split_settings_of(s: SimpleNamespace) -> dict:
    """The settings that decide the split, as the manifest records them."""
    return {name: vars(s)[name] for name in split_settings}


def input_bytes(path: str) -> bytes:
    """The input file's bytes, or an error that says how to point DATA_PATH at it."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise InputError(f"{path} not found; put your question/answer CSV there or set DATA_PATH to it") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}; set DATA_PATH to a readable CSV file") from None


def utf8_bytes(raw: bytes, path: str) -> tuple[bytes, str]:
    """The file re-encoded as UTF-8 without BOM, and how it was decoded.

    UTF-8 (with or without BOM) first; whatever is not valid UTF-8 is read as cp1252, the encoding of German
    Excel exports, byte sequence by byte sequence, so a file that mixes both (rows pasted from two sources) works.
    """
    if not raw.strip():
        raise InputError(
            f"{path} is empty; it needs a header line naming the Question and Answer columns and one row per pair"
        )
    if b"\x00" in raw or control_byte_share(raw[:65536]) > 0.01:
        raise InputError(
            f"{path} is not a text CSV (binary data or UTF-16); save it as 'CSV UTF-8' with the columns "
            f"Question and Answer"
        )
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        raw.decode("utf-8")
        return raw, "utf-8"
    except UnicodeDecodeError:
        pass
    encoding, language = legacy_encoding(raw, path)
    newlines = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == ord("\n"))
    fallback_at = []
    if len(bytes(range(256)).decode(encoding, errors="replace")) == 256:  # one byte per character: cp1252, cp1251, ...

        def as_legacy(error: UnicodeDecodeError) -> tuple[str, int]:
            fallback_at.append(error.start)
            return error.object[error.start : error.end].decode(encoding, errors="replace"), error.end

        codecs.register_error("split_data_legacy", as_legacy)
        data = raw.decode("utf-8", errors="split_data_legacy").encode("utf-8")
    else:  # several bytes per character (Shift-JIS, GBK, ...): line by line, each line UTF-8 or wholly legacy
        lines = raw.split(b"\n")
        for number, line in enumerate(lines):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                try:
                    lines[number] = line.decode(encoding).encode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(
                        f"{path} line {number + 1} is neither UTF-8 nor {encoding}, the encoding the rest of the file "
                        "seems to be in; save the file as 'CSV UTF-8'"
                    ) from None
                fallback_at.append(int(newlines[number - 1]) + 1 if number else 0)
        data = b"\n".join(lines)
    lines_at = np.unique(np.searchsorted(newlines, fallback_at)) + 1
    what = f"{encoding}" + (f" ({language}, detected by charset-normalizer)" if language else "")
    return data, f"utf-8 with {what} on {len(lines_at):,} lines (first: line {lines_at[0]})"


def legacy_encoding(raw: bytes, path: str) -> tuple[str, str | None]:
    """The encoding of the parts of the file that are not UTF-8, and the language charset-normalizer recognised in
    them (None for cp1252, the encoding of Western Excel exports, which is kept whenever it reads as ordinary text).

    charset-normalizer reads every line with bytes that are not UTF-8. A short sample says little: cp1252 wins when
    the guess reads those bytes the same, or when the guess names no language with confidence and cp1252 reads them
    as text with few accented letters; else the guess must read as plain text (low chaos), or the file is refused.
    """
    from charset_normalizer import from_bytes

    lines = []
    for line in raw.splitlines():
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            lines.append(line)
    best = from_bytes(b"\n".join(lines)).best()
    # The bytes that are not UTF-8, with the ASCII around them: what the two encodings must read alike.
    texts = (line.decode("utf-8", errors="surrogateescape") for line in lines)
    legacy = "\n".join("".join(c for c in text if c < "\x80" or "\udc80" <= c <= "\udcff") for text in texts)
    sample = legacy.encode("utf-8", errors="surrogateescape")
    as_cp1252 = sample.decode("cp1252", errors="replace")
    if best is not None and sample.decode(best.encoding, errors="replace") == as_cp1252:
        return "cp1252", None
    if best is not None and best.coherence >= 0.5:
        return best.encoding, best.language
    letters = [c for c in as_cp1252 if c.isalpha()]
    if "\ufffd" not in as_cp1252 and sum(c >= "\x80" for c in letters) <= 0.3 * len(letters):
        return "cp1252", None
    if best is not None and best.chaos <= 0.2:
        return best.encoding, best.language
    raise InputError(
        f"{path} is not UTF-8, and its encoding cannot be told (neither cp1252 nor another legacy encoding reads it "
        "as text); save it as 'CSV UTF-8'"
    )


def control_byte_share(raw: bytes) -> float:
    """The share of bytes that are control characters other than tab and line breaks: ~0 in text, ~12% in binary."""
    controls = bytes(range(32)).translate(None, b"\t\n\r") + b"\x7f"
    return (len(raw) - len(raw.translate(None, controls))) / max(len(raw), 1)


def read_table(data: bytes, path: str) -> tuple[pd.DataFrame, str]:
    """The CSV as text columns, `Question` and `Answer` first (found regardless of case), and its delimiter."""
    first_line = re.split(rb"[\r\n]", data.lstrip(), maxsplit=1)[0].decode("utf-8")
    headers = {
        d: [name.strip().casefold() for name in next(csv.reader([first_line], delimiter=d))] for d in (",", ";", "\t")
    }
    delimiter = next((d for d, names in headers.items() if "question" in names and "answer" in names), None)
    if delimiter is None:
        names = max(headers.values(), key=len)
        missing = " and no ".join(c for c in ("Question", "Answer") if c.casefold() not in names)
        raise InputError(
            f"{path} has no {missing} column (first line: {first_line[:100]!r}); name the columns "
            f"Question and Answer in the first line, separated by ',', ';' or a tab"
        )
    for column in ("question", "answer"):
        if headers[delimiter].count(column) > 1:
            raise InputError(f"{path} has {headers[delimiter].count(column)} columns named {column!r}; keep one")
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=delimiter, dtype=object, keep_default_na=False, encoding="utf-8")
    except pd.errors.ParserError as error:
        raise InputError(
            f"{path} is not a valid CSV: {' '.join(str(error).split())}; quote fields that contain "
            f"{delimiter!r}, quotes or line breaks"
        ) from None
    if frame.empty:
        raise InputError(f"{path} has a header but no rows; add one row per question/answer pair")
    if not isinstance(frame.index, pd.RangeIndex):  # pandas took the first field as row labels: the columns shifted
        raise InputError(
            f"{path} has more fields in its rows than names in its first line {first_line[:100]!r}; name every "
            f"column in the first line, or remove the {delimiter!r} at the end of each row"
        )
    canonical = {c: c.strip().capitalize() for c in frame.columns if c.strip().casefold() in ("question", "answer")}
    frame = frame.rename(columns=canonical)
    return frame[["Question", "Answer"] + [c for c in frame.columns if c not in ("Question", "Answer")]], delimiter


def matching_column(frame: pd.DataFrame, name: str, path: str) -> str:
    """The frame's column called `name`, regardless of case and surrounding spaces."""
    for column in frame.columns:
        if column.strip().casefold() == name.strip().casefold():
            return column
    raise InputError(
        f"GROUP_COLUMN={name!r} but {path} has no such column (columns: {', '.join(frame.columns)}); "
        f"set GROUP_COLUMN to one of them, or to nothing"
    )


def cleaned(texts: pd.Series) -> pd.Series:
    """Unicode NFC with every run of whitespace (line breaks included) turned into one space, ends stripped, and
    byte-order marks removed (files joined with `cat` carry one in mid-file); "" for missing values such as NaN."""
    texts = texts.map(
        lambda text: " ".join(unicodedata.normalize("NFC", text).replace("\ufeff", "").split()), na_action="ignore"
    ).fillna("")
    short = texts[texts.str.len() <= max(map(len, missing_markers))]  # only these can be a marker: casefold fewer
    return texts.mask(texts.index.isin(short.index[short.str.casefold().isin(missing_markers)]), "")


def scrubbed(texts: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """The texts with e-mail addresses, IBANs and phone numbers replaced by placeholders, and how many of each."""
    counts = {}
    for kind, (pattern, placeholder) in pii_patterns.items():
        results = [pattern.subn(placeholder, text) for text in texts]
        texts = pd.Series([text for text, _ in results], index=texts.index, dtype=object)
        counts[kind] = sum(n for _, n in results)
    return texts, counts


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


def verified_previous_manifest(manifest_path: str, outputs: dict[str, str]) -> dict | None:
    """The previous run's manifest, once every split file it records is checked to be unchanged on disk."""
    if not os.path.exists(manifest_path):
        for path in outputs.values():
            if os.path.exists(path):
                raise InputError(
                    f"{path} exists but {manifest_path} does not, so split_data.py cannot tell which rows "
                    f"it already split; move the existing split files away to split from scratch"
                )
        return None
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
        recorded = {name: manifest["outputs"][name]["sha256"] for name in split_names}
        # Valid JSON of another shape is no manifest either: every part a rerun reads, with its type.
        shapes = [
            (manifest["input"]["sha256"], str),
            (manifest["settings"], dict),
            (manifest.get("history", []), list),
            *((recorded[name], str) for name in split_names),
            *((manifest["outputs"][name]["rows"], int) for name in split_names),
        ]
        wrong = [value for value, kind in shapes if not isinstance(value, kind)]
        if wrong:
            raise TypeError(f"{wrong[0]!r} where the manifest has another kind of value")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"cannot read {manifest_path} ({error!r}); restore it, or delete it and the three split files "
            f"to split from scratch"
        ) from None
    for name, path in outputs.items():
        how = "is missing" if not os.path.exists(path) else "was changed" if file_sha256(path) != recorded[name] else ""
        if how:
            raise InputError(
                f"{path} {how} since split_data.py wrote it (see {manifest_path}); restore it (e.g. git checkout "
                f"{path}), or delete the three split files and the manifest to split from scratch"
            )
    return manifest


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def previous_splits(frame: pd.DataFrame, outputs: dict[str, str]) -> np.ndarray:
    """Each row's split in the previous run (0 train, 1 validation, 2 test), NaN for rows it did not have."""
    previous = pd.concat(
        pd.read_csv(outputs[name], usecols=["Question", "Answer"], dtype=object, keep_default_na=False).assign(split=i)
        for i, name in enumerate(split_names)
    ).drop_duplicates(["Question", "Answer"])
    matched = frame[["Question", "Answer"]].merge(previous, on=["Question", "Answer"], how="left")
    return matched["split"].to_numpy(dtype=float)


def assigned_splits(
    group: np.ndarray, previous: np.ndarray, question_keys: np.ndarray, s: SimpleNamespace
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's split (0 train, 1 validation, 2 test; NaN if held out), and which new rows are held out.

    A row that was split before keeps its split. A new row joins the split of its group's earlier rows; if those
    are in different splits, the new row is what links them, so it is held out and the group does not leak.
    Wholly new groups are ordered by sha256(SEED, the group's smallest normalised question) and laid end to end:
    the first go to test until test holds TEST_FRACTION of all rows, the next to validation, the rest to train.
    """
    by_group = pd.Series(previous).groupby(group)
    lowest, highest = by_group.transform("min").to_numpy(), by_group.transform("max").to_numpy()
    split = np.where(np.isnan(previous), lowest, previous)
    bridging = np.isnan(previous) & (highest > lowest)
    split[bridging] = np.nan

    new = np.isnan(lowest)
    new_groups = pd.Series(question_keys[new]).groupby(group[new]).agg(["min", "size"])
    hashes = [hashlib.sha256(f"{s.SEED}\x1f{key}".encode()).digest()[:8] for key in new_groups["min"]]
    order = np.argsort(np.array([int.from_bytes(h, "big") for h in hashes], dtype=np.uint64), kind="stable")
    sizes = new_groups["size"].to_numpy()[order]
    already = np.bincount(split[~np.isnan(split)].astype(int), minlength=3)
    total = already.sum() + sizes.sum()
    test_need = max(0.0, s.TEST_FRACTION * total - already[2])
    validation_need = max(0.0, s.VALIDATION_FRACTION * total - already[1])
    middle = np.cumsum(sizes) - sizes / 2  # a group goes where its middle row falls
    group_split = np.where(middle < test_need, 2, np.where(middle < test_need + validation_need, 1, 0))
    split[new] = pd.Series(group_split, index=new_groups.index[order]).reindex(group[new]).to_numpy()
    return split, bridging


def history(previous: dict | None, input_sha256: str, s: SimpleNamespace, counts: dict) -> list[dict]:
    """The previous manifest's history plus what changed since it: input, settings and rows."""
    if not previous:
        return []
    settings_now = split_settings_of(s)
    change = {
        "previous_input_sha256": previous["input"]["sha256"],
        "input_changed": previous["input"]["sha256"] != input_sha256,
        "settings_changed": {
            n: [previous["settings"].get(n), v] for n, v in settings_now.items() if previous["settings"].get(n) != v
        },
        "rows_kept": counts["kept_previous_split"],
        "rows_added": counts["new_rows"] - counts["held_out_bridging"],
        "rows_removed": sum(o["rows"] for o in previous["outputs"].values()) - counts["kept_previous_split"],
        "rows_held_out": counts["held_out_bridging"],
    }
    return previous.get("history", []) + [change]


def temporary_path(path: str) -> str:
    """Where `path` is written before it is renamed into place: beside it, so that the rename is atomic."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def finished_interrupted_write(paths: list[str]) -> bool:
    """Rename into place the temporary files of a run killed between its renames (the manifest last in `paths`), so
    the split files and the manifest agree again. Its temporary manifest is written last: if it is whole, all are."""
    try:
        with open(temporary_path(paths[-1]), encoding="utf-8") as file:
            json.load(file)
    except (OSError, ValueError):
        return False
    for path in paths:
        if os.path.exists(temporary_path(path)):
            os.replace(temporary_path(path), path)
    return True


def write_atomically(files: dict[str, bytes]) -> None:
    """Write every file to a temporary file beside it, then rename them all into place, in the given order (the
    manifest last): a run killed between the renames is finished by the next one (finished_interrupted_write)."""
    temporary = {path: temporary_path(path) for path in files}
    for path, content in files.items():
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(temporary[path], "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            for written in temporary.values():
                with contextlib.suppress(OSError):
                    os.remove(written)
            raise InputError(
                f"cannot write {path}: {error.strerror}; make its folder writable and free some space (the previous "
                f"files are unchanged)"
            ) from None
    # Renames within one folder are atomic and near-instant, but a kill between two of them leaves a mix of old and new
    # files, which the next run completes.
    for path in files:
        os.replace(temporary[path], path)


if __name__ == "__main__":
    run(main)
