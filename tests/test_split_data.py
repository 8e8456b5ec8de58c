"""split_data.py: reading what users have, cleaning, leak-free grouping, stable re-runs, safe writes.

Most tests import the script and call main() in a temporary working directory (fast); a few run it as a user
would, to check exit codes and the one-line errors.
"""

import codecs
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_script, small_qa_frame

spec = importlib.util.spec_from_file_location("split_data", REPO / "split_data.py")
split_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(split_data)

SETTING_NAMES = [name for name in vars(split_data) if name.isupper()]
SPLITS = {"train": "qa_training_set.csv", "validation": "qa_validation_set.csv", "test": "qa_test_set.csv"}


def run_split(workdir: Path, monkeypatch: pytest.MonkeyPatch, **env) -> dict:
    """Run main() in `workdir` with only the given settings overridden; return the manifest it wrote."""
    monkeypatch.chdir(workdir)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    split_data.main()
    return json.loads((workdir / "data" / "split_manifest.json").read_text(encoding="utf-8"))


def read_splits(workdir: Path) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_csv(workdir / "data" / file, dtype=str, keep_default_na=False) for name, file in SPLITS.items()
    }


def split_of_pairs(workdir: Path) -> dict[tuple[str, str], str]:
    """(question, answer) -> the split it was written to."""
    return {
        (question, answer): name
        for name, frame in read_splits(workdir).items()
        for question, answer in zip(frame["Question"], frame["Answer"], strict=True)
    }


def assert_no_key_in_two_splits(splits: dict[str, pd.DataFrame], group_column: str) -> None:
    """No normalised question, answer or group id is in more than one split."""
    seen: dict[str, str] = {}
    for name, frame in splits.items():
        keys = [*map(split_data.normalised_question, frame["Question"]), *frame["Answer"], *frame[group_column]]
        for key in keys:
            assert seen.setdefault(key, name) == name, f"{key!r} is in {seen[key]} and {name}"


def filler(count: int, start: int = 0) -> pd.DataFrame:
    """Unrelated rows: every question, answer and id distinct."""
    return pd.DataFrame(
        {
            "Question": [f"What does form F-{i} of the helpdesk cover?" for i in range(start, start + count)],
            "Answer": [f"Form F-{i} covers request type number {i}." for i in range(start, start + count)],
            "language": ["en"] * count,
            "id": [f"filler-{i}" for i in range(start, start + count)],
        }
    )


