"""How many test rows leak into training: split_data.py against a plain random 80/10/10 split, on XQuAD.

    python benchmarks/leakage.py                      # both XQuAD CSVs from ../shared/data/xquad/
    python benchmarks/leakage.py path/to/other.csv    # any CSV with Question, Answer and id columns

A test row leaks when its `id` (a question and its translation share it) or its answer text also appears in the
training split. split_data.py runs as a user runs it, with GROUP_COLUMN=id and the default SEED; the plain split
is scikit-learn's train_test_split with the same seed (80/20, then the 20 halved into validation and test).
`leaks(path)` is importable.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parents[1]
XQUAD = REPO.parent / "shared" / "data" / "xquad"
SEED = 42


def leaking_rows(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """Test rows whose id, answer, or either also appears in training."""
    by_id, by_answer = test["id"].isin(set(train["id"])), test["Answer"].isin(set(train["Answer"]))
    return {
        "test_rows": len(test),
        "by_id": int(by_id.sum()),
        "by_answer": int(by_answer.sum()),
        "by_id_or_answer": int((by_id | by_answer).sum()),
    }


def leaks(path: Path) -> dict:
    """Leaking test rows of split_data.py (GROUP_COLUMN=id) and of a plain random split of the same file."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "DATA_PATH": str(path), "DATA_DIR": folder, "GROUP_COLUMN": "id", "SEED": str(SEED)}
        subprocess.run(
            [sys.executable, str(REPO / "split_data.py")], cwd=folder, env=env, check=True, capture_output=True
        )
        train, test = (
            pd.read_csv(Path(folder) / name, dtype=str, keep_default_na=False)
            for name in ("qa_training_set.csv", "qa_test_set.csv")
        )
        grouped = leaking_rows(train, test)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    train, rest = train_test_split(frame, test_size=0.2, random_state=SEED)
    _, test = train_test_split(rest, test_size=0.5, random_state=SEED)
    return {"split_data.py": grouped, "random": leaking_rows(train, test)}


def main() -> None:
    paths = [Path(arg) for arg in sys.argv[1:]] or [
        XQUAD / "xquad_en_de_paragraph.csv",
        XQUAD / "xquad_en_de_sentence.csv",
    ]
    print(f"{'file':<28} | {'split':<13} | {'test rows':>9} | {'leak by id':>10} | {'by answer':>9} | {'either':>6}")
    print(f"{'-' * 28}-|-{'-' * 13}-|-{'-' * 9}-|-{'-' * 10}-|-{'-' * 9}-|-{'-' * 6}")
    for path in paths:
        for split, r in leaks(path).items():
            print(
                f"{path.name:<28} | {split:<13} | {r['test_rows']:>9} | {r['by_id']:>10} | {r['by_answer']:>9} | "
                f"{r['by_id_or_answer']:>6}"
            )


if __name__ == "__main__":
    main()
