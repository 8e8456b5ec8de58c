"""Hostile input and faults (issue 6): what real users throw at the scripts, each case with its expected outcome.

Either a clear one-line error (exactly one `error: ...` line on stderr naming the file, row or column, exit code 2,
no traceback, nothing written) or a cleaned result whose counts are checked in the split files and the manifest.
Faults: an output folder that cannot be created, a full disk and SIGKILL while writing, after which every earlier
output is byte-identical and the next run succeeds (train.py: resumes).

Faults are injected honestly, by the real process on itself: FAULT_RUNNER runs a script as `__main__` after wrapping
one library call, which then either raises OSError(ENOSPC) or writes half of its file and sends SIGKILL to its own
process, at a fixed point of the write (no timing, no sleeping). Tests run as root, so a read-only chmod would not
block writes: an output folder under a regular file stands for "not writable". A failure after training has started
keeps the trainer's progress bars on stderr: there the `error:` line must be the only one and the last line.

One tiny-model pipeline (split_data.py -> train.py, module fixture) is shared by the train.py and eval.py cases.
"""

import errno
import importlib.util
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_script, small_qa_frame

spec = importlib.util.spec_from_file_location("split_data_hostile", REPO / "split_data.py")
split_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(split_data)

SPLIT_FILES = {"train": "qa_training_set.csv", "validation": "qa_validation_set.csv", "test": "qa_test_set.csv"}
SETTING_NAMES = {name for name in vars(split_data) if name.isupper()} | {"OUTPUT_DIR", "CHECKPOINT_PATH", "MODEL_NAME"}
# ~1 MB of text in one answer: ordinary words, single spaces, so cleaning leaves it unchanged.
BIG_ANSWER = " ".join(f"Clause {i} of the travel policy applies to trips abroad." for i in range(18_000))
BIG_QUESTION = "What does the full travel policy say?"

FAULT_RUNNER = r"""
import errno, io, os, runpy, signal, sys

script, fault, target = sys.argv[1], os.environ["HOSTILE_FAULT"], os.environ["HOSTILE_TARGET"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if fault == "kill-at-fsync":  # the target-th fsync: that many temporary files are written, not yet synced
    calls, real_fsync = [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == int(target):
            die()
        real_fsync(fd)

    os.fsync = fsync
elif fault == "kill-after-replace":  # SIGKILL right after the target-th rename into place
    calls, real_replace = [], os.replace

    def replace(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        if len(calls) == int(target):
            die()

    os.replace = replace
elif fault == "kill-in-torch-save":  # half of the target file on disk, then SIGKILL
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(target):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as file:
                file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
elif fault == "kill-in-model-save":  # the model folder written, its weights file cut in half, then SIGKILL
    from sentence_transformers import SentenceTransformer

    real_save = SentenceTransformer.save

    def save(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        if target in str(path):
            weights = os.path.join(path, "model.safetensors")
            os.truncate(weights, os.path.getsize(weights) // 2)
            die()

    SentenceTransformer.save = save
elif fault == "disk-full":  # every file opened for writing under the target path: No space left on device
    import builtins

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if target in str(file) and any(flag in mode for flag in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = full_open
else:
    raise SystemExit(f"unknown fault {fault}")
sys.argv = [script]  # as `python <script>` has it
runpy.run_path(script, run_name="__main__")
"""


def run_with_fault(script: str, cwd: Path, env: dict[str, str], fault: str, target: str):
    """Run a script as run_script does, with one fault injected by FAULT_RUNNER."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    full_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env})
    full_env.update({"HOSTILE_FAULT": fault, "HOSTILE_TARGET": target})
    command = [sys.executable, "-c", FAULT_RUNNER, str(REPO / script)]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2 and exactly one non-empty stderr line, `error: ...`, containing every fragment; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def assert_last_line_is_the_only_error(result, *fragments: str) -> str:
    """For failures after training has started, whose stderr also holds the trainer's progress bars and warnings:
    exit code 2, no traceback, one `error:` line, and it is the last line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1]
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_input(workdir: Path, content: bytes) -> Path:
    path = workdir / "data" / "qa_data.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def split_in_process(workdir: Path, monkeypatch: pytest.MonkeyPatch, **env) -> dict:
    """split_data.main() in `workdir` with only the given settings; the manifest it wrote."""
    monkeypatch.chdir(workdir)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    split_data.main()
    return json.loads((workdir / "data" / "split_manifest.json").read_text(encoding="utf-8"))


def read_splits(workdir: Path) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_csv(workdir / "data" / file, dtype=str, keep_default_na=False, encoding="utf-8")
        for name, file in SPLIT_FILES.items()
    }


def assert_clean_splits(workdir: Path, manifest: dict) -> set[tuple[str, str]]:
    """The split files agree with the manifest's counts and hold only real pairs; returns the (question, answer)s."""
    splits = read_splits(workdir)
    pairs = set()
    for name, frame in splits.items():
        assert list(frame.columns[:2]) == ["Question", "Answer"]
        assert len(frame) == manifest["counts"]["by_split"][name] == manifest["outputs"][name]["rows"]
        for column in ("Question", "Answer"):
            values = frame[column]
            assert (values.str.strip() != "").all() and (values == values.str.strip()).all()
            assert not values.str.casefold().isin({"nan", "null", "#n/a", "question", "answer"}).any()
            assert not values.str.contains("\ufeff").any()
        pairs |= set(zip(frame["Question"], frame["Answer"], strict=True))
    assert len(pairs) == sum(manifest["counts"]["by_split"].values())
    return pairs


def csv_bytes(frame: pd.DataFrame, **kwargs) -> bytes:
    return frame.to_csv(index=False, lineterminator="\n", **kwargs).encode("utf-8")


BASE = small_qa_frame()  # 48 rows, 12 answers (6 EN, 6 DE), 4 paraphrases each: 12 groups
BASE_PAIRS = set(zip(BASE["Question"], BASE["Answer"], strict=True))


# --- split_data.py: input it must refuse, with one line and exit code 2 --------------------------------------------