def write_input(workdir: Path, frame: pd.DataFrame) -> Path:
    path = workdir / "data" / "qa_data.csv"
    path.parent.mkdir(exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def write_bytes(workdir: Path, content: bytes) -> Path:
    path = workdir / "data" / "qa_data.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


# --- grouping: nothing that belongs together is split -------------------------------------------------------------


def test_normalised_question_ignores_case_punctuation_and_spacing():
    assert split_data.normalised_question("How do I reset my  Password?!") == "how do i reset my password"
    assert split_data.normalised_question("HOW do I reset my password") == "how do i reset my password"
    assert split_data.normalised_question("Wie groß ist die Straße?") == "wie gross ist die strasse"
    assert split_data.normalised_question("Was kostet ein E-Mail-Konto?") == "was kostet ein emailkonto"
    assert split_data.normalised_question("?!") == "?!"  # nothing left: the text itself, not one shared empty key


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_leaky_input_never_straddles_splits(tmp_path, monkeypatch, seed):
    leaky = pd.DataFrame(
        {
            "Question": [
                "How do I reset my password?",
                "how do I reset my password",
                "HOW DO I RESET MY PASSWORD?!",
                "Where is the VPN client?",
                "How do I install the VPN?",
                "Which VPN client do we use?",
                "VPN on my laptop?",
                "Can I use the VPN from home?",
                "Where is the canteen?",
                "Wo ist die Kantine?",
            ],
            "Answer": [
                "Use the self-service portal.",
                "Open the portal and choose 'Forgot password'.",
                "Call the helpdesk to reset it.",
                *["Install the VPN client from the software center."] * 5,
                "The canteen is on the ground floor.",
                "Die Kantine ist im Erdgeschoss.",
            ],
            "language": ["en"] * 9 + ["de"],
            "id": ["p1", "p2", "p3", "v1", "v2", "v3", "v4", "v5", "t1", "t1"],
        }
    )
    write_input(tmp_path, pd.concat([filler(20), leaky, filler(20, start=20)]))
    manifest = run_split(tmp_path, monkeypatch, GROUP_COLUMN="id", SEED=seed)

    where = split_of_pairs(tmp_path)
    assert len(where) == 50
    for cluster in (leaky[:3], leaky[3:8], leaky[8:]):
        assert len({where[pair] for pair in zip(cluster["Question"], cluster["Answer"], strict=True)}) == 1
    assert_no_key_in_two_splits(read_splits(tmp_path), "id")
    assert manifest["counts"]["groups"] == 40 + 3
    assert all(rows > 0 for rows in manifest["counts"]["by_split"].values())


def test_split_sizes_follow_the_fractions(tmp_path, monkeypatch):
    write_input(tmp_path, filler(200))
    manifest = run_split(tmp_path, monkeypatch)
    assert manifest["counts"]["by_split"] == {"train": 160, "validation": 20, "test": 20}


def test_too_few_groups_is_an_error(tmp_path, monkeypatch):
    write_input(tmp_path, filler(3))
    with pytest.raises(split_data.InputError, match=r"only 3 group\(s\) .* too few to fill the test split"):
        run_split(tmp_path, monkeypatch)


# --- stable as the data grows -------------------------------------------------------------------------------------


def test_appending_20_percent_keeps_every_old_split(tmp_path, monkeypatch):
    old = pd.concat([filler(80), small_qa_frame(copies=2).assign(id="")])  # 104 rows, 92 groups
    path = write_input(tmp_path, old)
    run_split(tmp_path, monkeypatch)
    before = split_of_pairs(tmp_path)

    joining = small_qa_frame(copies=3)[24:].assign(id="")  # 12 new paraphrases of answers already split
    grown = pd.concat([old, filler(9, start=1000), joining])
    assert len(grown) - len(old) == round(0.2 * len(old))
    grown.to_csv(path, index=False)
    manifest = run_split(tmp_path, monkeypatch)
    after = split_of_pairs(tmp_path)

    assert all(after[pair] == split for pair, split in before.items())
    answer_split = {answer: split for (_, answer), split in before.items()}
    assert all(
        after[pair] == answer_split[pair[1]] for pair in zip(joining["Question"], joining["Answer"], strict=True)
    )
    assert len(after) == len(grown)
    change = manifest["history"][-1]
    assert (change["input_changed"], change["rows_kept"], change["rows_added"], change["rows_removed"]) == (
        True,
        104,
        21,
        0,
    )


def test_new_row_bridging_two_splits_is_held_out(tmp_path, monkeypatch):
    path = write_input(tmp_path, filler(40))
    run_split(tmp_path, monkeypatch)
    splits = read_splits(tmp_path)
    in_train, in_test = splits["train"].iloc[0], splits["test"].iloc[0]
    bridge = pd.DataFrame({"Question": [in_train["Question"].upper()], "Answer": [in_test["Answer"]], "id": ["b"]})
    pd.concat([filler(40), bridge, filler(5, start=500)]).to_csv(path, index=False)

    manifest = run_split(tmp_path, monkeypatch)

    after = split_of_pairs(tmp_path)
    assert (bridge["Question"][0], bridge["Answer"][0]) not in after
    assert after[(in_train["Question"], in_train["Answer"])] == "train"
    assert after[(in_test["Question"], in_test["Answer"])] == "test"
    assert manifest["counts"]["held_out_bridging"] == 1
    assert len(after) == 45


def test_changed_seed_keeps_old_rows_and_is_recorded(tmp_path, monkeypatch):
    path = write_input(tmp_path, filler(50))
    run_split(tmp_path, monkeypatch)
    before = split_of_pairs(tmp_path)
    filler(60).to_csv(path, index=False)
    manifest = run_split(tmp_path, monkeypatch, SEED=7)
    after = split_of_pairs(tmp_path)
    assert all(after[pair] == split for pair, split in before.items())
    assert manifest["history"][-1]["settings_changed"] == {"SEED": [42, 7]}


def test_changed_grouping_is_refused(tmp_path, monkeypatch):
    write_input(tmp_path, filler(50))
    run_split(tmp_path, monkeypatch)
    with pytest.raises(split_data.InputError, match="GROUP_COLUMN changed from '' to 'id'.*split from scratch"):
        run_split(tmp_path, monkeypatch, GROUP_COLUMN="id")


# --- reproducible, and nothing on disk silently replaced ----------------------------------------------------------


def test_same_input_gives_byte_identical_outputs(tmp_path, monkeypatch, capsys):
    files = [*SPLITS.values(), "split_manifest.json"]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_input(tmp_path / folder, small_qa_frame())
        run_split(tmp_path / folder, monkeypatch)
    for file in files:
        assert (tmp_path / "a" / "data" / file).read_bytes() == (tmp_path / "b" / "data" / file).read_bytes()

    stamps = {file: os.stat(tmp_path / "a" / "data" / file).st_mtime_ns for file in files}
    capsys.readouterr()
    run_split(tmp_path / "a", monkeypatch)
    assert "the splits are up to date, nothing written" in capsys.readouterr().out
    assert stamps == {file: os.stat(tmp_path / "a" / "data" / file).st_mtime_ns for file in files}


def test_hand_edited_split_is_not_overwritten(tmp_path, monkeypatch):
    path = write_input(tmp_path, filler(50))
    run_split(tmp_path, monkeypatch)
    test_file = tmp_path / "data" / "qa_test_set.csv"
    edited = test_file.read_text() + "A question I added by hand?,An answer I added by hand.,en,x\n"
    test_file.write_text(edited)
    filler(60).to_csv(path, index=False)

    with pytest.raises(split_data.InputError, match=r"data/qa_test_set.csv was changed since .* git checkout"):
        run_split(tmp_path, monkeypatch)
    assert test_file.read_text() == edited


def test_split_files_without_manifest_are_not_overwritten(tmp_path, monkeypatch):
    write_input(tmp_path, filler(50))
    (tmp_path / "data" / "qa_training_set.csv").write_text("Question,Answer\nq,a\n")
    with pytest.raises(split_data.InputError, match="qa_training_set.csv exists but .*split_manifest.json does not"):
        run_split(tmp_path, monkeypatch)
    assert (tmp_path / "data" / "qa_training_set.csv").read_text() == "Question,Answer\nq,a\n"


def test_failed_write_leaves_previous_files_intact(tmp_path, monkeypatch):
    path = write_input(tmp_path, filler(50))
    run_split(tmp_path, monkeypatch)
    before = {file.name: file.read_bytes() for file in (tmp_path / "data").iterdir()}
    filler(60).to_csv(path, index=False)
    before["qa_data.csv"] = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(split_data.os, "fsync", disk_full)
    with pytest.raises(split_data.InputError, match="cannot write .*No space left on device"):
        run_split(tmp_path, monkeypatch)
    assert {file.name: file.read_bytes() for file in (tmp_path / "data").iterdir()} == before


# --- point 1 of issue 3: what users actually have -----------------------------------------------------------------


def test_reads_utf8_with_bom(tmp_path, monkeypatch):
    write_bytes(
        tmp_path,
        codecs.BOM_UTF8 + filler(20).to_csv(index=False).encode() + b"Gr\xc3\xb6\xc3\x9fe?,M\xc3\xbcller,de,u\n",
    )
    manifest = run_split(tmp_path, monkeypatch)
    assert manifest["input"]["encoding"] == "utf-8"
    assert ("Größe?", "Müller") in split_of_pairs(tmp_path)
    assert (tmp_path / "data" / "qa_training_set.csv").read_bytes().startswith(b"Question,Answer,")


def test_reads_german_excel_export_in_cp1252_with_semicolons(tmp_path, monkeypatch):
    frame = filler(20).assign(Answer=lambda f: f["Answer"].str.replace("covers", "regelt Größe, Maße und"))
    write_bytes(tmp_path, frame.to_csv(index=False, sep=";").encode("cp1252"))
    manifest = run_split(tmp_path, monkeypatch)
    assert manifest["input"]["delimiter"] == ";"
    assert manifest["input"]["encoding"] == "utf-8 with cp1252 on 20 lines (first: line 2)"
    assert set(split_of_pairs(tmp_path)) == set(zip(frame["Question"], frame["Answer"], strict=True))


def test_reads_mixed_encodings_line_by_line(tmp_path, monkeypatch):
    utf8_part = filler(20).to_csv(index=False).encode() + "Wie groß?,Die Größe passt.,de,u\n".encode()
    cp1252_part = "Was ist süß?,Zucker ist süß.,de,c\n".encode("cp1252")
    write_bytes(tmp_path, utf8_part + cp1252_part)
    manifest = run_split(tmp_path, monkeypatch)
    assert manifest["input"]["encoding"] == "utf-8 with cp1252 on 1 lines (first: line 23)"
    pairs = split_of_pairs(tmp_path)
    assert ("Wie groß?", "Die Größe passt.") in pairs
    assert ("Was ist süß?", "Zucker ist süß.") in pairs


def test_reads_comma_separated_file(small_qa_csv, monkeypatch):
    manifest = run_split(small_qa_csv.parent.parent, monkeypatch)
    assert (manifest["input"]["delimiter"], manifest["counts"]["rows_read"]) == (",", 48)
    assert manifest["counts"]["groups"] == 12
    assert manifest["counts"]["by_split"] == {"train": 40, "validation": 4, "test": 4}
    assert manifest["counts"]["by_language"]["de"] == {"train": 20, "validation": 0, "test": 4}


def test_reads_tsv_named_csv(tmp_path, monkeypatch):
    frame = filler(20).assign(Answer=lambda f: f["Answer"] + ", with commas; and semicolons")
    write_bytes(tmp_path, frame.to_csv(index=False, sep="\t").encode())
    manifest = run_split(tmp_path, monkeypatch)
    assert manifest["input"]["delimiter"] == "\t"
    assert set(split_of_pairs(tmp_path)) == set(zip(frame["Question"], frame["Answer"], strict=True))


def test_reads_quoted_multiline_fields(tmp_path, monkeypatch):
    text = (
        filler(20).to_csv(index=False) + 'How do I print?,"Step 1: open the file.\r\nStep 2:  press ""Print"".",en,m\n'
    )
    write_bytes(tmp_path, text.encode())
    manifest = run_split(tmp_path, monkeypatch)
    assert manifest["counts"]["rows_read"] == 21
    assert ("How do I print?", 'Step 1: open the file. Step 2: press "Print".') in split_of_pairs(tmp_path)


def test_keeps_extra_columns_after_question_and_answer(tmp_path, monkeypatch):
    frame = filler(20).assign(title=" Spaced  title ")[["id", "title", "Answer", "language", "Question"]]
    write_input(tmp_path, frame)
    run_split(tmp_path, monkeypatch)
    written = pd.concat(read_splits(tmp_path).values())
    assert list(written.columns) == ["Question", "Answer", "id", "title", "language"]
    assert set(written["title"]) == {" Spaced  title "}
    assert sorted(written["id"]) == sorted(frame["id"])


def test_matches_column_names_regardless_of_case(tmp_path, monkeypatch):
    frame = filler(20).rename(columns={"Question": " question ", "Answer": "ANSWER", "id": "ID"})
    write_input(tmp_path, frame)
    manifest = run_split(tmp_path, monkeypatch, GROUP_COLUMN="id")
    assert list(read_splits(tmp_path)["train"].columns) == ["Question", "Answer", "language", "ID"]
    assert manifest["counts"]["rows_read"] == 20


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"data/qa_data.csv is empty; it needs a header line"),
        (b"\r\n  \n", r"data/qa_data.csv is empty"),
        (b"Question,Answer\n", r"has a header but no rows"),
        (b"Frage;Antwort\nWie?;So.\n", r"has no Question and no Answer column \(first line: 'Frage;Antwort'\)"),
        (b"Question,Reply\nWhy?,Because.\n", r"has no Answer column"),
        (b"Question,Answer,Question\nq,a,q\n", r"has 2 columns named 'question'"),
        (b"Question,Answer\nq,a\nr,b,extra\n", r"is not a valid CSV: .*Expected 2 fields in line 3, saw 3"),
        (b"Question,Answer\n" + bytes(range(256)) * 4, r"is not a text CSV \(binary data or UTF-16\)"),
        ("Question,Answer\nq,a\n".encode("utf-16"), r"is not a text CSV"),
        (b"Question,Answer\nq1,\n  ,\nq3,\n", r"column Answer of data/qa_data.csv is empty in every row"),
    ],
    ids=[
        "empty",
        "blank",
        "header-only",
        "no-columns",
        "no-answer",
        "two-questions",
        "too-many-fields",
        "binary",
        "utf-16",
        "answer-column-empty",
    ],
)
def test_unreadable_input_is_a_clear_error(tmp_path, monkeypatch, content, message):
    write_bytes(tmp_path, content)
    with pytest.raises(split_data.InputError, match=message):
        run_split(tmp_path, monkeypatch)
    assert sorted(os.listdir(tmp_path / "data")) == ["qa_data.csv"]


