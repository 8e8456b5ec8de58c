"""The three scripts in order, as a user runs them: split_data.py -> train.py -> eval.py, settings from .env."""

import json
import re

import pandas as pd
from conftest import run_script

# The recipe's line, with BM25 appended as a third score.
METRIC_LINE = re.compile(
    r"^test_cosine_ndcg@10: base=\d\.\d{4} \| fine-tuned=\d\.\d{4} \| Δ=[+-]\d\.\d{4} \| bm25=\d\.\d{4}$"
)


def test_split_train_eval_in_order_with_settings_from_dotenv(small_qa_csv, tiny_model):
    workdir = small_qa_csv.parent.parent
    (workdir / ".env").write_text(
        f"MODEL_NAME={tiny_model}\nQUERY_PROMPT=\nPASSAGE_PROMPT=\nBATCH_SIZE=4\nNUM_TRAIN_EPOCHS=1\n"
        # 4 validation rows: whether a random 2-layer model beats itself there is a coin toss, not the point here
        "REQUIRE_VALIDATION_GAIN=false\n"
        "BOOTSTRAP_RESAMPLES=100\n",
        encoding="utf-8",
    )

    split = run_script("split_data.py", workdir)
    assert split.returncode == 0, split.stderr
    assert "train: 40 rows" in split.stdout and "test: 4 rows" in split.stdout
    manifest = json.loads((workdir / "data" / "split_manifest.json").read_text(encoding="utf-8"))

    train = run_script("train.py", workdir)
    assert train.returncode == 0, train.stderr
    assert "  BATCH_SIZE = 4" in train.stdout  # from .env, printed with the settings in effect
    assert "No CUDA GPU found: training in fp32 on the CPU (fp16 needs CUDA)." in train.stdout
    assert "final model saved to output/final" in train.stdout
    lineage = json.loads((workdir / "output" / "final" / "lineage.json").read_text(encoding="utf-8"))
    assert lineage["base_model"]["name"] == str(tiny_model)
    assert lineage["data"]["train"]["sha256"] == manifest["outputs"]["train"]["sha256"]
    assert lineage["data"]["test_sha256"] == manifest["outputs"]["test"]["sha256"]
    assert lineage["precision"] == "fp32" and lineage["device"] == "cpu"

    evaluation = run_script("eval.py", workdir)
    assert evaluation.returncode in (0, 1), evaluation.stderr  # 1 = the gate blocked this random tiny model
    lines = evaluation.stdout.splitlines()
    assert any(METRIC_LINE.match(line) for line in lines), evaluation.stdout
    assert "contamination vs data/qa_training_set.csv: 0 exact-duplicate questions" in evaluation.stdout
    # Registration is the last step, after the reports: a model that passed ends with its registry line.
    assert lines[-1].startswith("registry: registered v0001" if evaluation.returncode == 0 else "reports: ")
    report = json.loads((workdir / "output" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"]["passed"] is (evaluation.returncode == 0)
    assert set(report["by_language"]) == {"en", "de"} & set(pd.read_csv(workdir / "data" / "qa_test_set.csv").language)
    assert json.loads((workdir / "output" / "final" / "lineage.json").read_text(encoding="utf-8"))["evaluations"]
