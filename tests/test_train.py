"""train.py: end to end on the tiny model, resume after kill -9, LoRA, tracking, torchrun, and bad input."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pandas as pd
import pytest
from conftest import GENERAL_ROWS, REPO, run_script, small_qa_frame, write_general_set


def load_train():
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_train()


# A 2-layer model trains faster on one thread than on two shared cores. Whether a random one beats its own start on
# 2 validation answers is luck, so these runs save their result either way (the rule has a test of its own).
FAST = {"OMP_NUM_THREADS": "1", "REQUIRE_VALIDATION_GAIN": "false"}


def write_splits(folder: Path, manifest: bool = True) -> Path:
    """Split CSVs in the contract format, written directly (not by split_data.py): 2 of the 12 answers validate."""
    data = folder / "data"
    data.mkdir(parents=True)
    frame = small_qa_frame()
    answers = list(dict.fromkeys(frame["Answer"]))
    in_validation = frame["Answer"].isin({answers[4], answers[10]})
    frame[~in_validation].to_csv(data / "qa_training_set.csv", index=False)
    frame[in_validation].to_csv(data / "qa_validation_set.csv", index=False)
    if manifest:
        outputs = {"test": {"path": "data/qa_test_set.csv", "sha256": "ab" * 32, "rows": 0}}
        (data / "split_manifest.json").write_text(json.dumps({"outputs": outputs}))
    return data


def stdout_lines(result) -> list[str]:
    return result.stdout.splitlines()


def final_step(output: Path) -> int:
    return json.loads((output / "final" / "lineage.json").read_text())["training"]["global_step"]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One ordinary run: 40 training pairs, batch 4 -> 10 steps per epoch, 2 epochs, evaluated every 10 steps."""
    folder = tmp_path_factory.mktemp("e2e")
    write_splits(folder)
    # .env sets two values; the real environment overrides one of them.
    (folder / ".env").write_text("SEED=7\nNUM_TRAIN_EPOCHS=5\n")
    env = {"MODEL_NAME": str(tiny_model), "BATCH_SIZE": "4", "NUM_TRAIN_EPOCHS": "2", **FAST}
    result = run_script("train.py", folder, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result


def test_end_to_end_writes_final_model_lineage_and_curve(trained):
    folder, result = trained
    lines = stdout_lines(result)
    assert lines.count(train.CPU_LINE) == 1
    assert "final model saved to output/final" in lines
    assert "  SEED = 7" in lines  # from .env
    assert "  NUM_TRAIN_EPOCHS = 2" in lines  # the environment wins over .env
    assert any(line.startswith("EVAL_STEPS=500 is more than the 10 steps of one epoch") for line in lines)
    assert "tracking: none" in result.stdout
    assert "validation corpus: 12 documents (every training and validation answer)" in lines  # below the caps
    assert not any(line.startswith("validation queries:") for line in lines)
    assert ", fp32, 0 data-loader workers, tracking: none" in result.stdout  # the CPU trains; no worker takes a core

    final = folder / "output" / "final"
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["base_model"]["name"].endswith("model")
    assert lineage["data"]["train"]["rows"] == 40 and lineage["data"]["validation"]["rows"] == 8
    assert lineage["data"]["train"]["sha256"] == train.sha256(folder / "data" / "qa_training_set.csv")
    assert lineage["data"]["test_sha256"] == "ab" * 32
    assert lineage["data"]["split_manifest"]["sha256"] == train.sha256(folder / "data" / "split_manifest.json")
    assert lineage["device"] == "cpu" and lineage["precision"] == "fp32" and lineage["lora"] is False
    assert lineage["settings"]["BATCH_SIZE"] == 4 and lineage["training"]["global_step"] == 20
    assert 0 <= lineage["validation"]["validation_cosine_ndcg@10"] <= 1
    assert lineage["best_checkpoint"].startswith("output/checkpoints/checkpoint-")
    assert lineage["evaluations"] == []
    assert lineage["data"]["validation"]["scored"] == {
        "max_queries": train.VALIDATION_MAX_QUERIES,
        "queries": 8,
        "of_queries": 8,
        "pairs": 8,
        "max_distractors": train.VALIDATION_DISTRACTORS,
        "distractors": 10,
        "of_other_answers": 10,
        "corpus_documents": 12,
    }
    fingerprint = json.loads((folder / "output" / "checkpoints" / "run.json").read_text())["fingerprint"]
    assert fingerprint["settings"]["VALIDATION_MAX_QUERIES"] == train.VALIDATION_MAX_QUERIES  # a change starts anew
    assert fingerprint["settings"]["VALIDATION_DISTRACTORS"] == train.VALIDATION_DISTRACTORS
    assert (final / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sentence-transformers" in (final / "README.md").read_text()  # the library's model card is kept
    assert not (folder / "wandb").exists()  # tracking off: wandb never started

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(final))
    assert model.prompts == {"query": "query: ", "document": "passage: "}
    assert model.encode_query(["How do I reset my password?"]).shape == (1, 32)


def test_settings_parse_by_type_and_reject_bad_values(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("BATCH_SIZE", "7")
    monkeypatch.setenv("USE_LORA", "yes")
    monkeypatch.setenv("LEARNING_RATE", "1e-4")
    monkeypatch.setenv("DATA_DIR", "mydata")
    s = train.settings()
    assert (s.BATCH_SIZE, s.USE_LORA, s.LEARNING_RATE) == (7, True, 1e-4)
    assert Path(s.TRAIN_PATH) == Path("mydata") / "qa_training_set.csv"
    monkeypatch.setenv("BATCH_SIZE", "seven")
    with pytest.raises(
        train.InputError, match=r"BATCH_SIZE='seven' \(from the environment\) is not a whole number above 0"
    ):
        train.settings()
    monkeypatch.setenv("BATCH_SIZE", "7")
    monkeypatch.setenv("RESUME", "maybe")
    with pytest.raises(train.InputError, match="RESUME"):
        train.settings()


def popen_train(cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    full_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, **env)
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py")],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def has_saved_trainer_state(checkpoints: Path) -> bool:
    """Whether a checkpoint's trainer_state.json (the trainer writes it last) holds whole JSON: it may be mid-write."""
    for path in checkpoints.glob("checkpoint-*/trainer_state.json"):
        with contextlib.suppress(OSError, ValueError):
            json.loads(path.read_text())
            return True
    return False


def test_kill_and_resume_reaches_the_same_step_and_weights(tiny_model, tmp_path):
    env = {"MODEL_NAME": str(tiny_model), "BATCH_SIZE": "4", "NUM_TRAIN_EPOCHS": "6", **FAST}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    write_splits(whole)
    write_splits(killed)
    assert run_script("train.py", whole, env).returncode == 0

    process = popen_train(killed, env)
    checkpoints = killed / "output" / "checkpoints"
    while process.poll() is None and not has_saved_trainer_state(checkpoints):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (killed / "output" / "final").exists()
    # The kill may land while the trainer writes a later checkpoint: the resume must pick the last complete one.
    last = train.last_complete_checkpoint(checkpoints, world_size=1)
    # Simulate a kill in the middle of writing the next checkpoint: weights there, trainer state not yet.
    half = checkpoints / f"checkpoint-{max(map(train.checkpoint_step, checkpoints.glob('checkpoint-*'))) + 5}"
    shutil.copytree(last, half)
    (half / "trainer_state.json").unlink()

    result = run_script("train.py", killed, env)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in stdout_lines(result) if not line.startswith(("  ", "{"))]  # without settings and logs
    assert f"resuming from {last}".replace(str(killed) + "/", "") in result.stdout, said
    assert f"skipping {half.name}: trainer_state.json missing or empty" in result.stdout
    assert final_step(killed / "output") == final_step(whole / "output") == 60
    steps = [json.loads(p.read_text())["global_step"] for p in checkpoints.glob("checkpoint-*/trainer_state.json")]
    assert max(steps) == 60

    from sentence_transformers import SentenceTransformer

    texts = list(small_qa_frame()["Question"][:8])
    resumed = SentenceTransformer(str(killed / "output" / "final")).encode(texts)
    uninterrupted = SentenceTransformer(str(whole / "output" / "final")).encode(texts)
    assert abs(resumed - uninterrupted).max() < 1e-5


@pytest.fixture
def checkpoint_copy(trained, tmp_path) -> Path:
    """A complete checkpoint of the module's run, copied into a fresh checkpoints folder."""
    folder, _ = trained
    source = max((folder / "output" / "checkpoints").glob("checkpoint-*"), key=train.checkpoint_step)
    target = tmp_path / "output" / "checkpoints" / source.name
    shutil.copytree(source, target)
    return target


def test_complete_checkpoint_is_accepted(checkpoint_copy):
    assert train.checkpoint_problem(checkpoint_copy, world_size=1) is None
    assert train.last_complete_checkpoint(checkpoint_copy.parent, world_size=1) == checkpoint_copy


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x00garbage" * 10), "unreadable file"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "unreadable file"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "unreadable file"),
        (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth missing"),
    ],
)
def test_damaged_checkpoint_is_skipped_and_moved_aside(checkpoint_copy, damage, problem):
    damage(checkpoint_copy)
    assert problem in train.checkpoint_problem(checkpoint_copy, world_size=1)
    checkpoints = checkpoint_copy.parent
    fingerprint = {"settings": {}}
    train.write_json_atomic(checkpoints / "run.json", {"fingerprint": fingerprint, "finished_at": None})
    lines = train.prepare_checkpoints(checkpoints, fingerprint, resume=True, world_size=1)
    assert len(lines) == 1 and lines[0].startswith(f"skipping {checkpoint_copy.name}: ")
    assert not checkpoint_copy.exists()
    assert list(checkpoints.parent.glob(f"incomplete-{checkpoint_copy.name}-*"))  # moved, not deleted
    assert train.last_complete_checkpoint(checkpoints, world_size=1) is None