def test_missing_group_column_is_an_error(tmp_path, monkeypatch):
    write_input(tmp_path, filler(20))
    with pytest.raises(split_data.InputError, match="GROUP_COLUMN='group' but .* no such column"):
        run_split(tmp_path, monkeypatch, GROUP_COLUMN="group")


# --- point 2 and 3: clean and deduplicate, with counts ------------------------------------------------------------


def test_cleaning_and_deduplication_are_counted(tmp_path, monkeypatch):
    long_answer = "x" * 1_000_000
    extra = pd.DataFrame(
        {
            "Question": ["Question", "Wie geht es dem Mu\u0308ller?", "  Where\n is\tit? ", "", "Why?", "Where is it?"],
            "Answer": ["ANSWER", "Gut.", "Down  the hall.", "Orphan answer.", "   ", "Down the hall."],
            "language": ["language", "de", "en", "en", "en", "en"],
            "id": ["id", "n", "w", "o", "y", "w2"],
        }
    )
    frame = pd.concat([filler(20), extra, pd.DataFrame({"Question": ["Big?"], "Answer": [long_answer], "id": ["L"]})])
    text = frame.to_csv(index=False) + "Blank answer?,,en,z\n"
    write_bytes(tmp_path, text.encode())

    manifest = run_split(tmp_path, monkeypatch)

    counts = manifest["counts"]
    assert (counts["rows_read"], counts["header_repeats"], counts["dropped_empty"]) == (28, 1, 3)
    assert counts["exact_duplicates"] == 1
    assert sum(counts["by_split"].values()) == 23
    pairs = split_of_pairs(tmp_path)
    assert ("Wie geht es dem Müller?", "Gut.") in pairs  # NFC: one code point for ü
    assert ("Where is it?", "Down the hall.") in pairs
    assert ("Big?", long_answer) in pairs


