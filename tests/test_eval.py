"""eval.py: grouped evaluator, BM25, bootstrap, contamination, the gate, lineage, reports and registry.

Models used here, all built offline in seconds:
- `tiny_model` (conftest): a random 2-layer BERT. Its tokenizer (and so its scores) can differ between sessions,
  so no assertion depends on how well it ranks, only on its being the same model on both sides (no gain);
- honest / leaky: the tiny model trained a few steps with MultipleNegativesRankingLoss on the training split, or on
  the training split plus the test split (a leak), so the leak's inflated score is real, not simulated;
- know-nothing: every text gets the same embedding, so every ranking is the corpus order: a fixed floor, the base
  model of the runs that must pass;
- bag-of-words: a StaticEmbedding with one-hot token vectors, whose rankings follow shared words (known by hand);
  with English-only or German-only tokens zeroed it is a model broken in that language; with the tokens of the
  general set (GENERAL_ROWS) or of the helpdesk data zeroed, one that knows only the helpdesk or only general facts.
"""

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import GENERAL_ROWS, REPO, run_script, small_qa_frame, write_general_set

LINE = re.compile(
    r"^(test(_[a-z]+)?_cosine_[a-z]+@\d+): base=\d\.\d{4} \| fine-tuned=\d\.\d{4} \| Δ=[+-]\d\.\d{4} \| bm25=\d\.\d{4}$"
)

GENERAL_LINE = re.compile(
    r"^(general\[geo_facts\](_[a-z]+)?_cosine_[a-z]+@\d+): base=\d\.\d{4} \| fine-tuned=\d\.\d{4} \| Δ=[+-]\d\.\d{4}$"
)


@pytest.fixture(scope="session")
def ev():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_frames() -> dict[str, pd.DataFrame]:
    """48 rows split by answer (as split_data.py would): test 2 EN + 2 DE answers, validation 1 + 1, train the rest."""
    frame = small_qa_frame()
    answers = list(dict.fromkeys(frame["Answer"]))
    test, validation = {answers[i] for i in (0, 1, 6, 7)}, {answers[i] for i in (2, 8)}
    return {
        "train": frame[~frame["Answer"].isin(test | validation)],
        "validation": frame[frame["Answer"].isin(validation)],
        "test": frame[frame["Answer"].isin(test)],
    }


SPLIT_FILES = {"train": "qa_training_set.csv", "validation": "qa_validation_set.csv", "test": "qa_test_set.csv"}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working directory with data/ holding the three split CSVs in the contract's format."""
    (tmp_path / "data").mkdir()
    for split, frame in split_frames().items():
        frame.to_csv(tmp_path / "data" / SPLIT_FILES[split], index=False)
    return tmp_path


def bag_of_words_model(tiny_model: Path, folder: Path, zero_tokens=(), prompts=None, know_nothing=False) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    weights = np.eye(tokenizer.get_vocab_size(), dtype=np.float32)
    weights[list(zero_tokens)] = 0
    if know_nothing:  # all ones: the mean of any number of them is exactly the same vector, ties are exact
        weights = np.ones((tokenizer.get_vocab_size(), 8), dtype=np.float32)
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], prompts=prompts).save(
        str(folder)
    )
    return folder


def trained_model(tiny_model: Path, rows: pd.DataFrame, folder: Path) -> Path:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(tiny_model))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder.parent / f"{folder.name}-trainer"), num_train_epochs=10, per_device_train_batch_size=8,
        learning_rate=1e-3, seed=0, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
    )  # fmt: skip
    train_dataset = Dataset.from_dict({"anchor": list(rows["Question"]), "positive": list(rows["Answer"])})
    SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_dataset, loss=MultipleNegativesRankingLoss(model)
    ).train()
    model.save(str(folder))
    return folder


@pytest.fixture(scope="session")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("eval_models")
    splits = split_frames()
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    frame = small_qa_frame()

    def token_ids(language: str) -> set[int]:
        rows = frame[frame["language"] == language]
        texts = list(rows["Question"]) + list(rows["Answer"])
        return {i for text in texts for i in tokenizer.encode(text, add_special_tokens=False).ids}

    return {
        "honest": trained_model(tiny_model, splits["train"], folder / "honest"),
        "leaky": trained_model(tiny_model, pd.concat([splits["train"], splits["test"]]), folder / "leaky"),
        "bow": bag_of_words_model(tiny_model, folder / "bow"),
        "bow_broken_german": bag_of_words_model(tiny_model, folder / "bow_de", token_ids("de") - token_ids("en")),
        "bow_broken_english": bag_of_words_model(tiny_model, folder / "bow_en", token_ids("en") - token_ids("de")),
        "know_nothing": bag_of_words_model(tiny_model, folder / "know_nothing", know_nothing=True),
    }