BAD_INPUTS = {
    "empty-file": (b"", "data/qa_data.csv is empty; it needs a header line"),
    "only-blank-lines": (b"\n  \r\n\t\n", "data/qa_data.csv is empty"),
    "header-only": (b"Question,Answer,language\n", "data/qa_data.csv has a header but no rows"),
    "header-and-blank-lines": (b"Question,Answer\n\n\n", "data/qa_data.csv has a header but no rows"),
    "wrong-columns": (
        b"Frage;Antwort\nWie?;So.\n",
        "data/qa_data.csv has no Question and no Answer column (first line: 'Frage;Antwort')",
    ),
    "missing-answer-column": (b"Question,Reply\nWhy?,Because.\n", "data/qa_data.csv has no Answer column"),
    "more-fields-than-header": (
        b"Question,Answer\nWhy?,Because.,en\nHow?,Like this.,en\n",
        "data/qa_data.csv has more fields in its rows than names in its first line 'Question,Answer'",
    ),
    "ragged-row": (b"Question,Answer\nq,a\nr,b,extra\n", "Expected 2 fields in line 3, saw 3"),
    "unterminated-quote": (b'Question,Answer\n"Why?,Because.\nHow?,So.\n', "EOF inside string"),
    "question-column-all-empty": (
        b"Question,Answer\n,Because.\n   ,So.\nNaN,Like this.\n",
        "column Question of data/qa_data.csv is empty in every row",
    ),
    "answer-column-all-nan-or-blank": (
        b"Question,Answer\nWhy?,nan\nHow?,\t\nWhere?,NULL\nWho?,#N/A\n",
        "column Answer of data/qa_data.csv is empty in every row",
    ),
    "binary-garbage": (random.Random(0).randbytes(8192), "data/qa_data.csv is not a text CSV"),
    "xlsx-renamed-to-csv": (b"PK\x03\x04\x14\x00\x06\x00" + random.Random(1).randbytes(4000), "is not a text CSV"),
    "utf-16": ("Question,Answer\nWhy?,Because.\n".encode("utf-16"), "data/qa_data.csv is not a text CSV"),
    "header-then-bytes-in-no-encoding": (
        b"Question,Answer\n"
        + b"".join(random.Random(3).randbytes(30).translate(bytes(range(128, 256)) * 2) + b",x\n" for _ in range(20)),
        "data/qa_data.csv is not UTF-8, and its encoding cannot be told (neither cp1252 nor another legacy encoding "
        "reads it as text); save it as 'CSV UTF-8'",
    ),
    "high-bytes-no-header": (
        bytes(random.Random(2).randrange(0x80, 0x100) for _ in range(4000)),
        "data/qa_data.csv has no Question and no Answer column (first line: ",
    ),
}