def test_pii_is_kept_unless_scrubbing_is_on(tmp_path, monkeypatch):
    pii = pd.DataFrame(
        {
            "Question": ["Whom do I mail?", "Which number do I call?", "Where does my salary go?"],
            "Answer": [
                "Write to jane.doe@example.com or it-help@firma.de.",
                "Call +49 30 1234 5678 or 0171-2345678, not on 2024-01-15 or 01.02.2024.",
                "To DE89 3704 0044 0532 0130 00, within 30 days.",
            ],
        }
    )
    write_input(tmp_path, pd.concat([filler(20), pii]))
    run_split(tmp_path, monkeypatch)
    assert any("jane.doe@example.com" in a for _, a in split_of_pairs(tmp_path))

    for file in [*SPLITS.values(), "split_manifest.json"]:
        (tmp_path / "data" / file).unlink()
    manifest = run_split(tmp_path, monkeypatch, SCRUB_PII="yes")

    assert manifest["counts"]["pii_replaced"] == {"email": 2, "iban": 1, "phone": 2}
    answers = {a for _, a in split_of_pairs(tmp_path)}
    assert "Write to [EMAIL] or [EMAIL]." in answers
    assert "Call [PHONE] or [PHONE], not on 2024-01-15 or 01.02.2024." in answers
    assert "To [IBAN], within 30 days." in answers