@pytest.fixture(scope="session")
def traded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fine-tuning that traded general knowledge for the helpdesk: bag-of-words models over the tiny tokenizer,
    the "base" blind to helpdesk-only tokens, the "fine-tuned" blind to the general set's own tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    frame = small_qa_frame()

    def token_ids(texts) -> set[int]:
        return {i for text in texts for i in tokenizer.encode(text, add_special_tokens=False).ids}

    helpdesk = token_ids(list(frame["Question"]) + list(frame["Answer"]))
    general = token_ids([text for question, answer, _ in GENERAL_ROWS for text in (question, answer)])
    folder = tmp_path_factory.mktemp("traded")
    return {
        "base": bag_of_words_model(tiny_model, folder / "base", helpdesk - general),
        "finetuned": bag_of_words_model(tiny_model, folder / "finetuned", general - helpdesk),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_checkpoint(
    work: Path, model: Path, base: Path, train_csv: str | None = "data/qa_training_set.csv", lora: bool = False
) -> Path:
    """OUTPUT_DIR/final as train.py leaves it: the model folder plus lineage.json (unless train_csv is None)."""
    final = work / "output" / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(model, final)
    if train_csv is not None:
        lineage = {
            "base_model": {"name": str(base), "revision": None},
            "data": {
                "split_manifest": {"path": "data/split_manifest.json", "sha256": None},
                "train": {"path": train_csv, "sha256": sha256(work / train_csv), "rows": 24},
                "validation": {"path": "data/qa_validation_set.csv", "sha256": None, "rows": 8},
                "test_sha256": sha256(work / "data" / "qa_test_set.csv"),
            },
            "settings": {},
            "lora": lora,
            "evaluations": [],
        }
        (final / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
    return final


@pytest.fixture
def run_eval(ev, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """eval.py's main() in-process (no 10 s import per run), in `work`, with settings from the environment."""

    def run(work: Path, **env) -> tuple[int, str]:
        monkeypatch.chdir(work)
        settings = {"QUERY_PROMPT": "", "PASSAGE_PROMPT": "", "BOOTSTRAP_RESAMPLES": "300", "HF_HUB_OFFLINE": "1"}
        for name, value in (settings | env).items():
            monkeypatch.setenv(name, str(value))
        code = ev.main()
        return code, capsys.readouterr().out

    return run


def ndcg_line(out: str, prefix: str = "test") -> dict[str, float]:
    line = next(line for line in out.splitlines() if line.startswith(f"{prefix}_cosine_ndcg@10:"))
    return {key: float(value) for key, value in re.findall(r"(base|fine-tuned|bm25)=([\d.]+)", line)}


# --- the grouped evaluator, by hand ---


def test_identical_answer_copy_is_a_hit_when_grouped_and_a_miss_per_row(ev, tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    password = "Open the self-service portal and choose 'Forgot password'."
    vacation = "Full-time employees get 30 vacation days per calendar year."
    test = pd.DataFrame(
        {
            "Question": [
                "How do I reset my password?",
                "Quick question: How do I reset my password?",
                "How many vacation days do I get?",
            ],
            "Answer": [password, password, vacation],
        }
    )
    # Bag of words: each question shares words with its own answer only, and the two copies of the password
    # answer score the same, so the per-row ranking of question 2 is [copy 1 (other row's id), copy 2 (its own)].
    model = SentenceTransformer(str(bag_of_words_model(tiny_model, tmp_path / "bow")))
    results = {}
    for group in (True, False):
        queries, corpus, relevant, _ = ev.ir_inputs(test, [test], group, "language")
        evaluator = ev.test_evaluator(queries, corpus, relevant, "", "")
        rankings = ev.model_rankings(evaluator, model)
        results[group] = ev.metrics_of(evaluator, rankings, evaluator.queries_ids)
        library = evaluator(model)  # the evaluator's own numbers: the same as those from its rankings
        assert results[group] == pytest.approx({k.removeprefix("test_cosine_"): v for k, v in library.items()})
        for metric in results[group]:  # the bootstrap's per-query values average to the library's number
            per_query = ev.per_query_scores(rankings, relevant, evaluator.queries_ids, metric)
            assert per_query.mean() == pytest.approx(results[group][metric])
    assert results[True]["ndcg@10"] == results[True]["mrr@10"] == results[True]["accuracy@1"] == 1.0
    # Per row: question 1 and 3 find their own row first; question 2 finds the other row's identical copy first.
    assert results[False]["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1) / 3)  # 0.8770
    assert results[False]["mrr@10"] == pytest.approx((1 + 1 / 2 + 1) / 3)  # 0.8333
    assert results[False]["accuracy@1"] == pytest.approx(2 / 3)
    assert results[False]["accuracy@3"] == 1.0


def test_corpus_scope_all_holds_every_distinct_answer_of_the_three_splits(ev):
    splits = split_frames()
    frames = [splits["train"], splits["validation"], splits["test"]]
    _, corpus_all, relevant, languages = ev.ir_inputs(splits["test"], frames, True, "language")
    _, corpus_test, _, _ = ev.ir_inputs(splits["test"], [splits["test"]], True, "language")
    assert len(corpus_all) == 12 and len(corpus_test) == 4
    assert sorted(set(languages.values())) == ["de", "en"]
    assert all(len(ids) == 1 for ids in relevant.values())
    queries, corpus, relevant, _ = ev.ir_inputs(splits["test"], frames, False, "language")
    assert len(corpus) == 48 and len(queries) == 16  # per row: one id per row, as the recipe
    assert all(corpus[next(iter(ids))] == splits["test"]["Answer"].iloc[i] for i, ids in enumerate(relevant.values()))


def test_explicit_prompts_replace_the_models_own_so_a_prefix_is_never_applied_twice(ev, tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "query: ", "document": "passage: "}
    with_prompts = SentenceTransformer(str(bag_of_words_model(tiny_model, tmp_path / "p", prompts=prompts)))
    without = SentenceTransformer(str(bag_of_words_model(tiny_model, tmp_path / "n")))
    assert with_prompts.prompts["query"] == "query: "
    queries, corpus, relevant, _ = ev.ir_inputs(split_frames()["test"], [split_frames()["test"]], True, "language")

    def rankings(model, query_prompt, passage_prompt):
        return ev.model_rankings(ev.test_evaluator(queries, corpus, relevant, query_prompt, passage_prompt), model)

    assert rankings(with_prompts, "query: ", "passage: ") == rankings(without, "query: ", "passage: ")
    # The check can fail: a prefix does change this model's scores, so a doubled one would show.
    assert rankings(without, "query: query: ", "passage: passage: ") != rankings(without, "query: ", "passage: ")


# --- bootstrap, printed lines, gate, contamination: pure functions ---


def test_paired_bootstrap_on_toy_cases_with_known_answers(ev):
    ones, zeros = np.ones(50), np.zeros(50)
    assert ev.paired_bootstrap_ci(zeros, ones, 500, 0) == (1.0, 1.0)
    assert ev.bootstrap_report(zeros, ones, zeros, 500, 0)["verdict"] == "improved"
    assert ev.bootstrap_report(ones, zeros, zeros, 500, 0)["verdict"] == "regressed"
    same = ev.bootstrap_report(ones, ones, zeros, 500, 0)
    assert (same["verdict"], same["delta"], same["ci_low"], same["ci_high"]) == ("no significant change", 0, 0, 0)
    # Deltas of +1 and -1, 200 each: mean 0, sd 1, so the 95% interval is about ±1.96/sqrt(400) = ±0.098.
    base = np.zeros(400)
    finetuned = np.array([1.0, -1.0] * 200)
    low, high = ev.paired_bootstrap_ci(base, finetuned, 2000, 42)
    assert low == pytest.approx(-0.098, abs=0.015) and high == pytest.approx(0.098, abs=0.015)
    assert ev.bootstrap_report(base, finetuned, base, 2000, 42)["verdict"] == "no significant change"
    assert ev.paired_bootstrap_ci(base, finetuned, 2000, 42) == (low, high)  # fixed seed: same interval
    # Shifting every delta by +0.5 shifts the interval by +0.5 and makes it significant.
    shifted = ev.bootstrap_report(base, finetuned + 0.5, base, 2000, 42)
    assert (shifted["ci_low"], shifted["ci_high"]) == pytest.approx((low + 0.5, high + 0.5))
    assert shifted["verdict"] == "improved"


def test_metric_line_has_the_recipes_exact_format(ev):
    assert ev.metric_line("test_cosine_ndcg@10", 0.5, 0.61234) == (
        "test_cosine_ndcg@10: base=0.5000 | fine-tuned=0.6123 | Δ=+0.1123"
    )
    assert ev.metric_line("test_de_cosine_mrr@10", 0.7, 0.65, 0.4) == (
        "test_de_cosine_mrr@10: base=0.7000 | fine-tuned=0.6500 | Δ=-0.0500 | bm25=0.4000"
    )
    assert ev.metric_line("m", 0.5, 0.5 - 1e-9).endswith("Δ=+0.0000")  # no "-0.0000"


def gate_settings(**overrides):
    from types import SimpleNamespace

    values = {"PRIMARY_METRIC": "ndcg@10", "MIN_IMPROVEMENT": 0.01, "MAX_LANGUAGE_DROP": 0.01}
    values |= {"MAX_CONTAMINATION": 0.01, "MAX_GENERAL_DROP": 0.01}
    return SimpleNamespace(**(values | overrides))


def scores_of(base_ft: dict[str, tuple[float, float]]) -> dict:
    return {scope: {"base": {"ndcg@10": b}, "finetuned": {"ndcg@10": f}} for scope, (b, f) in base_ft.items()}


CLEAN = {"checked": True, "leaked_rows": 0, "test_rows": 100, "leaked_fraction": 0.0, "train_path": "t.csv"}


def test_gate_rules(ev):
    s = gate_settings()
    assert ev.gate_reasons(scores_of({"all": (0.5, 0.6), "en": (0.5, 0.6), "de": (0.5, 0.6)}), CLEAN, s) == []
    (no_gain,) = ev.gate_reasons(scores_of({"all": (0.5, 0.505)}), CLEAN, s)
    assert no_gain.startswith("no gain: ndcg@10 Δ=+0.0050")
    (german,) = ev.gate_reasons(scores_of({"all": (0.5, 0.6), "en": (0.4, 0.7), "de": (0.6, 0.55)}), CLEAN, s)
    assert german.startswith("language de regressed: ndcg@10 0.6000 -> 0.5500")
    leaked = CLEAN | {"leaked_rows": 2, "leaked_fraction": 0.02}
    (leak,) = ev.gate_reasons(scores_of({"all": (0.5, 0.6)}), leaked, s)
    assert "test set leaked into training: 2 of 100 test rows" in leak
    assert ev.gate_reasons(scores_of({"all": (0.5, 0.6)}), CLEAN | {"leaked_fraction": 0.01}, s) == []  # at the limit
    everything = ev.gate_reasons(scores_of({"all": (0.5, 0.4), "de": (0.6, 0.3)}), leaked, s)
    assert len(everything) == 3  # every reason, not just the first


def test_gate_rule_on_general_sets(ev):
    def general(*base_ft: tuple[float, float]) -> dict:
        sets = [{"name": f"set{i}", "path": f"g/set{i}.csv", "metrics": scores_of({"all": pair})["all"]}
                for i, pair in enumerate(base_ft)]  # fmt: skip
        return {"checked": True, "note": None, "sets": sets}

    s, passing = gate_settings(), scores_of({"all": (0.5, 0.6)})
    assert ev.gate_reasons(passing, CLEAN, s, general((0.9, 0.895), (0.5, 0.7))) == []  # a small loss, a gain
    (lost,) = ev.gate_reasons(passing, CLEAN, s, general((0.9, 0.95), (0.9, 0.85)))
    assert lost.startswith("general set set1 (g/set1.csv) regressed: ndcg@10 0.9000 -> 0.8500 (Δ=-0.0500)")
    assert "MAX_GENERAL_DROP=0.01" in lost
    assert ev.gate_reasons(passing, CLEAN, gate_settings(MAX_GENERAL_DROP=0.1), general((0.9, 0.85))) == []
    assert (
        ev.gate_reasons(passing, CLEAN, s, {"checked": False, "note": "GENERAL_TEST_PATH is empty", "sets": []}) == []
    )


def test_contamination_counts_exact_normalised_and_shared_answers(ev):
    train = pd.DataFrame({"Question": ["How do I reset my password?", "Wie buche ich einen Raum?"],
                          "Answer": ["Use the portal.", "Im Kalender."]})  # fmt: skip
    test = pd.DataFrame(
        {
            "Question": ["How do I reset my password?", "how do I  reset my password", "Who pays?", "Other?"],
            "Answer": ["A.", "B.", "use the portal", "C."],
        }
    )
    counts = ev.contamination_counts(test, train)
    assert counts == {
        "test_rows": 4,
        "exact_duplicate_questions": 1,
        "normalised_duplicate_questions": 2,
        "shared_answers": 1,
        "leaked_rows": 3,
        "leaked_fraction": 0.75,
    }


def test_contamination_counts_a_translation_by_its_shared_group_id(ev, tmp_path):
    train = pd.DataFrame({"Question": ["How old is the bridge?"], "Answer": ["Built in 1890."], "id": ["q1"]})
    test = pd.DataFrame(
        {
            "Question": ["Wie alt ist die Brücke?", "Who built it?"],
            "Answer": ["Erbaut 1890.", "Eiffel."],
            "id": ["q1", ""],
        }
    )
    assert ev.contamination_counts(test, train)["leaked_rows"] == 0  # other words: invisible without the id
    counts = ev.contamination_counts(test, train, "id")
    assert counts["shared_group_ids"] == 1 and counts["leaked_rows"] == 1 and counts["group_column"] == "id"

    manifest = tmp_path / "split_manifest.json"
    manifest.write_text(json.dumps({"settings": {"GROUP_COLUMN": "id"}}), encoding="utf-8")
    assert ev.split_group_column({"data": {"split_manifest": {"path": str(manifest)}}}) == "id"
    assert ev.split_group_column({"data": {"split_manifest": {"path": str(tmp_path / "gone.json")}}}) is None


# --- end to end, in-process ---


def test_gate_passes_for_an_honestly_trained_model_and_registers_it(work, models, tiny_model, run_eval):
    make_checkpoint(work, models["honest"], base=models["know_nothing"])
    code, out = run_eval(work)
    assert code == 0, out
    lines = [line for line in out.splitlines() if LINE.match(line)]
    assert len(lines) == 15 * 3  # every metric, overall + en + de
    assert {LINE.match(line).group(1) for line in lines} >= {"test_cosine_ndcg@10", "test_de_cosine_ndcg@10"}
    overall = ndcg_line(out)
    assert overall["fine-tuned"] > overall["base"] + 0.1
    assert re.search(r"^verdict: improved \(ndcg@10 Δ=\+\d\.\d{4}, 95% CI \[\+\d\.\d{4}, \+\d\.\d{4}\]", out, re.M)
    assert "gate: PASSED" in out
    bm25_beats = overall["bm25"] > overall["fine-tuned"]
    assert bm25_beats == (f"note: BM25 beats the fine-tuned model on ndcg@10 ({overall['bm25']:.4f}" in out)
    assert "contamination vs data/qa_training_set.csv: 0 exact-duplicate questions" in out

    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"] == report["gate"] | {"passed": True, "reasons": []}
    assert report["metrics"]["finetuned"]["ndcg@10"] == pytest.approx(overall["fine-tuned"], abs=5e-5)
    assert set(report["by_language"]) == {"en", "de"}
    assert set(report["by_language"]["de"]) == {"queries", "base", "finetuned", "bm25"}
    assert report["contamination"]["leaked_rows"] == 0
    assert report["bootstrap"]["verdict"] == "improved"
    per_query = report["per_query"]  # the bootstrap's per-query primary metric, with each query's language
    assert len(per_query) == report["queries"]
    assert {q["language"] for q in per_query.values()} == {"en", "de"}
    for system in ("base", "finetuned"):
        mean = sum(q[system] for q in per_query.values()) / len(per_query)
        assert mean == pytest.approx(report["metrics"][system]["ndcg@10"], abs=1e-9)
    assert (work / "output" / "eval_report.png").read_bytes().startswith(b"\x89PNG")
    assert "gate: **PASSED**" in (work / "output" / "eval_report.md").read_text(encoding="utf-8")

    lineage = json.loads((work / "output" / "final" / "lineage.json").read_text(encoding="utf-8"))
    assert [e["gate"]["passed"] for e in lineage["evaluations"]] == [True]
    (entry,) = map(json.loads, (work / "output" / "registry.jsonl").read_text(encoding="utf-8").splitlines())
    assert entry["version"] == "v0001" and Path(entry["path"]) == Path("output/registry/v0001")
    assert entry["scores"]["finetuned"] == report["metrics"]["finetuned"]["ndcg@10"]
    assert entry["lineage"]["base_model"] == str(models["know_nothing"])
    assert (work / "output" / "registry" / "v0001" / "model.safetensors").is_file()


def test_registry_is_append_only_and_never_rewrites_an_earlier_line(work, models, tiny_model, run_eval):
    registry = work / "output" / "registry.jsonl"
    make_checkpoint(work, models["honest"], base=models["know_nothing"])
    code, out = run_eval(work)
    assert code == 0, out
    first = registry.read_bytes()
    v1_weights = (work / "output" / "registry" / "v0001" / "model.safetensors").read_bytes()

    make_checkpoint(work, models["bow"], base=models["know_nothing"])  # a second, different model that passes
    code, out = run_eval(work)
    assert code == 0, out
    assert registry.read_bytes().startswith(first)
    assert [json.loads(line)["version"] for line in registry.read_text(encoding="utf-8").splitlines()] == [
        "v0001",
        "v0002",
    ]
    assert (work / "output" / "registry" / "v0001" / "model.safetensors").read_bytes() == v1_weights
    assert "reports: replacing the previous evaluation's reports" in out

    second = registry.read_bytes()
    code, out = run_eval(work)  # the same model again: no duplicate version
    assert code == 0 and "already registered as v0002" in out
    assert registry.read_bytes() == second


def test_leaking_the_test_split_into_training_inflates_scores_and_fails_the_gate(work, models, tiny_model, run_eval):
    splits = split_frames()
    make_checkpoint(work, models["honest"], base=models["know_nothing"])
    honest = ndcg_line(run_eval(work)[1])

    pd.concat([splits["train"], splits["test"]]).to_csv(work / "data" / "leaky_training_set.csv", index=False)
    make_checkpoint(work, models["leaky"], base=models["know_nothing"], train_csv="data/leaky_training_set.csv")
    code, out = run_eval(work)
    leaky = ndcg_line(out)
    assert leaky["fine-tuned"] > honest["fine-tuned"] + 0.1  # the leak inflates the score ...
    assert code == 1  # ... and the gate catches it
    assert "contamination vs data/leaky_training_set.csv: 16 exact-duplicate questions" in out
    assert "  - the test set leaked into training: 16 of 16 test rows (100.0%)" in out
    assert "no gain" not in out  # blocked for the leak alone: the score itself looks great
    assert len((work / "output" / "registry.jsonl").read_text(encoding="utf-8").splitlines()) == 1  # honest only


def test_training_file_changed_since_training_is_said_clearly(work, models, tiny_model, run_eval):
    make_checkpoint(work, models["honest"], base=models["know_nothing"])
    with open(work / "data" / "qa_training_set.csv", "a", encoding="utf-8") as f:
        f.write("An extra question?,An extra answer.,en\n")
    code, out = run_eval(work)
    assert "warning: data/qa_training_set.csv changed since this model was trained" in out
    assert code == 0


def test_gate_blocks_on_no_gain(work, tiny_model, run_eval):
    make_checkpoint(work, tiny_model, base=tiny_model)
    code, out = run_eval(work)
    assert code == 1
    assert "  - no gain: ndcg@10 Δ=+0.0000 over the base model, MIN_IMPROVEMENT=0.01" in out
    assert "verdict: no significant change (ndcg@10 Δ=+0.0000, 95% CI [+0.0000, +0.0000]" in out
    assert not (work / "output" / "registry.jsonl").exists()
    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"]["passed"] is False and report["registry"] is None


def test_scoring_with_other_prompts_than_training_is_warned(work, tiny_model, run_eval):
    final = make_checkpoint(work, tiny_model, base=tiny_model)
    lineage = json.loads((final / "lineage.json").read_text(encoding="utf-8"))
    lineage["settings"] = {"QUERY_PROMPT": "query: ", "PASSAGE_PROMPT": ""}
    (final / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
    _, out = run_eval(work)
    assert "warning: the model was trained with QUERY_PROMPT='query: ' but is scored with ''" in out
    assert "PASSAGE_PROMPT=" not in out.split("warning:", 1)[1].splitlines()[0]


def test_gate_blocks_on_one_languages_regression(work, models, run_eval):
    # Better overall and in English, broken in German. No lineage (a model from elsewhere): the contamination
    # check is skipped with a warning, and the base model is MODEL_NAME.
    make_checkpoint(work, models["bow_broken_german"], base=models["bow_broken_english"], train_csv=None)
    code, out = run_eval(work, MODEL_NAME=models["bow_broken_english"])
    assert code == 1
    assert "warning: no lineage.json in output/final: contamination check skipped" in out
    overall, en, de = ndcg_line(out), ndcg_line(out, "test_en"), ndcg_line(out, "test_de")
    assert overall["fine-tuned"] > overall["base"] + 0.01
    assert en["fine-tuned"] > en["base"] and de["fine-tuned"] < de["base"] - 0.01
    reasons = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(reasons) == 1 and reasons[0].startswith("  - language de regressed: ndcg@10")


def test_recipe_settings_test_corpus_per_row_ids_and_no_language_column(work, models, run_eval):
    test = work / "data" / "qa_test_set.csv"
    pd.read_csv(test).drop(columns="language").to_csv(test, index=False)
    make_checkpoint(work, models["bow"], base=models["know_nothing"])
    code, out = run_eval(work, CORPUS_SCOPE="test", GROUP_IDENTICAL_ANSWERS="false")
    assert "test: 16 rows, 16 queries; corpus (test): 16 documents" in out
    assert "per language: the test split has no 'language' column, so overall metrics only" in out
    assert not [line for line in out.splitlines() if line.startswith(("test_en_", "test_de_"))]
    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["by_language"] == {} and report["corpus"] == {"scope": "test", "documents": 16, "grouped": False}
    assert code == 0, out
    # Each answer has 4 identical copies, which the model ranks side by side; per row only the question's own copy
    # counts, so the same model and rankings score lower than with grouped ids.
    _, grouped = run_eval(work, CORPUS_SCOPE="test", GROUP_IDENTICAL_ANSWERS="true")
    assert "corpus (test): 4 documents" in grouped
    assert ndcg_line(out)["fine-tuned"] < ndcg_line(grouped)["fine-tuned"] - 0.1


def test_general_set_is_scored_on_its_own_answers_and_recorded_everywhere(work, models, run_eval):
    write_general_set(work / "general" / "geo_facts.csv")
    make_checkpoint(work, models["bow"], base=models["know_nothing"])
    code, out = run_eval(work, GENERAL_TEST_PATH="general/geo_facts.csv")
    assert code == 0, out
    header = "general[geo_facts]: general/geo_facts.csv, 8 rows, 8 queries; corpus (its own answers): 8 documents"
    assert f"{header}; per 'Language'" in out.splitlines()
    lines = [line for line in out.splitlines() if GENERAL_LINE.match(line)]
    assert len(lines) == 15 * 3  # every metric, overall + en + de (the "Language" column, found case-insensitively)
    assert len([line for line in out.splitlines() if LINE.match(line)]) == 15 * 3  # the test block is unchanged
    assert "general: not checked" not in out
    # The know-nothing base ranks the corpus in order: query i's answer is document i only if the corpus is the set's
    # own 8 answers, one document each, so its NDCG@10 is known by hand, overall and for the English (even) rows.
    general, english = ndcg_line(out, "general[geo_facts]"), ndcg_line(out, "general[geo_facts]_en")
    assert general["base"] == round(np.mean([1 / np.log2(i + 2) for i in range(8)]), 4)
    assert english["base"] == round(np.mean([1 / np.log2(i + 2) for i in (0, 2, 4, 6)]), 4)
    assert general["fine-tuned"] > general["base"] + 0.1
    assert re.search(r"^general\[geo_facts\] verdict: improved \(ndcg@10 Δ=\+\d\.\d{4}, 95% CI", out, re.M)

    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"]["max_general_drop"] == 0.01 and report["general"]["checked"] is True
    (recorded,) = report["general"]["sets"]
    assert recorded["name"] == "geo_facts" and recorded["path"] == "general/geo_facts.csv"
    assert recorded["sha256"] == sha256(work / "general" / "geo_facts.csv")
    assert (recorded["queries"], recorded["documents"], recorded["language_column"]) == (8, 8, "Language")
    assert recorded["metrics"]["finetuned"]["ndcg@10"] == pytest.approx(general["fine-tuned"], abs=5e-5)
    assert set(recorded["by_language"]) == {"en", "de"} and recorded["by_language"]["en"]["queries"] == 4
    assert recorded["bootstrap"]["verdict"] == "improved" and recorded["bootstrap"]["queries"] == 8
    assert {kind: c["leaked_rows"] for kind, c in recorded["contamination"].items()} == {"test": 0, "training": 0}
    assert "## General set geo_facts (`general/geo_facts.csv`: 8 queries, 8 documents)" in (
        work / "output" / "eval_report.md"
    ).read_text(encoding="utf-8")
    lineage = json.loads((work / "output" / "final" / "lineage.json").read_text(encoding="utf-8"))
    assert lineage["evaluations"][-1]["general"] == report["general"]
    (entry,) = map(json.loads, (work / "output" / "registry.jsonl").read_text(encoding="utf-8").splitlines())
    assert entry["general"]["checked"] is True
    assert entry["general"]["sets"][0] | {"bootstrap": None} == {
        "name": "geo_facts", "path": "general/geo_facts.csv", "sha256": recorded["sha256"], "bootstrap": None,
        "base": recorded["metrics"]["base"]["ndcg@10"], "finetuned": recorded["metrics"]["finetuned"]["ndcg@10"],
    }  # fmt: skip


def test_without_a_general_set_eval_says_general_ability_was_not_checked(work, models, run_eval):
    make_checkpoint(work, models["bow"], base=models["know_nothing"])
    code, out = run_eval(work)
    assert code == 0, out
    (line,) = [line for line in out.splitlines() if line.startswith("general")]
    assert line.startswith("general: not checked (GENERAL_TEST_PATH is empty): a loss outside this domain")
    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["general"] == {"checked": False, "note": "GENERAL_TEST_PATH is empty", "sets": []}
    markdown = (work / "output" / "eval_report.md").read_text(encoding="utf-8")
    assert "General ability was not checked (GENERAL_TEST_PATH is empty)." in markdown
    (entry,) = map(json.loads, (work / "output" / "registry.jsonl").read_text(encoding="utf-8").splitlines())
    assert entry["general"] == {"checked": False, "note": "GENERAL_TEST_PATH is empty", "sets": []}


def test_a_model_that_loses_on_a_general_set_is_blocked_naming_the_set(work, traded, run_eval):
    # The "fine-tuned" model knows the helpdesk and has forgotten general facts; its base is the other way round.
    write_general_set(work / "general" / "geo_facts.csv")
    make_checkpoint(work, traded["finetuned"], base=traded["base"])
    code, out = run_eval(work, GENERAL_TEST_PATH="general/geo_facts.csv")
    test, general = ndcg_line(out), ndcg_line(out, "general[geo_facts]")
    assert test["fine-tuned"] > test["base"] + 0.1  # a real in-domain gain ...
    assert general["fine-tuned"] < general["base"] - 0.1  # ... bought with a real loss on the general set
    assert code == 1
    reasons = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(reasons) == 1, out  # the general set alone blocks it
    assert reasons[0].startswith(
        f"  - general set geo_facts (general/geo_facts.csv) regressed: ndcg@10 {general['base']:.4f} -> "
        f"{general['fine-tuned']:.4f}"
    )
    report = json.loads((work / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"]["passed"] is False and report["gate"]["reasons"] == [reasons[0][4:]]
    assert not (work / "output" / "registry.jsonl").exists()
    # The same model without the general set passes: the in-domain rules alone cannot see the loss.
    code, out = run_eval(work, GENERAL_TEST_PATH="")
    assert code == 0 and "gate: PASSED" in out and "general: not checked" in out


def test_lora_adapter_checkpoint_loads_on_its_base(work, tiny_model, tmp_path_factory, run_eval):
    import torch
    from peft import LoraConfig, TaskType
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model))
    model.add_adapter(LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=4, target_modules=["query", "value"]))
    with torch.no_grad():  # a trained adapter is not a no-op: make this one change the embeddings
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.2)
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    model.save(str(adapter))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    make_checkpoint(work, adapter, base=tiny_model, lora=True)
    code, out = run_eval(work, MIN_IMPROVEMENT=-1, MAX_LANGUAGE_DROP=1)
    assert code == 0 and "checkpoint: output/final (LoRA adapter, loaded on its base)" in out
    lines = [line for line in out.splitlines() if LINE.match(line)]
    assert any("Δ=+0.0000" not in line for line in lines)  # the adapter's weights were applied


# --- bad input and faults ---


def test_missing_checkpoint_lists_the_ones_that_exist(ev, work, run_eval):
    for folder in ("final-20261122T041500Z", "checkpoints/checkpoint-1000", "checkpoints/checkpoint-500",
                   "registry/v0001"):  # fmt: skip
        (work / "output" / folder).mkdir(parents=True)
    with pytest.raises(ev.InputError) as error:
        run_eval(work)
    message = str(error.value)
    assert message.startswith("checkpoint output/final not found; existing checkpoints: ")
    listed = message.split("existing checkpoints: ")[1].split("; ")[0].split(", ")
    assert listed == ["output/final-20261122T041500Z", "output/checkpoints/checkpoint-500",
                      "output/checkpoints/checkpoint-1000", "output/registry/v0001"]  # fmt: skip
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_checkpoint_with_missing_or_corrupt_weights_is_a_one_line_error(ev, work, tiny_model, run_eval, damage):
    final = make_checkpoint(work, tiny_model, base=tiny_model)
    weights = final / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ev.InputError, match=r"^cannot load model 'output/final': .*set CHECKPOINT_PATH") as error:
        run_eval(work)
    assert "\n" not in str(error.value)


def test_output_dir_that_cannot_be_written_fails_before_scoring(ev, work, run_eval):
    (work / "not_a_dir").write_text("a file where OUTPUT_DIR should be", encoding="utf-8")
    with pytest.raises(ev.InputError, match=r"^cannot write to OUTPUT_DIR not_a_dir: .*set OUTPUT_DIR"):
        run_eval(work, OUTPUT_DIR="not_a_dir")


def test_disk_full_leaves_earlier_outputs_undamaged(ev, work, models, tiny_model, run_eval, monkeypatch):
    make_checkpoint(work, models["honest"], base=models["know_nothing"])
    code, out = run_eval(work)
    assert code == 0, out
    output = work / "output"
    kept = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev.os, "fsync", disk_full)
    with pytest.raises(ev.InputError, match="No space left on device"):
        run_eval(work)
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == kept  # no temp files either
    with pytest.raises(ev.InputError, match="No space left on device"):
        ev.write_atomic(output / "eval_report.json", "{}")
    assert (output / "eval_report.json").read_bytes() == kept[output / "eval_report.json"]

    # A new passing model without lineage: registration comes last, after the reports; the disk fills up just as its
    # line is appended, which must not be torn nor leave the copied version folder behind.
    make_checkpoint(work, models["bow"], base=models["know_nothing"], train_csv=None)

    def registry_disk_full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("registry.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev.os, "fsync", registry_disk_full)
    with pytest.raises(ev.InputError, match=r"^cannot append to output/registry.jsonl: No space left on device"):
        run_eval(work, MODEL_NAME=models["know_nothing"])
    assert json.loads((output / "eval_report.json").read_text(encoding="utf-8"))["registry"]["version"] == "v0002"
    unchanged = ("final", "eval_report.json", "eval_report.md", "eval_report.png")
    assert {
        path: path.read_bytes() for path in output.rglob("*") if path.is_file() and not set(unchanged) & set(path.parts)
    } == {
        path: content for path, content in kept.items() if not set(unchanged) & set(path.parts)
    }  # no v0002 folder, no partial line


@pytest.mark.parametrize("case", ["copy of the test split", "overlaps training", "overlaps test", "missing", "twice"])
def test_general_set_that_is_not_general_is_refused_before_any_model_is_loaded(
    ev, work, models, run_eval, monkeypatch, case
):
    splits = split_frames()
    general_rows = [dict(zip(["Question", "Answer", "language"], row, strict=True)) for row in GENERAL_ROWS]
    # The training data is the one in the lineage, not TRAIN_PATH: here it also holds two of the general set's rows.
    pd.concat([splits["train"], pd.DataFrame(general_rows[:2])]).to_csv(
        work / "data" / "lineage_train.csv", index=False
    )
    make_checkpoint(work, models["bow"], base=models["know_nothing"], train_csv="data/lineage_train.csv")
    monkeypatch.setattr(ev, "load_model", lambda *args: pytest.fail("a model was loaded before the check"))
    expected = {
        "copy of the test split": "general set general/copy.csv is a copy (same sha256) of the test split "
        "data/qa_test_set.csv; a general set holds questions from other domains",
        "overlaps training": "general set general/geo.csv overlaps the training data data/lineage_train.csv: 2 of 8 "
        "rows (25.0%) share a question or an answer (MAX_CONTAMINATION=1.0%); remove those rows",
        "overlaps test": "general set general/geo.csv overlaps the test split data/qa_test_set.csv: 1 of 7 rows "
        "(14.3%) share a question or an answer",
        "missing": "general/nope.csv not found; fix GENERAL_TEST_PATH (comma-separated CSV paths)",
        "twice": "GENERAL_TEST_PATH names two general sets called 'geo' (general/geo.csv, other/geo.csv)",
    }[case]
    paths = {"copy of the test split": "general/copy.csv", "missing": "general/geo.csv, general/nope.csv",
             "twice": "general/geo.csv,other/geo.csv"}.get(case, "general/geo.csv")  # fmt: skip
    rows = GENERAL_ROWS if case == "overlaps training" else GENERAL_ROWS[2:]  # without the two trained-on rows
    write_general_set(work / "general" / "geo.csv", rows)
    if case == "overlaps test":
        with open(work / "general" / "geo.csv", "a", encoding="utf-8") as f:
            f.write(f"{splits['test']['Question'].iloc[0]},{splits['test']['Answer'].iloc[0]},en\n")
    write_general_set(work / "other" / "geo.csv", GENERAL_ROWS[2:])
    shutil.copy(work / "data" / "qa_test_set.csv", work / "general" / "copy.csv")
    with pytest.raises(ev.InputError) as error:
        run_eval(work, GENERAL_TEST_PATH=paths)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_dir_is_a_one_line_error(ev, work, run_eval):
    (work / "output").mkdir()
    (work / "output").chmod(0o500)
    try:
        with pytest.raises(ev.InputError, match=r"^cannot write to OUTPUT_DIR output: Permission denied"):
            run_eval(work)
    finally:
        (work / "output").chmod(0o700)


# --- the script as a user runs it: exit codes ---


def test_exit_codes_0_pass_1_blocked_2_bad_input(work, models, tiny_model):
    env = {"QUERY_PROMPT": "", "PASSAGE_PROMPT": "", "BOOTSTRAP_RESAMPLES": "200"}
    make_checkpoint(work, models["honest"], base=models["know_nothing"])
    passed = run_script("eval.py", work, env)
    assert passed.returncode == 0, passed.stderr
    assert any(LINE.match(line) for line in passed.stdout.splitlines())

    make_checkpoint(work, tiny_model, base=tiny_model)
    blocked = run_script("eval.py", work, env)
    assert blocked.returncode == 1, blocked.stderr
    assert "gate: BLOCKED" in blocked.stdout

    (work / "data" / "qa_test_set.csv").unlink()
    bad = run_script("eval.py", work, env | {"MIN_IMPROVEMENT": "a lot"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: MIN_IMPROVEMENT='a lot' (from the environment) is not a finite number from -1 to 1 (the default is "
        "0.01); fix it in .env or the environment"
    )
    missing = run_script("eval.py", work, env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "error: data/qa_test_set.csv not found; run split_data.py first or set its path (TEST_PATH, ...) in .env"
    ]


@pytest.mark.parametrize("damage", ["missing column", "bad encoding", "the test split"])
def test_general_set_bad_input_is_one_error_line_and_exit_2(work, models, damage):
    make_checkpoint(work, models["bow"], base=models["know_nothing"])
    path = write_general_set(work / "general" / "geo.csv")
    if damage == "missing column":
        path.write_text(path.read_text(encoding="utf-8").replace("Question,", "Frage,", 1), encoding="utf-8")
    elif damage == "bad encoding":  # Excel's cp1252: "größte" is not UTF-8
        path.write_bytes(path.read_text(encoding="utf-8").encode("cp1252"))
    general_path = "data/../data/qa_test_set.csv" if damage == "the test split" else "general/geo.csv"
    env = {"QUERY_PROMPT": "", "PASSAGE_PROMPT": "", "BOOTSTRAP_RESAMPLES": "200", "GENERAL_TEST_PATH": general_path}
    result = run_script("eval.py", work, env)
    expected = {
        "missing column": r"error: general/geo\.csv has no Question column \(columns: \['Frage', 'Answer', "
        r"'Language'\]\); name the columns Question and Answer in the first line",
        "bad encoding": r"error: general/geo\.csv is not a readable UTF-8 CSV \('utf-8' codec can't decode byte 0xf6 "
        r"in position \d+: invalid start byte\); save it as UTF-8 \(Excel: CSV UTF-8\)",
        "the test split": r"error: general set data/\.\./data/qa_test_set\.csv is the same file as the test split "
        r"data/qa_test_set\.csv; a general set holds questions from other domains: set GENERAL_TEST_PATH to such a CSV",
    }[damage]
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert re.fullmatch(expected, line), line
    assert "_cosine_" not in result.stdout and "general[" not in result.stdout  # refused before any model scored