@pytest.mark.parametrize(
    ("run", "resume", "reason"),
    [
        ({"fingerprint": {"settings": {"BATCH_SIZE": 8}}, "finished_at": None}, True, "changed: BATCH_SIZE"),
        ({"fingerprint": {"settings": {"BATCH_SIZE": 4}}, "finished_at": None}, False, "RESUME=False"),
        ({"fingerprint": {"settings": {"BATCH_SIZE": 4}}, "finished_at": "2026-01-01T00:00:00Z"}, True, "finished"),
        (None, True, "run.json is missing"),
    ],
)
def test_checkpoints_of_another_run_are_moved_aside(tmp_path, run, resume, reason):
    checkpoints = tmp_path / "output" / "checkpoints"
    (checkpoints / "checkpoint-10").mkdir(parents=True)
    if run:
        train.write_json_atomic(checkpoints / "run.json", run)
    fingerprint = {"settings": {"BATCH_SIZE": 4}}
    lines = train.prepare_checkpoints(checkpoints, fingerprint, resume=resume, world_size=1)
    assert len(lines) == 1 and lines[0].startswith("starting a new run:") and reason in lines[0]
    aside = list((tmp_path / "output").glob("checkpoints-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint-10").is_dir()
    assert json.loads((checkpoints / "run.json").read_text())["fingerprint"] == fingerprint
    assert not list(checkpoints.glob("checkpoint-*"))


def test_matching_unfinished_run_resumes(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    fingerprint = {"settings": {"BATCH_SIZE": 4}}
    train.write_json_atomic(checkpoints / "run.json", {"fingerprint": fingerprint, "finished_at": None})
    assert train.prepare_checkpoints(checkpoints, fingerprint, resume=True, world_size=1) == []
    assert not list(tmp_path.glob("checkpoints-*"))


def test_save_final_keeps_the_earlier_final_even_when_a_save_fails(trained, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    folder, _ = trained
    model = SentenceTransformer(str(folder / "output" / "final"))
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_validation_cosine_ndcg@10": 0.5}]
    first = train.save_final(model, tmp_path, {"finished_at": "2026-11-22T04:15:00Z"}, history, merge_lora=False)
    assert first == tmp_path / "final" and (first / "training_curve.png").exists()

    def broken_save(path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError):
        train.save_final(model, tmp_path, {"finished_at": "2026-11-22T05:00:00Z"}, history, merge_lora=False)
    assert json.loads((first / "lineage.json").read_text())["finished_at"] == "2026-11-22T04:15:00Z"
    monkeypatch.undo()

    train.save_final(model, tmp_path, {"finished_at": "2026-11-22T05:00:00Z"}, history, merge_lora=False)
    earlier = tmp_path / "final-20261122T041500Z"
    assert json.loads((earlier / "lineage.json").read_text())["finished_at"] == "2026-11-22T04:15:00Z"
    assert json.loads((first / "lineage.json").read_text())["finished_at"] == "2026-11-22T05:00:00Z"
    SentenceTransformer(str(earlier))  # still a loadable model


def test_lora_adapter_is_small_loads_and_merged_model_matches(tiny_model, tmp_path):
    write_splits(tmp_path, manifest=False)
    env = {
        "MODEL_NAME": str(tiny_model),
        "BATCH_SIZE": "4",
        "NUM_TRAIN_EPOCHS": "1",
        "USE_LORA": "1",
        "MERGE_LORA": "1",
        **FAST,
    }
    result = run_script("train.py", tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: no split manifest at data/split_manifest.json" in result.stdout
    final = tmp_path / "output" / "final"
    assert not (final / "model.safetensors").exists()
    adapter_size = (final / "adapter_model.safetensors").stat().st_size
    assert adapter_size < (tiny_model / "model.safetensors").stat().st_size / 4
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["lora"] is True and lineage["data"]["split_manifest"]["sha256"] is None
    assert (final / "README.md").exists() and (final / "merged" / "README.md").exists()
    assert json.loads((final / "merged" / "lineage.json").read_text())["merged_from_lora"] is True

    from sentence_transformers import SentenceTransformer

    texts = ["How do I reset my password?", "Wer genehmigt meine Reisekosten?"]
    adapter_model = SentenceTransformer(str(final))  # how eval.py loads it: base from adapter_config.json
    merged = SentenceTransformer(str(final / "merged"))
    base = SentenceTransformer(str(tiny_model))
    adapter_embeddings = adapter_model.encode_query(texts)
    assert abs(adapter_embeddings - merged.encode_query(texts)).max() < 1e-5
    assert abs(adapter_embeddings - base.encode(texts, prompt="query: ")).max() > 1e-5  # the adapter did train


def test_hard_negatives_cached_loss_bounded_validation_and_offline_tracking(tiny_model, tmp_path, capsys):
    data = write_splits(tmp_path)
    env = {
        "MODEL_NAME": str(tiny_model),
        "BATCH_SIZE": "8",
        "NUM_TRAIN_EPOCHS": "1",
        "MINE_HARD_NEGATIVES": "1",
        "CACHED_MINI_BATCH_SIZE": "2",
        "HARD_NEGATIVE_MARGIN": "0",
        "HARD_NEGATIVE_MAX_SCORE": "1.0",
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "train-test",
        "MIX_WITH_BASE": "1",
        "VALIDATION_MAX_QUERIES": "5",  # of 8
        "VALIDATION_DISTRACTORS": "3",  # of 10 or 11
        **FAST,
    }
    result = run_script("train.py", tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The run scored the sample this process draws from the same splits: seeded, whatever the process.
    caps = SimpleNamespace(SEED=train.SEED, VALIDATION_MAX_QUERIES=5, VALIDATION_DISTRACTORS=3)
    splits = [train.read_split(data / f"qa_{kind}_set.csv", kind) for kind in ("training", "validation")]
    capsys.readouterr()
    scored = train.scored_validation(caps, *splits, verbose=True)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("validation queries: 5 of 8 (seeded sample; 5 pairs")
    assert all(line in stdout_lines(result) for line in printed), printed
    lineage = json.loads((tmp_path / "output" / "final" / "lineage.json").read_text())
    assert lineage["data"]["validation"]["scored"] == scored.counts and scored.counts["distractors"] == 3
    mined = re.search(r"^hard negatives: (\d+) \(anchor, positive, negative\) rows from 40 pairs", result.stdout, re.M)
    assert mined and 0 < int(mined.group(1)) <= 40
    assert "tracking: wandb" in result.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert lineage["settings"]["CACHED_MINI_BATCH_SIZE"] == 2 and lineage["training"]["tracking"] == "wandb"
    mix = lineage["mix_with_base"]
    assert set(mix["validation_scores"]) == {"0.25", "0.5", "0.75", "1.0"}  # JSON keys
    assert mix["validation_scores"][str(mix["fine_tuned_share"])] == max(mix["validation_scores"].values())
    assert "| mixed with the base (share of fine-tuned weights: score) 0.25: " in result.stdout


def test_train_with_dropout_false_switches_off_every_dropout_layer_and_the_default_keeps_them(tiny_model):
    import torch

    frame = small_qa_frame()
    options = {"MODEL_NAME": str(tiny_model), "QUERY_PROMPT": "query: ", "PASSAGE_PROMPT": "passage: "}
    options |= {"MINE_HARD_NEGATIVES": False, "MIX_WITH_BASE": False, "GENERAL_VALIDATION_PATH": "", "USE_LORA": False}
    rates = {}
    for keep in (True, False):
        s = SimpleNamespace(**options, TRAIN_WITH_DROPOUT=keep)
        model = train.model_and_datasets(s, frame, frame.head(4), verbose=False)[0]
        rates[keep] = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(rates[True]) >= 5 and set(rates[True]) == {0.1}  # BERT's embeddings, attention and output layers
    assert len(rates[False]) == len(rates[True]) and set(rates[False]) == {0.0}
    model.train()  # the trainer's mode: with dropout off, two passes over one batch give the same embeddings
    features = model.preprocess(["query: how do I reset my password"])
    with torch.no_grad():
        first, second = (model(dict(features))["sentence_embedding"] for _ in range(2))
    assert torch.equal(first, second)


def test_mixed_weights_move_floats_part_of_the_way_and_keep_integer_buffers():
    import torch

    base = {"weight": torch.tensor([0.0, 2.0]), "position_ids": torch.tensor([0, 1])}
    tuned = {"weight": torch.tensor([4.0, 2.0]), "position_ids": torch.tensor([0, 1])}
    mixed = train.mixed_weights(base, tuned, 0.25)
    assert torch.equal(mixed["weight"], torch.tensor([1.0, 2.0]))
    assert mixed["position_ids"].dtype == torch.int64 and torch.equal(mixed["position_ids"], tuned["position_ids"])


@pytest.mark.parametrize("neighbour_rows", ["0", "1"])  # grouped batches, and neighbour batches built on each rank
def test_torchrun_two_cpu_processes_train_one_model(tiny_model, tmp_path, neighbour_rows):
    write_splits(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MODEL_NAME": str(tiny_model),
            "BATCH_SIZE": "4",
            "NUM_TRAIN_EPOCHS": "2",
            "NEIGHBOUR_ROWS": neighbour_rows,
            **FAST,
        }
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 40 pairs in batches of 4 = 10 batches per epoch, shared by 2 ranks: 5 steps per epoch, not 10. The 40 pairs
    # are 10 groups of 4 (shared answers): the neighbour batches leave an epoch's last rows in short batches, which
    # accelerate drops under torchrun so that every rank gets a full batch (both ranks still take the same steps).
    # Searched in the whole output: the two ranks print at once, so their lines can run into each other.
    steps = set(re.findall(r"rank (\d) of 2: finished training at step (\d+)", result.stdout))
    ranks, done = zip(*sorted(steps), strict=True)
    assert ranks == ("0", "1") and len(set(done)) == 1  # one step count: the ranks trained in step
    assert int(done[0]) == 10 if neighbour_rows == "0" else 8 <= int(done[0]) <= 10  # 8 here
    assert result.stdout.count("final model saved to") == 1
    output = tmp_path / "output"
    assert [p.name for p in output.iterdir() if p.name.startswith("final")] == ["final"]
    assert final_step(output) == int(done[0])
    checkpoint = max((output / "checkpoints").glob("checkpoint-*"), key=train.checkpoint_step)
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()


def test_missing_split_is_a_one_line_error(tmp_path):
    result = run_script("train.py", tmp_path, {"MODEL_NAME": "unused"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: training split '{Path('data') / 'qa_training_set.csv'}' not found; run `python split_data.py` "
        "first or set TRAIN_PATH in .env"
    ]


def test_split_without_answer_column_or_with_empty_cells_is_rejected(tmp_path):
    path = tmp_path / "split.csv"
    pd.DataFrame({"Question": ["q"], "Reply": ["a"]}).to_csv(path, index=False)
    with pytest.raises(train.InputError, match="has no Answer column"):
        train.read_split(path, "training")
    pd.DataFrame({"Question": ["q1", "q2"], "Answer": ["a", "  "]}).to_csv(path, index=False)
    with pytest.raises(train.InputError, match="row 3 has an empty Question or Answer"):
        train.read_split(path, "training")
    path.write_bytes(b"Question,Answer\n\xff\xfe\x00binary,\x80\n")
    with pytest.raises(train.InputError, match="is not a UTF-8 CSV"):
        train.read_split(path, "validation")


def test_unloadable_model_and_unwritable_output_are_input_errors(tmp_path):
    with pytest.raises(train.InputError, match="cannot load model '/no/such/model': no such folder; set MODEL_NAME"):
        train.load_model("/no/such/model")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(train.InputError, match="set OUTPUT_DIR in .env to a writable folder"):
        train.check_writable(tmp_path / "a_file" / "output")


def test_grouped_evaluator_gives_one_document_per_distinct_answer():
    pairs = pd.DataFrame({"Question": ["q1", "q1", "q2", "q3"], "Answer": ["a", "b", "a", "c"]})
    evaluator = train.grouped_ir_evaluator(pairs, pd.Series(["a", "b", "c", "a", "d"]), "validation", "query: ", "")
    assert sorted(evaluator.corpus) == ["a", "b", "c", "d"]
    assert sorted(evaluator.queries) == ["q1", "q2", "q3"]
    relevant = {evaluator.queries[evaluator.queries_ids.index(q)]: docs for q, docs in evaluator.relevant_docs.items()}
    corpus_text = dict(zip(evaluator.corpus_ids, evaluator.corpus, strict=True))
    assert {q: {corpus_text[d] for d in docs} for q, docs in relevant.items()} == {
        "q1": {"a", "b"},
        "q2": {"a"},
        "q3": {"c"},
    }
    assert evaluator.query_prompt == "query: " and evaluator.corpus_prompt is None


def translation_pairs(pairs: int = 30) -> pd.DataFrame:
    """`pairs` questions in English and German, each with its own answer, a question and its translation sharing an
    id; every 5th id also shares its English answer with the next id's, and every 7th question is asked twice
    (differing only in case and punctuation), so all three kinds of link are present."""
    rows = []
    for i in range(pairs):
        shared = f"answer en {i - 1}" if i % 5 == 1 else f"answer en {i}"
        rows.append({"Question": f"Question {i}?", "Answer": shared, "id": f"id{i}"})
        rows.append({"Question": f"Frage {i}?", "Answer": f"Antwort de {i}", "id": f"id{i}"})
        if i % 7 == 0:
            rows.append({"Question": f"question {i}", "Answer": f"answer en {i} again", "id": ""})
    return pd.DataFrame(rows)


def sampled_batches(frame: pd.DataFrame, group_column: str | None, seed: int) -> tuple[list[list[int]], list[str]]:
    import torch
    from datasets import Dataset

    dataset = Dataset.from_dict({"anchor": list(frame["Question"]), "positive": list(frame["Answer"])})
    sampler = train.grouped_batch_sampler(
        dataset,
        train.group_values_by_question([frame], group_column),
        batch_size=8,
        drop_last=False,
        generator=torch.Generator(),
        seed=seed,
    )
    groups = train.batch_groups(dataset, train.group_values_by_question([frame], "id"))
    return list(sampler), groups


def test_grouped_batches_never_hold_two_rows_of_one_group_and_use_every_row_once():
    frame = translation_pairs()
    expected_groups = pd.Series(range(len(frame))).groupby(frame["id"].where(frame["id"] != "")).ngroups
    for seed in range(5):
        batches, groups = sampled_batches(frame, "id", seed)
        assert len(set(groups)) < expected_groups  # shared answers and near-duplicate questions merge some ids
        for batch in batches:
            assert len({groups[i] for i in batch}) == len(batch), f"seed {seed}: a group twice in {batch}"
        assert sorted(i for batch in batches for i in batch) == list(range(len(frame)))  # each row exactly once
    # Without the group column only identical texts are kept apart, and translations do meet in a batch:
    # the check above would catch that.
    plain = [sampled_batches(frame, None, seed) for seed in range(5)]
    assert any(len({groups[i] for i in batch}) < len(batch) for batches, groups in plain for batch in batches)


def test_confusable_neighbours_rank_wrong_answers_by_the_base_scores_leaving_out_groups_and_likely_right_ones():
    import torch
    from datasets import Dataset

    # Question i scores answer j at scores[i][j] (its own answer on the diagonal). q0 and q4 share an id.
    scores = [
        [0.50, 0.90, 0.40, 0.30, 0.45],  # a1 beats q0's own answer: more likely right than wrong, left out
        [0.10, 0.60, 0.20, 0.50, 0.30],
        [0.30, 0.20, 0.70, 0.10, 0.60],
        [0.20, 0.40, 0.10, 0.80, 0.30],
        [0.60, 0.10, 0.20, 0.30, 0.70],
    ]
    questions = {f"q{i}": torch.tensor(row) / torch.tensor(row).norm() for i, row in enumerate(scores)}
    answers = {f"a{i}": torch.eye(5)[i] for i in range(5)}
    base = SimpleNamespace(
        encode_query=lambda texts, **_: torch.stack([questions[text] for text in texts]),
        encode_document=lambda texts, **_: torch.stack([answers[text] for text in texts]),
    )
    dataset = Dataset.from_dict({"anchor": list(questions), "positive": list(answers)})
    s = SimpleNamespace(NEIGHBOUR_ROWS=2, NO_DUPLICATE_BATCHES=True, BATCH_SIZE=8)
    neighbours = train.confusable_neighbours(base, dataset, {"q0": "id7", "q4": "id7"}, s, verbose=False)
    assert neighbours.per_row == 2 and neighbours.anchors == list(questions)
    assert [[int(j) for j in row if j >= 0] for row in neighbours.rows] == [
        [2, 3],  # not 4 (q0's translation's row), not 1 (scored above a0)
        [3, 4, 2, 0],
        [4, 0, 1, 3],
        [1, 4, 0, 2],
        [3, 2, 1],  # not 0
    ]
    off = SimpleNamespace(**vars(s) | {"NEIGHBOUR_ROWS": 0})
    assert train.confusable_neighbours(base, dataset, {}, off, verbose=False) is None


def test_neighbour_batches_put_each_row_with_its_neighbours_and_still_use_every_row_once():
    import numpy as np
    import torch
    from datasets import Dataset

    frame = translation_pairs(40)
    dataset = Dataset.from_dict({"anchor": list(frame["Question"]), "positive": list(frame["Answer"])})
    group_of_question = train.group_values_by_question([frame], "id")
    groups = train.batch_groups(dataset, group_of_question)
    rows = len(frame)
    ring = np.array([[(i + 5 * k) % rows for k in range(1, 4)] for i in range(rows)])  # row i's confusable rows
    group_numbers = pd.factorize(pd.Series(groups))[0]
    neighbours = SimpleNamespace(anchors=dataset["anchor"], groups=group_numbers, rows=ring, per_row=3)
    options = {"batch_size": 8, "drop_last": False, "generator": torch.Generator(), "seed": 3}

    def linked(batches) -> float:
        """The share of rows that sit in a batch with one of their neighbours or a row they are a neighbour of."""
        return np.mean([any(j in ring[i] or i in ring[j] for j in batch if j != i) for batch in batches for i in batch])

    sampler = train.grouped_batch_sampler(dataset, group_of_question, neighbours, **options)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert batches == list(sampler)  # seeded by SEED and the epoch alone: a resumed run gets the same batches
        for batch in batches:
            assert len(batch) <= 8 and len({groups[i] for i in batch}) == len(batch), f"a group twice in {batch}"
        assert sorted(i for batch in batches for i in batch) == list(range(rows))  # each row exactly once
        assert linked(batches) > 0.75  # 0.81 to 0.87 here
    plain = train.grouped_batch_sampler(dataset, group_of_question, None, **options)
    assert linked(list(plain)) < 0.65  # random batches: by chance only (0.51 here)
    # Any other dataset (the validation loss's) gets the plain grouped batches.
    other = Dataset.from_dict({"anchor": [q + "?" for q in frame["Question"]], "positive": list(frame["Answer"])})
    assert type(train.grouped_batch_sampler(other, {}, neighbours, **options)).__name__ == "NoDuplicatesBatchSampler"


def test_a_run_with_neighbour_batches_trains_every_step_and_needs_grouped_batches(tiny_model, tmp_path):
    write_splits(tmp_path)
    env = {"MODEL_NAME": str(tiny_model), "BATCH_SIZE": "4", "NUM_TRAIN_EPOCHS": "1", "NEIGHBOUR_ROWS": "1", **FAST}
    result = run_script("train.py", tmp_path, env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    printed = "neighbour batches: each random row brings up to 1 of the "
    assert any(line.startswith(printed) for line in stdout_lines(result))
    assert final_step(tmp_path / "output") == 10  # 40 pairs in batches of 4
    result = run_script("train.py", tmp_path, env | {"NO_DUPLICATE_BATCHES": "false"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: NEIGHBOUR_ROWS=1 and NO_DUPLICATE_BATCHES=False do not go together: neighbour batches build on the "
        "grouped batches: set NO_DUPLICATE_BATCHES=true or NEIGHBOUR_ROWS=0; change them in .env or the environment"
    ]


def test_a_run_that_only_gets_worse_saves_nothing_and_says_so(trained, tmp_path):
    # The base is the end-to-end run's fine-tuned model, validated on the pairs it was trained on, so it starts far
    # above chance; a learning rate of 1 wrecks it.
    base = trained[0] / "output" / "final"
    data = write_splits(tmp_path)
    shutil.copy(data / "qa_training_set.csv", data / "qa_validation_set.csv")  # a copy: one file for both is refused
    env = {"MODEL_NAME": str(base), "BATCH_SIZE": "4", "NUM_TRAIN_EPOCHS": "1", **FAST, "LEARNING_RATE": "1"}
    env |= {"REQUIRE_VALIDATION_GAIN": "true"}
    result = run_script("train.py", tmp_path, env)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "result: no fine-tuned model beat the base model on validation NDCG@10" in result.stdout
    assert "nothing was saved as the final model" in result.stdout
    assert not (tmp_path / "output" / "final").exists()
    assert json.loads((tmp_path / "output" / "checkpoints" / "run.json").read_text())["finished_at"]


def test_the_group_helpers_are_split_data_copies():
    # train.py forms batch groups exactly as split_data.py forms split groups; the card allows no shared module.
    import inspect

    spec = importlib.util.spec_from_file_location("split_data", REPO / "split_data.py")
    split_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split_data)
    for name in ("punctuation_table", "normalised_question", "group_ids"):
        assert inspect.getsource(getattr(train, name)) == inspect.getsource(getattr(split_data, name)), name
    eval_spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    eval_script = importlib.util.module_from_spec(eval_spec)
    eval_spec.loader.exec_module(eval_script)
    assert inspect.getsource(train.group_values) == inspect.getsource(eval_script.group_values)
    assert train.missing_markers == split_data.missing_markers == eval_script.missing_markers


def test_the_group_column_reaches_the_sampler_and_missing_markers_link_nothing(tmp_path):
    ids = ["x", "x", "NULL", "null"]
    frame = pd.DataFrame({"Question": ["q1", "Frage 1", "q2", "q3"], "Answer": ["a1", "b1", "a2", "a3"], "id": ids})
    frame.to_csv(tmp_path / "train.csv", index=False)
    split = train.read_split(tmp_path / "train.csv", "training")  # as train.py reads it, the id column kept
    groups = train.batch_groups(
        {"anchor": list(split["Question"]), "positive": list(split["Answer"])},
        train.group_values_by_question([split], "id"),
    )
    assert groups[0] == groups[1]  # a question and its translation: one group
    assert len({groups[0], groups[2], groups[3]}) == 3  # "NULL" and "null" are no id, so no link


def validation_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """300 training pairs and 132 validation pairs: 120 questions, two per answer, every 10th with a second answer of
    its own; one training answer is a validation answer (split_data.py never does that, a hand-made split may), so
    371 distinct answers in all."""
    training = pd.DataFrame({"Question": [f"tq{i}" for i in range(300)], "Answer": [f"ta{i}" for i in range(300)]})
    training.loc[0, "Answer"] = "va0"
    rows = [(f"vq{i}", f"va{i // 2}") for i in range(120)] + [(f"vq{i}", f"vb{i}") for i in range(0, 120, 10)]
    validation = pd.DataFrame(rows, columns=["Question", "Answer"])
    return training, validation


def caps(queries: int, distractors: int, seed: int = 42) -> SimpleNamespace:
    return SimpleNamespace(SEED=seed, VALIDATION_MAX_QUERIES=queries, VALIDATION_DISTRACTORS=distractors)


def test_scored_validation_is_a_seeded_capped_sample_with_every_answer_of_its_questions():
    training, validation = validation_frames()
    scored = train.scored_validation(caps(30, 50), training, validation, verbose=False)
    again = train.scored_validation(caps(30, 50), training, validation, verbose=False)
    pd.testing.assert_frame_equal(scored.pairs, again.pairs)
    assert scored.corpus == again.corpus
    other_seed = train.scored_validation(caps(30, 50, seed=43), training, validation, verbose=False)
    assert set(other_seed.pairs["Question"]) != set(scored.pairs["Question"])

    questions = set(scored.pairs["Question"])
    assert len(questions) == 30
    # Every pair of a sampled question is scored, so a question with two answers keeps both.
    pd.testing.assert_frame_equal(scored.pairs, validation[validation["Question"].isin(questions)])
    assert scored.pairs["Question"].duplicated().any()
    relevant = set(scored.pairs["Answer"])
    assert relevant <= set(scored.corpus)
    # Each document once: a sampled question's answer is never a distractor as well, and 50 distractors are added.
    assert len(scored.corpus) == len(set(scored.corpus)) == len(relevant) + 50
    distractors = set(scored.corpus) - relevant
    assert distractors & set(training["Answer"])
    assert distractors & (set(validation["Answer"]) - relevant)  # unsampled validation answers are distractors too
    assert scored.counts == {
        "max_queries": 30,
        "queries": 30,
        "of_queries": 120,
        "pairs": len(scored.pairs),
        "max_distractors": 50,
        "distractors": 50,
        "of_other_answers": 371 - len(relevant),
        "corpus_documents": len(relevant) + 50,
    }


def test_scored_validation_up_to_the_caps_is_the_whole_split_against_every_answer(capsys):
    training, validation = validation_frames()
    every_answer = list(dict.fromkeys(pd.concat([training["Answer"], validation["Answer"]])))  # the previous corpus
    assert len(every_answer) == 371
    scored = train.scored_validation(caps(120, 299), training, validation, verbose=True)
    pd.testing.assert_frame_equal(scored.pairs, validation)
    assert scored.corpus == every_answer
    assert capsys.readouterr().out.splitlines() == [
        "validation corpus: 371 documents (every training and validation answer)"
    ]

    train.scored_validation(caps(119, 298), training, validation, verbose=True)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2
    assert re.fullmatch(
        r"validation queries: 119 of 120 \(seeded sample; 13[01] pairs for the validation loss\)", printed[0]
    )
    assert re.fullmatch(
        r"validation corpus: \d+ documents \(298 sampled from (299|300) training and other validation answers\)",
        printed[1],
    )


def test_scored_validation_is_the_same_in_every_process(tmp_path):
    # torchrun ranks and resumed runs are separate processes, with their own string hashing (set order).
    training, validation = validation_frames()
    training.to_csv(tmp_path / "training.csv", index=False)
    validation.to_csv(tmp_path / "validation.csv", index=False)
    code = (
        "import importlib.util, json, sys; from types import SimpleNamespace as S\n"
        f"spec = importlib.util.spec_from_file_location('train', {str(REPO / 'train.py')!r})\n"
        "train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)\n"
        "splits = [train.read_split(train.Path(sys.argv[1], f'{k}.csv'), k) for k in ('training', 'validation')]\n"
        "s = S(SEED=42, VALIDATION_MAX_QUERIES=30, VALIDATION_DISTRACTORS=50)\n"
        "scored = train.scored_validation(s, *splits, verbose=False)\n"
        "print(json.dumps([list(scored.pairs['Question']), scored.corpus]))\n"
    )
    samples = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        samples.append(json.loads(result.stdout))
    here = train.scored_validation(caps(30, 50), training, validation, verbose=False)
    assert samples[0] == samples[1] == [list(here.pairs["Question"]), here.corpus]


def test_dataloader_defaults_and_grouped_batches_from_worker_processes(tiny_model, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    assert train.dataloader_options(False, 1) == {"dataloader_num_workers": 0, "dataloader_pin_memory": False}
    for cores, processes, workers in ((2, 1, 1), (16, 1, 4), (16, 8, 1), (1, 1, 0)):
        with mock.patch("os.cpu_count", return_value=cores):
            assert train.dataloader_options(True, processes) == {
                "dataloader_num_workers": workers,
                "dataloader_pin_memory": True,
            }
    # On a GPU machine workers load the batches the grouped sampler (a callable the trainer calls) lays out.
    frame = translation_pairs()
    dataset = Dataset.from_dict({"anchor": list(frame["Question"]), "positive": list(frame["Answer"])})
    s = SimpleNamespace(**train.setting_defaults() | {"BATCH_SIZE": 8, "MODEL_NAME": str(tiny_model)})
    r = SimpleNamespace(fp16=False, cuda=False, world_size=1, tracking="none", started_at="now")
    group_of_question = train.group_values_by_question([frame], "id")
    batch_plan = (group_of_question, None)  # no neighbour batches
    args = train.training_arguments(s, r, tmp_path / "checkpoints", 10, batch_plan, dataset.column_names)
    args.dataloader_num_workers = 2
    model = SentenceTransformer(str(tiny_model))
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        loss=train.training_loss(model, s, world_size=1),
    )
    loader = trainer.get_train_dataloader()
    assert loader.num_workers == 2
    sizes = [len(batch["anchor_input_ids"]) for batch in loader]
    assert sum(sizes) == len(frame) and max(sizes) <= 8  # every row once, in batches of at most BATCH_SIZE


# --- the general guard (issue 13): a general validation set, and the candidate that keeps it ---------------------

GENERAL_COLUMNS = ("question", "Answer", "language")  # the scripts find them in any capitalisation


def test_guarded_share_keeps_the_best_validation_score_within_the_general_limit():
    names, limit = (["geo.csv", "news.csv"], 0.01)
    base_general = [0.90, 0.80]
    validation = {1.0: 0.70, 0.75: 0.69, 0.5: 0.66, 0.25: 0.62}
    general = {1.0: [0.85, 0.81], 0.75: [0.889, 0.80], 0.5: [0.895, 0.795], 0.25: [0.90, 0.80]}
    share, verdicts = train.guarded_share(validation, general, 0.60, base_general, (names, limit))
    # The best checkpoint leads on validation but loses 0.05 on geo.csv; 0.75 loses 0.011: just over the limit.
    assert share == 0.5
    assert verdicts[1.0] == "loses 0.0500 on geo.csv, more than MAX_GENERAL_DROP=0.01"
    assert verdicts[0.75].startswith("loses 0.0110 on geo.csv")
    assert verdicts[0.5] == verdicts[0.25] == "qualifies"
    # A candidate must also beat the base on validation; a NaN score never qualifies.
    share, verdicts = train.guarded_share(validation, general, 0.68, base_general, (names, limit))
    assert share is None and verdicts[0.5] == "validation 0.6600 does not beat the base's 0.6800"
    nan = {**general, 0.5: [float("nan"), 0.80], 0.25: [0.90, float("nan")]}
    assert train.guarded_share(validation, nan, 0.60, base_general, (names, limit))[0] is None
    # Without a bar (REQUIRE_VALIDATION_GAIN=false) and with a loose limit, the best validation score wins.
    assert train.guarded_share(validation, general, None, base_general, (names, 0.1))[0] == 1.0


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    """A run with a general validation set and a limit every candidate keeps: the guard scores them all."""
    folder = tmp_path_factory.mktemp("guarded")
    write_splits(folder)
    write_general_set(folder / "general" / "geo.csv", columns=GENERAL_COLUMNS)
    env = {"MODEL_NAME": str(tiny_model), "BATCH_SIZE": "4", "NUM_TRAIN_EPOCHS": "1", **FAST}
    env |= {"GENERAL_VALIDATION_PATH": "general/geo.csv", "MAX_GENERAL_DROP": "1"}
    result = run_script("train.py", folder, env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder, result


def test_the_guard_scores_every_candidate_and_lineage_records_the_choice(guarded):
    folder, result = guarded
    lineage = json.loads((folder / "output" / "final" / "lineage.json").read_text())
    guard = lineage["general_guard"]
    share = guard["fine_tuned_share"]
    assert guard["method"] == "mix_with_base" and guard["max_general_drop"] == 1.0
    assert lineage["mix_with_base"]["fine_tuned_share"] == share
    validation = lineage["mix_with_base"]["validation_scores"]
    assert set(validation) == {"0.25", "0.5", "0.75", "1.0"}
    assert validation[str(share)] == max(validation.values())  # every candidate qualifies: the best validation wins
    (recorded,) = guard["sets"]
    assert recorded["path"] == "general/geo.csv" and recorded["rows"] == 8
    assert recorded["sha256"] == train.sha256(folder / "general" / "geo.csv")
    assert set(recorded["tried"]) == {"0.25", "0.5", "0.75", "1.0"}
    assert recorded["chosen"] == recorded["tried"][str(share)] and 0 < recorded["base"] <= 1
    lines = stdout_lines(result)
    start = lines.index("general guard (no general validation set may lose more than MAX_GENERAL_DROP=1 NDCG@10):")
    assert lines[start + 1] == (
        f"  general/geo.csv (8 rows): base {recorded['base']:.4f} | kept {recorded['chosen']:.4f} "
        f"(Δ={recorded['chosen'] - recorded['base']:+.4f})"
    )
    assert lines[start + 2 : start + 6] == [f"  share {k}: qualifies" for k in ("1", "0.75", "0.5", "0.25")]
    assert lines[start + 6].startswith(f"kept share {share:g}: the best validation NDCG@10 of the candidates")


@pytest.mark.parametrize("damage", ["missing file", "missing column", "bad encoding", "overlaps training"])
def test_a_general_validation_set_that_cannot_be_used_is_one_error_line_and_exit_2(tmp_path, damage):
    data = write_splits(tmp_path)
    path = write_general_set(tmp_path / "general" / "geo.csv", columns=GENERAL_COLUMNS)
    if damage == "missing column":
        path.write_text(path.read_text(encoding="utf-8").replace("question,", "Frage,", 1), encoding="utf-8")
    elif damage == "bad encoding":  # Excel's cp1252: "größte" is not UTF-8
        path.write_bytes(path.read_text(encoding="utf-8").replace("Rhein", "Rhein größte").encode("cp1252"))
    elif damage == "overlaps training":  # a paraphrase of a training question (case, punctuation) and a training answer
        training = pd.read_csv(data / "qa_training_set.csv")
        rows = [(training["Question"][0].upper().rstrip("?"), "Another answer.", "en"),
                ("Another question?", training["Answer"][1], "en")]  # fmt: skip
        write_general_set(path, GENERAL_ROWS + rows, GENERAL_COLUMNS)
    general = "general/nope.csv" if damage == "missing file" else "general/geo.csv"
    # The model is never loaded: the general set is refused before anything slow.
    result = run_script("train.py", tmp_path, {"MODEL_NAME": "/no/such/model", "GENERAL_VALIDATION_PATH": general})
    expected = {
        "missing file": r"error: general/nope\.csv not found; fix GENERAL_VALIDATION_PATH \(comma-separated CSV "
        r"paths\)",
        "missing column": r"error: general/geo\.csv has no Question column \(columns: \['Frage', 'Answer', "
        r"'language'\]\); name the columns Question and Answer in the first line",
        "bad encoding": r"error: general/geo\.csv is not a readable UTF-8 CSV \('utf-8' codec can't decode byte 0xf6 "
        r"in position \d+: invalid start byte\); save it as UTF-8 \(Excel: CSV UTF-8\)",
        "overlaps training": r"error: general validation set general/geo\.csv overlaps the training split "
        r"data/qa_training_set\.csv: 2 of 10 rows share a normalised question \(1\) or an answer \(1\) with it; a "
        r"general set holds questions from other domains: remove those rows",
    }[damage]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(expected, line), line
    assert not (tmp_path / "output" / "checkpoints").exists()


def test_a_run_whose_every_candidate_fails_the_guard_saves_nothing_and_says_so(trained, tmp_path):
    # As in the run that only gets worse: a learning rate of 1 wrecks a base that starts far above chance, so no
    # candidate beats it on validation, and the guard keeps none.
    base = trained[0] / "output" / "final"
    data = write_splits(tmp_path)
    shutil.copy(data / "qa_training_set.csv", data / "qa_validation_set.csv")
    write_general_set(tmp_path / "general" / "geo.csv", columns=GENERAL_COLUMNS)
    env = {"MODEL_NAME": str(base), "BATCH_SIZE": "4", "NUM_TRAIN_EPOCHS": "1", **FAST, "LEARNING_RATE": "1"}
    env |= {"REQUIRE_VALIDATION_GAIN": "true", "GENERAL_VALIDATION_PATH": "general/geo.csv"}
    result = run_script("train.py", tmp_path, env)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = stdout_lines(result)
    assert lines[-1].startswith(
        "result: no candidate kept general strength: neither the best checkpoint nor a mix of it with the base beat "
        "the base model on validation NDCG@10 and lost at most MAX_GENERAL_DROP=0.01 on every general validation set; "
        "nothing was saved as the final model"
    )
    assert "  share 1: validation " in result.stdout and "does not beat the base's" in result.stdout
    assert any(line.startswith("  general/geo.csv (8 rows): base ") and line.endswith("nothing kept") for line in lines)
    assert not (tmp_path / "output" / "final").exists()
    assert json.loads((tmp_path / "output" / "checkpoints" / "run.json").read_text())["finished_at"]


def test_eval_refuses_a_general_test_set_the_model_was_chosen_on(guarded):
    folder, _ = guarded
    frame = small_qa_frame(copies=5)
    frame[frame.index >= 48].to_csv(folder / "data" / "qa_test_set.csv", index=False)  # the 5th paraphrases only
    manifest = folder / "data" / "split_manifest.json"  # eval.py reads the split's GROUP_COLUMN from it
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"settings": {"GROUP_COLUMN": ""}}))
    shutil.copy(folder / "general" / "geo.csv", folder / "general" / "geo-copy.csv")
    for general in ("general/geo.csv", "general/geo-copy.csv"):  # the file itself, or a copy under another name
        result = run_script("eval.py", folder, {"GENERAL_TEST_PATH": general, "BOOTSTRAP_RESAMPLES": "10"})
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"error: general set {general} is the general validation set train.py chose this model on (same sha256 "
            "as general/geo.csv in its lineage.json), so it would flatter the model; never score on a set that was "
            "chosen on: set GENERAL_TEST_PATH to a held-out general set"
        ]
        assert "general[" not in result.stdout