# --- settings ----------------------------------------------------------------------------------------------------


def test_environment_overrides_constants(tmp_path, monkeypatch):
    write_input(tmp_path, filler(100))
    manifest = run_split(tmp_path, monkeypatch, TEST_FRACTION="0.25", VALIDATION_FRACTION="0.15", SEED="9")
    assert manifest["settings"] == {
        "SEED": 9,
        "VALIDATION_FRACTION": 0.15,
        "TEST_FRACTION": 0.25,
        "GROUP_COLUMN": "",
        "SCRUB_PII": False,
    }
    assert manifest["counts"]["by_split"] == {"train": 60, "validation": 15, "test": 25}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SEED", "abc", r"^SEED='abc' \(from the environment\) is not a whole number \(the default is 42\)"),
        ("SCRUB_PII", "maybe", r"^SCRUB_PII='maybe' \(from the environment\) is not true or false"),
        ("TEST_FRACTION", "1.5", r"^TEST_FRACTION='1.5' .* is not a finite number above 0 and below 1"),
        ("VALIDATION_FRACTION", "0", r"^VALIDATION_FRACTION='0' .* is not a finite number above 0 and below 1"),
    ],
)
def test_bad_setting_is_an_error(tmp_path, monkeypatch, name, value, message):
    write_input(tmp_path, filler(20))
    with pytest.raises(split_data.InputError, match=message):
        run_split(tmp_path, monkeypatch, **{name: value})


