"""How split_data.py's time and memory grow with the number of rows: 10k, 100k and 1M synthetic rows.

    python benchmarks/split_scale.py            # 10,000 100,000 1,000,000
    python benchmarks/split_scale.py 50000      # any sizes

Each size is written as a CSV to a temporary folder and split by a fresh `python split_data.py` process (imports
included, as a user runs it), with GROUP_COLUMN=id. Peak memory is the child's maximum resident set size, read
from the kernel when it exits (os.wait4), so no sampling can miss a spike. Linux starts a child's maximum at its
parent's size, so the data is generated in a separate process and this one never imports pandas: what is
measured is split_data.py's own peak. `measure(rows)` is importable.
"""

import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "password", "laptop", "printer", "vacation", "expense", "badge", "monitor", "contract", "invoice", "account",
    "network", "meeting", "room", "parking", "salary", "shift", "training", "license", "phone", "mailbox",
    "calendar", "travel", "budget", "onboarding", "keyboard",
]  # fmt: skip


def synthetic_frame(rows: int, seed: int = 0):
    """FAQ-like rows: English/German translation pairs share an id, and five questions share each answer."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    item = np.arange(rows) // 2  # a question and its translation
    language = np.where(np.arange(rows) % 2 == 0, "en", "de")
    topic = pd.Series(np.array(WORDS)[rng.integers(0, len(WORDS), rows)])
    other = pd.Series(np.array(WORDS)[rng.integers(0, len(WORDS), rows)])
    number = pd.Series(item).astype(str)
    answer = pd.Series(item // 5).astype(str)
    question = np.where(
        language == "en",
        "How do I handle the " + topic + " for " + other + " case " + number + "?",
        "Wie bearbeite ich " + topic + " für " + other + " Fall " + number + "?",
    )
    filler = " ".join(WORDS)[:150]
    answer_text = np.where(
        language == "en",
        "Answer " + answer + ": open the self-service portal, choose the form and follow the steps. " + filler,
        "Antwort " + answer + ": Öffne das Self-Service-Portal, wähle das Formular und folge den Schritten. " + filler,
    )
    return pd.DataFrame({"Question": question, "Answer": answer_text, "language": language, "id": "q" + number})


def write_synthetic_csv(rows: int, path: Path) -> None:
    synthetic_frame(rows).to_csv(path, index=False)


def measure(rows: int) -> dict:
    """Split `rows` synthetic rows with split_data.py in a child process: wall time and the child's peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data" / "qa_data.csv"
        data.parent.mkdir()
        writer = multiprocessing.get_context("spawn").Process(target=write_synthetic_csv, args=(rows, data))
        writer.start()
        writer.join()
        env = {**os.environ, "DATA_DIR": str(data.parent), "GROUP_COLUMN": "id"}
        with open(Path(folder) / "stdout.txt", "w+") as out:
            started = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, str(REPO / "split_data.py")], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
            )
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - started
            out.seek(0)
            output = out.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"split_data.py failed on {rows:,} rows:\n{output}")
        return {
            "rows": rows,
            "csv_mb": round(data.stat().st_size / 2**20, 1),
            "seconds": round(seconds, 2),
            "rows_per_second": round(rows / seconds),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux reports kilobytes
        }


def main() -> None:
    sizes = [int(arg) for arg in sys.argv[1:]] or [10_000, 100_000, 1_000_000]
    print(f"{'rows':>10} | {'CSV MB':>7} | {'seconds':>7} | {'rows/s':>9} | {'peak RSS MB':>11}")
    print(f"{'-' * 10}-|-{'-' * 7}-|-{'-' * 7}-|-{'-' * 9}-|-{'-' * 11}")
    for rows in sizes:
        r = measure(rows)
        print(
            f"{r['rows']:>10,} | {r['csv_mb']:>7} | {r['seconds']:>7} | {r['rows_per_second']:>9,} | "
            f"{r['peak_rss_mb']:>11,}"
        )


if __name__ == "__main__":
    main()