@pytest.mark.parametrize(("content", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_split_refuses_bad_input_with_one_line(tmp_path, content, message):
    write_input(tmp_path, content)
    result = run_script("split_data.py", tmp_path)
    assert_one_line_error(result, message)
    assert sorted(os.listdir(tmp_path / "data")) == ["qa_data.csv"]  # nothing written, not even a temp file


# --- split_data.py: input it must clean, with counts ---------------------------------------------------------------


def nan_and_whitespace_cells() -> bytes:
    return (
        csv_bytes(BASE)
        + (
            "What is NaN here?,NaN,en\n"  # pandas' astype(str) of a missing answer
            "nan,An answer nobody asked for.,en\n"
            "Question with NULL?,NULL,en\n"  # a database export
            "Frage mit #N/A?,#N/A,de\n"  # an Excel formula that found nothing
            "   ,\t,en\n"  # whitespace only
            '"  \n  ",An orphan answer.,de\n'  # a quoted line break and spaces only
            "A short row without an answer?\n"  # too few fields: the missing ones are NaN
            "  Wie viele   Urlaubstage\thabe ich?,Vollzeitkräfte haben 30 Urlaubstage pro Kalenderjahr.  ,de\n"
        ).encode()
    )


def duplicated_header_lines() -> bytes:
    # `cat part1.csv part2.csv part3.csv` of three "CSV UTF-8" exports, each with its BOM and header line.
    parts = [BASE[:16], BASE[16:32], BASE[32:].rename(columns=str.lower)]
    return b"".join(b"\xef\xbb\xbf" + csv_bytes(part) for part in parts)


def mixed_encodings() -> bytes:
    # Rows appended from a German Excel export (cp1252) to a UTF-8 file, one row mixing both.
    return (
        csv_bytes(BASE)
        + "Wie groß ist mein Spind?,Jeder Spind ist 30 cm breit und abschließbar.,de\n".encode("cp1252")
        + "Welche Maße hat der Monitor?,".encode()
        + "Er misst 27 Zoll gemäß Katalog.,de\n".encode("cp1252")
    )


# Helpdesk rows in Russian and Japanese, for files saved in a legacy encoding other than cp1252.
RUSSIAN = pd.DataFrame(
    {
        "Question": [f"Как сбросить пароль на устройстве номер {i}?" for i in range(12)],
        "Answer": [
            f"Откройте портал самообслуживания и выберите «Забыли пароль» для устройства {i}." for i in range(12)
        ],
        "language": "ru",
    }
)
JAPANESE = pd.DataFrame(
    {
        "Question": [f"会議室の予約方法は？ その{i}" for i in range(12)],
        "Answer": [f"カレンダーの「会議室」から予約します。 その{i}" for i in range(12)],
        "language": "ja",
    }
)


def pairs_of(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["Question"], frame["Answer"], strict=True))


CLEAN_CASES = {
    "cyrillic-in-cp1251": (
        lambda: RUSSIAN.to_csv(index=False, lineterminator="\n").encode("cp1251"),
        {},
        {"rows_read": 12, "dropped_empty": 0, "groups": 12},
        pairs_of(RUSSIAN),
        ("encoding", "utf-8 with cp1251 (Russian, detected by charset-normalizer) on 12 lines (first: line 2)"),
    ),
    "japanese-in-shift-jis-appended-to-utf-8": (
        lambda: csv_bytes(BASE) + JAPANESE.to_csv(index=False, header=False, lineterminator="\n").encode("shift_jis"),
        {},
        {"rows_read": 60, "dropped_empty": 0, "groups": 24},
        BASE_PAIRS | pairs_of(JAPANESE),
        ("encoding", "utf-8 with cp932 (Japanese, detected by charset-normalizer) on 12 lines (first: line 50)"),
    ),
    "nan-and-whitespace-cells": (
        nan_and_whitespace_cells,
        {},
        {"rows_read": 56, "dropped_empty": 7, "exact_duplicates": 1, "header_repeats": 0, "groups": 12},
        BASE_PAIRS,
        None,
    ),
    "duplicated-header-lines-with-boms": (
        duplicated_header_lines,
        {},
        {"rows_read": 50, "header_repeats": 2, "dropped_empty": 0, "exact_duplicates": 0, "groups": 12},
        BASE_PAIRS,
        None,
    ),
    "mixed-encodings-utf8-and-cp1252": (
        mixed_encodings,
        {},
        {"rows_read": 50, "dropped_empty": 0, "groups": 14},
        BASE_PAIRS
        | {
            ("Wie groß ist mein Spind?", "Jeder Spind ist 30 cm breit und abschließbar."),
            ("Welche Maße hat der Monitor?", "Er misst 27 Zoll gemäß Katalog."),
        },
        ("encoding", "utf-8 with cp1252 on 2 lines (first: line 50)"),
    ),
    "csv-that-is-really-a-tsv": (
        lambda: csv_bytes(BASE, sep="\t"),  # answers hold commas: read as a comma CSV this would shift columns
        {},
        {"rows_read": 48, "dropped_empty": 0, "groups": 12},
        BASE_PAIRS,
        ("delimiter", "\t"),
    ),
    "group-column-all-empty": (
        lambda: csv_bytes(BASE.assign(id="")),
        {"GROUP_COLUMN": "id"},
        {"rows_read": 48, "dropped_empty": 0, "groups": 12},  # no group value links anything: 12 groups, not 1
        BASE_PAIRS,
        None,
    ),
}


@pytest.mark.parametrize(
    ("make", "env", "counts", "pairs", "input_field"), CLEAN_CASES.values(), ids=CLEAN_CASES.keys()
)
def test_split_cleans_hostile_input_and_counts_it(tmp_path, monkeypatch, make, env, counts, pairs, input_field):
    write_input(tmp_path, make())
    manifest = split_in_process(tmp_path, monkeypatch, **env)
    assert {key: manifest["counts"][key] for key in counts} == counts
    assert assert_clean_splits(tmp_path, manifest) == pairs
    if input_field:
        assert manifest["input"][input_field[0]] == input_field[1]


# --- faults while writing: nothing earlier is damaged -------------------------------------------------------------


def test_split_disk_full_midway_leaves_earlier_splits_byte_identical(tmp_path, monkeypatch):
    write_input(tmp_path, csv_bytes(BASE))
    split_in_process(tmp_path, monkeypatch)
    before = snapshot(tmp_path / "data")
    grown = write_input(tmp_path, csv_bytes(pd.concat([BASE, small_qa_frame(copies=5)[48:]])))
    before["qa_data.csv"] = grown.read_bytes()

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        """The third temporary file (test split) runs out of space after half of its bytes."""
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 (the caller's `with` closes it)
        if str(path).endswith(".qa_test_set.csv.tmp"):
            real_write = file.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            file.write = write
        return file

    monkeypatch.setattr(split_data, "open", open_on_full_disk, raising=False)
    with pytest.raises(split_data.InputError) as error:
        split_in_process(tmp_path, monkeypatch)
    assert str(error.value).startswith("cannot write data/qa_test_set.csv: No space left on device; ")
    assert "the previous files are unchanged" in str(error.value)
    assert snapshot(tmp_path / "data") == before  # byte-identical, and the two finished temp files removed


def test_split_killed_while_writing_leaves_earlier_files_intact_and_reruns(tmp_path, monkeypatch):
    write_input(tmp_path, csv_bytes(BASE))
    first = split_in_process(tmp_path, monkeypatch)
    before = snapshot(tmp_path / "data")
    grown = pd.concat([BASE, small_qa_frame(copies=5)[48:]])  # 12 new paraphrases of known answers
    before["qa_data.csv"] = write_input(tmp_path, csv_bytes(grown)).read_bytes()

    # SIGKILL after the training temp file is synced and the validation temp file written.
    killed = run_with_fault("split_data.py", tmp_path, {}, "kill-at-fsync", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = snapshot(tmp_path / "data")
    temporary = sorted(name for name in after if name.endswith(".tmp"))
    assert temporary == [".qa_training_set.csv.tmp", ".qa_validation_set.csv.tmp"]  # killed mid-write indeed
    # The dead run's lock file stays behind, naming it; the OS released its lock when it died.
    holder = json.loads(after.pop(".lock-holder.json"))
    assert holder["script"] == "split_data.py" and after.pop(".lock") == b""
    assert {name: content for name, content in after.items() if name not in temporary} == before
    assert_clean_splits(tmp_path, first)  # the earlier splits are whole and readable

    result = run_script("split_data.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        f"lock: data was locked by a run that ended without releasing it (split_data.py, pid {holder['pid']}, "
        f"started {holder['started_at']})" in result.stdout
    )  # taken over
    assert not {".lock", ".lock-holder.json"} & set(os.listdir(tmp_path / "data"))  # released at the end
    manifest = json.loads((tmp_path / "data" / "split_manifest.json").read_text(encoding="utf-8"))
    assert not [name for name in os.listdir(tmp_path / "data") if name.endswith(".tmp")]
    assert manifest["history"][-1]["rows_kept"] == 48 and manifest["history"][-1]["rows_added"] == 12
    assert len(assert_clean_splits(tmp_path, manifest)) == 60


def test_split_killed_between_renames_is_finished_by_the_next_run(tmp_path, monkeypatch):
    write_input(tmp_path / "killed", csv_bytes(BASE))
    split_in_process(tmp_path / "killed", monkeypatch)
    write_input(tmp_path / "killed", csv_bytes(pd.concat([BASE, small_qa_frame(copies=5)[48:]])))
    shutil.copytree(tmp_path / "killed", tmp_path / "uninterrupted")
    assert run_script("split_data.py", tmp_path / "uninterrupted").returncode == 0

    # SIGKILL after the new training split is renamed into place, before the other three files are.
    killed = run_with_fault("split_data.py", tmp_path / "killed", {}, "kill-after-replace", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    data, expected = tmp_path / "killed" / "data", snapshot(tmp_path / "uninterrupted" / "data")
    assert (data / SPLIT_FILES["train"]).read_bytes() == expected[SPLIT_FILES["train"]]
    assert (data / SPLIT_FILES["test"]).read_bytes() != expected[SPLIT_FILES["test"]]  # a mix of new and old

    result = run_script("split_data.py", tmp_path / "killed")
    assert result.returncode == 0, result.stderr
    assert "finished the renames of an earlier run killed while making them" in result.stdout
    assert "the splits are up to date, nothing written" in result.stdout
    assert snapshot(data) == expected  # exactly what the uninterrupted run wrote, no temp files left


# --- the tiny-model pipeline shared by train.py and eval.py cases -------------------------------------------------


def train_env(tiny_model: Path) -> dict[str, str]:
    """20 steps of 4 pairs, a checkpoint every 5 steps; one thread trains the 2-layer model fastest."""
    return {"MODEL_NAME": str(tiny_model), "BATCH_SIZE": "4", "MAX_STEPS": "20", "EVAL_STEPS": "5",
            "OMP_NUM_THREADS": "1", "REQUIRE_VALIDATION_GAIN": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tiny_model, tmp_path_factory) -> Path:
    """split_data.py then train.py, as a user runs them, on the 48 small rows plus one 1 MB answer."""
    work = tmp_path_factory.mktemp("hostile_pipeline")
    big = pd.DataFrame({"Question": [BIG_QUESTION], "Answer": [BIG_ANSWER], "language": ["en"]})
    write_input(work, csv_bytes(pd.concat([BASE, big])))
    split = run_script("split_data.py", work)
    assert split.returncode == 0, split.stderr
    trained = run_script("train.py", work, train_env(tiny_model))
    assert trained.returncode == 0, trained.stderr[-3000:]
    return work


def copy_work(pipeline: Path, target: Path, checkpoints: bool = False) -> Path:
    ignore = None if checkpoints else shutil.ignore_patterns("checkpoints*")
    shutil.copytree(pipeline, target, ignore=ignore)
    return target


def test_one_megabyte_answer_goes_through_split_and_training(pipeline):
    manifest = json.loads((pipeline / "data" / "split_manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["rows_read"] == 49 and sum(manifest["counts"]["by_split"].values()) == 49
    pairs = assert_clean_splits(pipeline, manifest)
    assert (BIG_QUESTION, BIG_ANSWER) in pairs and len(BIG_ANSWER) > 1_000_000
    lineage = json.loads((pipeline / "output" / "final" / "lineage.json").read_text(encoding="utf-8"))
    assert lineage["training"]["global_step"] == 20
    assert lineage["data"]["train"]["rows"] + lineage["data"]["validation"]["rows"] + manifest["counts"]["by_split"][
        "test"] == 49  # fmt: skip


# --- an output folder that cannot be written: all three scripts, before any slow work -----------------------------

UNWRITABLE = {
    "split_data.py": ({"DATA_DIR": "blocked/data", "DATA_PATH": "data/qa_data.csv"},
                      "cannot lock blocked/data: Not a directory; make it a writable folder"),
    "train.py": ({"OUTPUT_DIR": "blocked/output"},
                 "cannot write to output folder 'blocked/output' (Not a directory); set OUTPUT_DIR"),
    "eval.py": ({"OUTPUT_DIR": "blocked/output"}, "cannot write to OUTPUT_DIR blocked/output: Not a directory"),
}  # fmt: skip


@pytest.mark.parametrize(("script", "env", "message"), [(k, *v) for k, v in UNWRITABLE.items()], ids=UNWRITABLE)
def test_output_folder_that_cannot_be_written_is_one_line(pipeline, tiny_model, tmp_path, script, env, message):
    work = copy_work(pipeline, tmp_path / "work")
    (work / "blocked").write_text("a regular file where a folder should be", encoding="utf-8")
    before = snapshot(work)
    result = run_script(script, work, {"MODEL_NAME": str(tiny_model), **env})
    assert_one_line_error(result, message)
    assert snapshot(work) == before


# --- train.py: killed, out of disk, damaged checkpoints; the earlier final model survives each ---------------------


def test_train_killed_and_out_of_disk_while_saving_keeps_earlier_final_and_resumes(pipeline, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    work = copy_work(pipeline, tmp_path / "work", checkpoints=True)
    output, env = work / "output", train_env(tiny_model)
    checkpoints = output / "checkpoints"
    earlier = snapshot(output / "final")

    def steps() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))

    def earlier_final_intact() -> None:
        assert snapshot(output / "final") == earlier
        assert not list(output.glob("final-*"))
        SentenceTransformer(str(output / "final")).encode(["Wie buche ich einen Raum?"])

    # 1. A new run, SIGKILLed while writing checkpoint-15's optimizer.pt (half of it on disk).
    killed = run_with_fault("train.py", work, env, "kill-in-torch-save", "checkpoint-15/optimizer.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "starting a new run: the previous run finished" in killed.stdout
    assert steps() == [5, 10, 15]
    earlier_final_intact()
    # ... and checkpoint-10's weights file corrupt, as a disk error would leave it.
    weights = checkpoints / "checkpoint-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # 2. The rerun skips both, resumes from checkpoint-5, trains to step 20, and finds the disk full when saving.
    full = run_with_fault("train.py", work, env, "disk-full", ".final-partial")
    assert_last_line_is_the_only_error(
        full, "error: cannot save the final model to 'output/final' (No space left on device); free disk space"
    )
    assert "skipping checkpoint-15: trainer_state.json missing or empty; moved to output/incomplete-" in full.stdout
    assert "skipping checkpoint-10: unreadable file (SafetensorError" in full.stdout
    assert "resuming from output/checkpoints/checkpoint-5" in full.stdout
    assert steps()[-1] == 20
    earlier_final_intact()
    # ... and the newest checkpoint loses its weights file.
    (checkpoints / "checkpoint-20" / "model.safetensors").unlink()
    resume_step = steps()[-2]

    # 3. The rerun skips it, resumes, and is SIGKILLed while writing the final model's weights.
    killed = run_with_fault("train.py", work, env, "kill-in-model-save", ".final-partial")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "skipping checkpoint-20: no model weights" in killed.stdout
    assert f"resuming from output/checkpoints/checkpoint-{resume_step}" in killed.stdout
    assert (output / ".final-partial" / "model.safetensors").exists()  # killed mid-save indeed
    earlier_final_intact()

    # 4. A plain rerun resumes from the last checkpoint, saves the final model, and keeps the earlier one renamed.
    done = run_script("train.py", work, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from output/checkpoints/checkpoint-20" in done.stdout
    (moved,) = output.glob("final-*")
    assert f"earlier final model moved to output/{moved.name}" in done.stdout
    assert snapshot(moved) == earlier
    assert not (output / ".final-partial").exists()
    lineage = json.loads((output / "final" / "lineage.json").read_text(encoding="utf-8"))
    # 21, not 20: resumed from the checkpoint at MAX_STEPS, the transformers Trainer runs one more step (at learning
    # rate 0). The final model is still the best checkpoint's weights, mixed with the base's at the share chosen.
    assert lineage["training"]["global_step"] in (20, 21)
    final_weights = load_file(output / "final" / "model.safetensors")
    best_weights = load_file(work / lineage["best_checkpoint"] / "model.safetensors")
    base_weights = load_file(tiny_model / "model.safetensors")
    share = lineage["mix_with_base"]["fine_tuned_share"]
    assert final_weights.keys() == best_weights.keys()
    for name, best in best_weights.items():
        expected = base_weights[name] + share * (best - base_weights[name]) if best.is_floating_point() else best
        assert torch.allclose(final_weights[name], expected, atol=1e-6), name
    SentenceTransformer(str(output / "final")).encode(["Wie buche ich einen Raum?"])
    assert json.loads((checkpoints / "run.json").read_text(encoding="utf-8"))["finished_at"]


# --- eval.py ------------------------------------------------------------------------------------------------------


def test_eval_test_split_overlapping_training_fails_the_gate(pipeline, tmp_path):
    work = copy_work(pipeline, tmp_path / "work")
    splits = read_splits(work)
    leaked = splits["train"].head(6)  # rows copied by hand from the training split into the test split
    test = pd.concat([splits["test"], leaked])
    test.to_csv(work / "data" / SPLIT_FILES["test"], index=False)

    result = run_script("eval.py", work, {"BOOTSTRAP_RESAMPLES": "200"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    assert "warning: data/qa_test_set.csv changed since this model was trained" in result.stdout
    assert "gate: BLOCKED" in result.stdout
    assert f"  - the test set leaked into training: 6 of {len(test)} test rows" in result.stdout
    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["contamination"]["leaked_rows"] == 6 and report["gate"]["passed"] is False
    assert not (work / "output" / "registry.jsonl").exists()


def run_eval_main(work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """eval.py's own __main__ block, run in-process (runpy): its exit code and stderr, without 10 s of imports."""
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", [str(REPO / "eval.py")])  # as `python eval.py` has it, not pytest's arguments
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "eval.py"), run_name="__main__")
    return subprocess.CompletedProcess([], exit_.value.code, *capsys.readouterr())


def damaged_checkpoint(pipeline: Path, work: Path, damage: str) -> Path:
    copy_work(pipeline, work)
    weights = work / "output" / "final" / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(b"\x00\x01 not a safetensors file" * 100)
    return work


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_eval_checkpoint_with_missing_or_corrupt_weights_is_a_clear_error(pipeline, tmp_path, monkeypatch, capsys,
                                                                          damage):  # fmt: skip
    work = damaged_checkpoint(pipeline, tmp_path / "work", damage)
    before = snapshot(work / "output")
    result = run_eval_main(work, monkeypatch, capsys)
    assert_last_line_is_the_only_error(result, "error: cannot load model 'output/final': ", "set CHECKPOINT_PATH")
    assert snapshot(work / "output") == before


def test_eval_checkpoint_with_corrupt_weights_prints_exactly_one_stderr_line(pipeline, tmp_path, monkeypatch, capsys):
    work = damaged_checkpoint(pipeline, tmp_path / "work", "corrupt")
    assert_one_line_error(run_eval_main(work, monkeypatch, capsys), "error: cannot load model 'output/final': ")


# --- settings (issue 11): one block in three scripts, every value checked before the slow imports ----------------

SCRIPTS = ("split_data.py", "train.py", "eval.py")
BLOCK_START = "# --- settings block (identical in split_data.py, train.py, eval.py) ---\n"
BLOCK_END = "# --- end of settings block ---\n"
# Runs a script as `python <script> [args]` does, then records whether the slow libraries were imported.
IMPORT_PROBE = r"""
import atexit, json, os, runpy, sys

slow = ("torch", "sentence_transformers", "transformers")
atexit.register(lambda: open(os.environ["PROBE"], "w").write(json.dumps([m for m in slow if m in sys.modules])))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def load_script(script: str):
    spec = importlib.util.spec_from_file_location(f"{script[:-3]}_settings", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_probed(script: str, cwd: Path, env: dict[str, str], *args: str):
    """Run `python <script> <args>` in `cwd` (as run_script does); the result and the slow modules it imported."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB") and k not in SETTING_NAMES}
    full_env.update({"HF_HUB_OFFLINE": "1", "PROBE": str(cwd.parent / f"{cwd.name}.probe"), **env})
    command = [sys.executable, "-c", IMPORT_PROBE, str(REPO / script), *args]
    result = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    return result, json.loads((cwd.parent / f"{cwd.name}.probe").read_text())


def test_the_three_settings_blocks_are_byte_identical():
    blocks = []
    for script in SCRIPTS:
        text = (REPO / script).read_text(encoding="utf-8")
        assert text.count(BLOCK_START) == 1 and text.count(BLOCK_END) == 1, script
        blocks.append(text[text.index(BLOCK_START) : text.index(BLOCK_END) + len(BLOCK_END)])
    assert len(blocks[0].splitlines()) > 100  # the whole block, not just its markers
    assert blocks[0] == blocks[1] == blocks[2]


def test_the_block_knows_every_setting_of_the_three_scripts_and_each_has_a_comment_and_valid_rules():
    modules = {script: load_script(script) for script in SCRIPTS}
    names = set()
    for script, module in modules.items():
        comments = module.setting_comments()
        assert comments and all(comments.values()), (script, [n for n, c in comments.items() if not c])
        assert list(comments) == [n for n in vars(module) if n in comments]  # in the order of the file
        for name in [*module.LIMITS, *module.DERIVED_PATHS, *module.DISTINCT_PATHS]:
            assert name in comments, (script, name)  # a rule for a setting that does not exist is a typo
        for name, rule in module.LIMITS.items():
            assert module.within(module.setting_defaults()[name], rule), (script, name)  # each default is allowed
            assert module.allowed_values(module.setting_defaults()[name], rule) != "a text" or not rule
        names |= set(comments)
    assert names == modules["train.py"].ALL_SETTINGS  # the block's literal list is the truth


BAD_SETTINGS = {
    "split-validation-fraction-0": ("split_data.py", {"VALIDATION_FRACTION": "0"},
                                    "VALIDATION_FRACTION='0' (from the environment) is not a finite number above 0 "
                                    "and below 1"),
    "split-test-fraction-nan": ("split_data.py", {"TEST_FRACTION": "nan"}, "TEST_FRACTION='nan'"),
    "split-fractions-sum-1": ("split_data.py", {"VALIDATION_FRACTION": "0.5", "TEST_FRACTION": "0.5"},
                              "VALIDATION_FRACTION=0.5 and TEST_FRACTION=0.5 do not go together: their sum must stay "
                              "below 1"),
    "split-seed-not-whole": ("split_data.py", {"SEED": "4.5"}, "SEED='4.5' (from the environment) is not a whole "
                                                               "number"),
    "split-bool": ("split_data.py", {"SCRUB_PII": "perhaps"}, "SCRUB_PII='perhaps' (from the environment) is not true "
                                                                "or false"),
    "train-batch-size-0": ("train.py", {"BATCH_SIZE": "0"}, "BATCH_SIZE='0' (from the environment) is not a whole "
                                                            "number above 0 (the default is 24)"),
    "train-batch-size-negative": ("train.py", {"BATCH_SIZE": "-4"}, "BATCH_SIZE='-4'"),
    "train-learning-rate-inf": ("train.py", {"LEARNING_RATE": "inf"}, "LEARNING_RATE='inf' (from the environment) is "
                                                                      "not a finite number above 0"),
    "train-learning-rate-nan": ("train.py", {"LEARNING_RATE": "NaN"}, "LEARNING_RATE='NaN'"),
    "train-learning-rate-negative": ("train.py", {"LEARNING_RATE": "-2e-5"}, "LEARNING_RATE='-2e-5'"),
    "train-epochs-0": ("train.py", {"NUM_TRAIN_EPOCHS": "0"}, "NUM_TRAIN_EPOCHS=0 and MAX_STEPS=0 do not go together"),
    "train-eval-steps-0": ("train.py", {"EVAL_STEPS": "0"}, "EVAL_STEPS='0' (from the environment) is not a whole "
                                                            "number of at least 1"),
    "train-max-steps-negative": ("train.py", {"MAX_STEPS": "-1"}, "MAX_STEPS='-1'"),
    "train-warmup-ratio-1": ("train.py", {"WARMUP_RATIO": "1"}, "WARMUP_RATIO='1' (from the environment) is not a "
                                                                "finite number from 0 to below 1"),
    "train-lora-rank-0": ("train.py", {"LORA_RANK": "0"}, "LORA_RANK='0'"),
    "train-max-general-drop-2": ("train.py", {"MAX_GENERAL_DROP": "2"}, "MAX_GENERAL_DROP='2' (from the environment) "
                                                                        "is not a finite number from 0 to 1"),
    "train-lora-with-general-guard": ("train.py", {"USE_LORA": "true", "GENERAL_VALIDATION_PATH": "general.csv"},
                                      "USE_LORA=True and GENERAL_VALIDATION_PATH='general.csv' do not go together: "
                                      "the general guard chooses among mixes"),
    "train-same-split-twice": ("train.py", {"VALIDATION_PATH": "data/./qa_training_set.csv"},
                               "TRAIN_PATH='data/qa_training_set.csv' and VALIDATION_PATH='data/./qa_training_set.csv' "
                               "are the same file"),
    "eval-max-contamination-nan": ("eval.py", {"MAX_CONTAMINATION": "nan"}, "MAX_CONTAMINATION='nan' (from the "
                                                                            "environment) is not a finite number from "
                                                                            "0 to 1"),
    "eval-min-improvement-inf": ("eval.py", {"MIN_IMPROVEMENT": "-inf"}, "MIN_IMPROVEMENT='-inf'"),
    "eval-language-drop-negative": ("eval.py", {"MAX_LANGUAGE_DROP": "-0.1"}, "MAX_LANGUAGE_DROP='-0.1'"),
    "eval-bootstrap-0": ("eval.py", {"BOOTSTRAP_RESAMPLES": "0"}, "BOOTSTRAP_RESAMPLES='0'"),
    "eval-corpus-scope": ("eval.py", {"CORPUS_SCOPE": "everything"}, "CORPUS_SCOPE='everything' (from the "
                                                                     "environment) is not one of 'all', 'test'"),
}  # fmt: skip


@pytest.mark.parametrize(("script", "env", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS)
def test_a_bad_setting_is_one_line_before_any_slow_import_and_writes_nothing(tmp_path, script, env, message):
    work = tmp_path / "work"
    write_input(work, csv_bytes(BASE))
    before = snapshot(work)
    result, slow_imports = run_probed(script, work, env)
    assert_one_line_error(result, f"error: {message}")
    assert slow_imports == []
    assert snapshot(work) == before


def test_dotenv_in_utf16_or_with_bom_is_read_and_a_typo_in_it_is_warned_about(tmp_path):
    work = tmp_path / "work"
    write_input(work, csv_bytes(BASE))
    dotenv = "SEED=7\nBATCHSIZE=64\nLEARNING_RATE=1e-4\nWANDB_PROJECT=qa\nHF_HOME=/tmp/hf\nTEST_FRACTION=0.2\n"
    for encoding in ("utf-16", "utf-8-sig", "utf-16-be", "utf-32"):
        (work / ".env").write_bytes(dotenv.encode(encoding) if encoding != "utf-16-be" else b"\xfe\xff" +
                                    dotenv.encode(encoding))  # fmt: skip
        result = run_script("split_data.py", work)
        assert result.returncode == 0, (encoding, result.stderr)
        assert "  SEED = 7" in result.stdout and "  TEST_FRACTION = 0.2" in result.stdout, encoding
        warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
        # LEARNING_RATE is train.py's, WANDB_ and HF_ are the libraries': only the typo is warned about.
        assert warnings == [
            "warning: .env sets BATCHSIZE, which is not a setting of split_data.py, train.py or eval.py (did you "
            "mean BATCH_SIZE?); it changes nothing"
        ], encoding


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfeS\x00=\x00\x00\xd8", "error: .env is not readable as utf-16 (unexpected end of data at byte 6)"),
        (b"SEED=\xe9\n", "error: .env is not readable as utf-8 (invalid continuation byte at byte 5)"),
        ("SEED=7\n".encode("utf-16-le"), "error: .env is not readable as utf-8 (NUL byte at byte 1)"),
    ],
    ids=["utf16-cut-in-a-surrogate", "latin-1", "utf16-without-bom"],
)
def test_undecodable_dotenv_is_one_line(tmp_path, content, message):
    write_input(tmp_path, csv_bytes(BASE))
    (tmp_path / ".env").write_bytes(content)
    before = snapshot(tmp_path)
    for script in SCRIPTS:
        assert_one_line_error(run_script(script, tmp_path), message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_default_current_value_and_comment_and_writes_nothing(tmp_path, script):
    work = tmp_path / "work"
    write_input(work, csv_bytes(BASE))
    (work / ".env").write_text("SEED=7\nBOOTSTRAP_SEED=7\n", encoding="utf-8")
    listing = sorted(str(p.relative_to(work)) for p in work.rglob("*"))  # folders too
    before = snapshot(work)
    module = load_script(script)
    for flag in ("--help", "-h"):
        result, slow_imports = run_probed(script, work, {"BATCH_SIZE": "0"}, flag)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert slow_imports == []
        lines = result.stdout.splitlines()
        assert lines[0] == module.__doc__.strip().splitlines()[0]  # what it reads and writes comes first
        for name, comment in module.setting_comments().items():
            (line,) = [number for number, line in enumerate(lines) if line.startswith(f"  {name} = ")]
            assert lines[line + 1].startswith(f"      {comment} [")
        seed = "BOOTSTRAP_SEED" if script == "eval.py" else "SEED"
        assert f"  {seed} = 7  (from .env; default 42)" in lines
        if "BATCH_SIZE" in module.setting_comments():  # the current value, even an invalid one, is shown as such
            default = module.BATCH_SIZE
            assert f"  BATCH_SIZE = '0'  (from the environment, NOT VALID; default {default})" in lines
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == listing
    assert snapshot(work) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_any_other_argument_is_one_line_and_writes_nothing(tmp_path, script):
    write_input(tmp_path, csv_bytes(BASE))
    before = snapshot(tmp_path)
    for args in (["--batch-size", "64"], ["BATCH_SIZE=64"], ["--help", "extra"]):
        result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
        assert_one_line_error(
            result, f"error: unknown argument {args[0]!r}: {script} takes no arguments but --help; its settings are "
            f"the constants at the top of {script}, overridden by name in .env or the environment"
        )  # fmt: skip
    assert snapshot(tmp_path) == before


# --- NaN and inf (issue 11): train.py stops, eval.py's gate blocks, nothing broken is saved or registered --------


def poisoned_copy(model_folder: Path, target: Path) -> Path:
    """A copy of a model folder whose weights are all NaN (what LEARNING_RATE=inf used to train)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_folder, target)
    weights = load_file(target / "model.safetensors")
    save_file({name: torch.full_like(t, float("nan")) if t.is_floating_point() else t for name, t in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    return target


def test_train_stops_with_one_line_when_the_loss_is_nan_and_saves_no_final_model(pipeline, tiny_model, tmp_path):
    work = copy_work(pipeline, tmp_path / "work")
    shutil.rmtree(work / "output")
    poisoned = poisoned_copy(tiny_model, tmp_path / "poisoned-model")
    result = run_script("train.py", work, train_env(tiny_model) | {"MODEL_NAME": str(poisoned)})
    assert_last_line_is_the_only_error(
        result, "error: training stopped at step 0: NaN or inf in the training (", "nothing is saved as final"
    )  # step 0: the base model is evaluated before the first step (train.py's eval_on_start), and found broken
    assert not (work / "output" / "final").exists() and not (work / "output" / ".final-partial").exists()
    assert not list((work / "output").glob(".lock*"))  # released on the error exit too


def test_eval_blocks_a_checkpoint_with_nan_weights_and_does_not_register_it(pipeline, tmp_path):
    work = copy_work(pipeline, tmp_path / "work")
    poisoned_copy(work / "output" / "final", work / "output" / "poisoned")
    # Thresholds that would pass anything finite: only the non-finite rule can block.
    env = {"CHECKPOINT_PATH": "output/poisoned", "MIN_IMPROVEMENT": "-1", "MAX_LANGUAGE_DROP": "1",
           "BOOTSTRAP_RESAMPLES": "50"}  # fmt: skip
    result = run_script("eval.py", work, env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "gate: BLOCKED" in result.stdout
    assert "  - the fine-tuned model has NaN or inf in " in result.stdout
    assert "  - the fine-tuned model gives NaN or inf similarity scores for " in result.stdout
    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"]["passed"] is False and report["registry"] is None
    assert not (work / "output" / "registry.jsonl").exists() and not (work / "output" / "registry").exists()

    # The same thresholds pass the healthy model: the block above came from the NaN weights alone.
    healthy = run_script("eval.py", work, env | {"CHECKPOINT_PATH": "output/final"})
    assert healthy.returncode == 0 and "gate: PASSED" in healthy.stdout, healthy.stdout[-3000:]


# --- paths and concurrency (issue 11): one run per output folder, no two paths on one file ------------------------

LOCK_HOLDER = r"""
import importlib.util, sys

spec = importlib.util.spec_from_file_location("holder", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.lock_folders([sys.argv[2]])
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin
module.release_locks()
"""


@pytest.mark.parametrize(("script", "folder"), [("split_data.py", "data"), ("train.py", "output"),
                                                ("eval.py", "output")])  # fmt: skip
def test_a_second_run_in_a_locked_folder_is_one_line_naming_the_holder(pipeline, tmp_path, script, folder):
    work = copy_work(pipeline, tmp_path / "work")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(REPO / script), folder], cwd=work,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(work)
        started = json.loads((work / folder / ".lock-holder.json").read_text(encoding="utf-8"))["started_at"]
        result = run_script(script, work, {"MODEL_NAME": "unused", "BOOTSTRAP_RESAMPLES": "10"})
        assert_one_line_error(
            result, f"error: {folder} is in use by another run ({script}, pid {holder.pid}, started {started}); wait"
        )
        assert snapshot(work) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (work / folder / ".lock").exists()  # the holder released it
    if script == "split_data.py":  # free again: the next run goes through
        assert run_script(script, work).returncode == 0


def test_under_torchrun_only_rank_0_locks(tmp_path, monkeypatch):
    train = load_script("train.py")
    monkeypatch.setenv("RANK", "1")
    train.lock_folders([str(tmp_path)])
    assert os.listdir(tmp_path) == [] and train.held_locks == {}
    monkeypatch.setenv("RANK", "0")
    train.lock_folders([str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == [".lock", ".lock-holder.json"]
    train.release_locks()
    assert os.listdir(tmp_path) == []


SAME_FILE = {
    "train-is-test": ({"TEST_PATH": "data/qa_training_set.csv"},
                      "TRAIN_PATH='data/qa_training_set.csv' and TEST_PATH='data/qa_training_set.csv' are the same "
                      "file"),
    "manifest-is-a-split": ({"SPLIT_MANIFEST_PATH": "data/../data/qa_test_set.csv"},
                            "TEST_PATH='data/qa_test_set.csv' and SPLIT_MANIFEST_PATH='data/../data/qa_test_set.csv' "
                            "are the same file"),
    "output-is-the-input": ({"VALIDATION_PATH": "./data/qa_data.csv"},
                            "DATA_PATH='data/qa_data.csv' and VALIDATION_PATH='./data/qa_data.csv' are the same file"),
}  # fmt: skip


@pytest.mark.parametrize(("env", "message"), SAME_FILE.values(), ids=SAME_FILE)
def test_split_refuses_two_paths_that_are_one_file(tmp_path, env, message):
    write_input(tmp_path, csv_bytes(BASE))
    before = snapshot(tmp_path)
    assert_one_line_error(run_script("split_data.py", tmp_path, env), f"error: {message}; one would overwrite")
    assert snapshot(tmp_path) == before


# --- read-back files of the wrong shape (issue 11): valid JSON, wrong content, one line ---------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "cannot read data/split_manifest.json (TypeError("),
        ('{"input": "abc", "settings": {}, "outputs": {}}', "cannot read data/split_manifest.json ("),
        (None, "cannot read data/split_manifest.json (TypeError("),
    ],
    ids=["a-list", "input-is-text", "rows-are-text"],
)
def test_split_manifest_of_the_wrong_shape_is_one_line(tmp_path, monkeypatch, content, message):
    write_input(tmp_path, csv_bytes(BASE))
    split_in_process(tmp_path, monkeypatch)
    manifest_path = tmp_path / "data" / "split_manifest.json"
    if content is None:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["outputs"]["test"]["rows"] = "4"
        content = json.dumps(manifest)
    manifest_path.write_text(content, encoding="utf-8")
    write_input(tmp_path, csv_bytes(pd.concat([BASE, small_qa_frame(copies=5)[48:]])))  # new rows: not up to date
    before = snapshot(tmp_path)
    assert_one_line_error(run_script("split_data.py", tmp_path), f"error: {message}")
    assert snapshot(tmp_path) == before


def damage_json(path: Path, change) -> None:
    path.chmod(0o644)
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


READ_BACK = {
    "lineage-is-a-list": ("output/final/lineage.json", lambda text: "[1, 2]",
                          "error: output/final/lineage.json is not a lineage.json as train.py writes it (a JSON list, "
                          "not an object)"),
    "lineage-data-is-text": ("output/final/lineage.json",
                             lambda text: json.dumps(json.loads(text) | {"data": "data/qa_training_set.csv"}),
                             "error: output/final/lineage.json is not a lineage.json as train.py writes it (data)"),
    "registry-line-is-a-list": ("output/registry.jsonl", lambda text: "[]\n",
                                "error: output/registry.jsonl line 1 is not a registry entry (a JSON object with a "
                                "version like v0001, a path and a model_sha256)"),
    "registry-line-without-version": ("output/registry.jsonl", lambda text: '{"path": "x", "model_sha256": "0"}\n',
                                      "error: output/registry.jsonl line 1 is not a registry entry"),
}  # fmt: skip


@pytest.mark.parametrize(("file", "change", "message"), READ_BACK.values(), ids=READ_BACK)
def test_eval_read_back_file_of_the_wrong_shape_is_one_line_before_scoring(pipeline, tmp_path, monkeypatch, capsys,
                                                                           file, change, message):  # fmt: skip
    work = copy_work(pipeline, tmp_path / "work")
    path = work / file
    if not path.exists():
        path.write_text("{}\n", encoding="utf-8")
    damage_json(path, change)
    before = snapshot(work / "output")
    result = run_eval_main(work, monkeypatch, capsys)
    assert_one_line_error(result, message)
    assert "test: " not in result.stdout  # refused before reading the test split and scoring
    assert snapshot(work / "output") == before


def test_train_split_manifest_of_the_wrong_shape_is_one_line(pipeline, tiny_model, tmp_path):
    work = copy_work(pipeline, tmp_path / "work")
    (work / "data" / "split_manifest.json").write_text('["not", "a", "manifest"]', encoding="utf-8")
    result = run_script("train.py", work, train_env(tiny_model))
    assert_one_line_error(result, "error: 'data/split_manifest.json' holds a JSON list, not the object")


def test_eval_adapter_config_of_the_wrong_shape_is_one_line(pipeline, tmp_path, monkeypatch, capsys):
    work = copy_work(pipeline, tmp_path / "work")
    (work / "output" / "final" / "adapter_config.json").write_text('"base"', encoding="utf-8")
    result = run_eval_main(work, monkeypatch, capsys)
    assert_last_line_is_the_only_error(
        result, "error: output/final/adapter_config.json is not an adapter config as peft writes it"
    )


# --- group ids and columns as exports write them (issue 11) ------------------------------------------------------


def test_group_column_null_and_na_link_nothing_in_split_and_eval(tmp_path, monkeypatch):
    frame = BASE.assign(id=["NULL", "NA", " n/a ", "#N/A"] * 12)  # every row "has" an id that is a missing value
    write_input(tmp_path, csv_bytes(frame))
    manifest = split_in_process(tmp_path, monkeypatch, GROUP_COLUMN="id")
    assert manifest["counts"]["groups"] == 12  # not 4 giant groups

    ev = load_script("eval.py")
    splits = read_splits(tmp_path)
    counts = ev.contamination_counts(splits["test"], splits["train"], "id")
    assert counts["shared_group_ids"] == 0 and counts["leaked_rows"] == 0
    # ... while a real shared id still counts.
    splits["test"].loc[0, "id"] = splits["train"].loc[0, "id"] = "faq-7"
    assert ev.contamination_counts(splits["test"], splits["train"], "id")["shared_group_ids"] == 1


def test_eval_finds_the_language_column_regardless_of_case():
    ev = load_script("eval.py")
    test = BASE.rename(columns={"language": " Language "})
    *_, languages = ev.ir_inputs(test, [test], True, "language")
    assert set(languages.values()) == {"en", "de"}