# --- as a user runs it --------------------------------------------------------------------------------------------


def test_script_end_to_end_with_dotenv(small_qa_csv):
    workdir = small_qa_csv.parent.parent
    (workdir / ".env").write_text("SEED=5\nTEST_FRACTION=0.3\n")
    result = run_script("split_data.py", workdir, {"TEST_FRACTION": "0.2"})  # the environment beats .env
    assert result.returncode == 0, result.stderr
    for line in ("  SEED = 5", "  TEST_FRACTION = 0.2", "2. read data/qa_data.csv: 48 rows", "6. wrote:"):
        assert line in result.stdout
    manifest = json.loads((workdir / "data" / "split_manifest.json").read_text())
    assert list(manifest) == ["input", "settings", "counts", "outputs", "history"]
    assert manifest["input"]["sha256"] == hashlib.sha256(small_qa_csv.read_bytes()).hexdigest()
    for name, file in SPLITS.items():
        output = manifest["outputs"][name]
        assert output["path"] == f"data/{file}"
        assert output["sha256"] == hashlib.sha256((workdir / "data" / file).read_bytes()).hexdigest()
        assert output["rows"] == len(pd.read_csv(workdir / "data" / file)) > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "error: data/qa_data.csv not found; put your question/answer CSV there or set DATA_PATH to it"),
        (b"Question,Text\nq,a\n", "error: data/qa_data.csv has no Answer column (first line: 'Question,Text'); "),
    ],
    ids=["missing-file", "missing-answer-column"],
)
def test_script_bad_input_is_one_line_and_exit_2(tmp_path, content, message):
    (tmp_path / "data").mkdir()
    if content is not None:
        (tmp_path / "data" / "qa_data.csv").write_bytes(content)
    result = run_script("split_data.py", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_bundled_sample_splits_cleanly_with_translations_together(tmp_path):
    """The quickstart's own input: nothing to clean, both languages, and no FAQ entry (an answer and its
    translation share a faq_id) on two sides of a split."""
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "data" / "qa_data.csv", tmp_path / "data" / "qa_data.csv")
    result = run_script("split_data.py", tmp_path, {"GROUP_COLUMN": "faq_id"})
    assert result.returncode == 0, result.stderr

    counts = json.loads((tmp_path / "data" / "split_manifest.json").read_text())["counts"]
    # Every row read lands in a split: none is empty, a duplicate or held out.
    assert counts["rows_read"] >= 1500 and sum(counts["by_split"].values()) == counts["rows_read"], counts
    splits = read_splits(tmp_path)
    everything = pd.concat(splits.values())
    assert 0.4 < (everything["language"] == "en").mean() < 0.6
    assert everything.groupby("Answer").size().median() >= 3  # paraphrased questions share an answer
    assert_no_key_in_two_splits(splits, "faq_id")
    test = splits["test"]
    assert test["Answer"].nunique() >= 30 and set(test["language"]) == {"en", "de"}
