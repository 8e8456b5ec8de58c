"""Shared test fixtures: a tiny offline embedding model, a small Q/A CSV, and a script runner.

Nothing here downloads anything: the model is a 2-layer random BERT whose WordPiece vocabulary is
trained on the test text itself, wrapped as a SentenceTransformer and saved to a temporary folder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

TOPICS = [
    ("How do I reset my password?", "Open the self-service portal and choose 'Forgot password'.", "en"),
    ("How can I book a meeting room?", "Meeting rooms are booked in the calendar under 'Rooms'.", "en"),
    ("Where do I report a broken laptop?", "Open an IT ticket in the helpdesk portal with the asset tag.", "en"),
    ("How many vacation days do I get?", "Full-time employees get 30 vacation days per calendar year.", "en"),
    ("How do I connect to the VPN?", "Install the VPN client from the software center and sign in.", "en"),
    ("Who approves my travel expenses?", "Your team lead approves travel expenses in the expense tool.", "en"),
    ("Wie setze ich mein Passwort zurück?", "Öffne das Self-Service-Portal und wähle 'Passwort vergessen'.", "de"),
    ("Wie buche ich einen Besprechungsraum?", "Besprechungsräume bucht man im Kalender unter 'Räume'.", "de"),
    ("Wo melde ich einen defekten Laptop?", "Erstelle ein IT-Ticket im Helpdesk-Portal mit der Inventarnummer.", "de"),
    ("Wie viele Urlaubstage habe ich?", "Vollzeitkräfte haben 30 Urlaubstage pro Kalenderjahr.", "de"),
    ("Wie verbinde ich mich mit dem VPN?", "Installiere den VPN-Client aus dem Softwarecenter, melde dich an.", "de"),
    ("Wer genehmigt meine Reisekosten?", "Deine Teamleitung genehmigt Reisekosten im Spesen-Tool.", "de"),
]
PARAPHRASES = {
    "en": ["{q}", "Quick question: {q}", "{q} Thanks!", "Can you tell me: {q}"],
    "de": ["{q}", "Kurze Frage: {q}", "{q} Danke!", "Kannst du mir sagen: {q}"],
}


def small_qa_frame(copies: int = 4) -> pd.DataFrame:
    """48 rows by default: 12 answers (6 English, 6 German), each asked in `copies` paraphrases."""
    rows = []
    for number in range(copies):
        for question, answer, language in TOPICS:
            template = PARAPHRASES[language][number % len(PARAPHRASES[language])]
            suffix = f" ({number // len(PARAPHRASES[language])})" if number >= len(PARAPHRASES[language]) else ""
            rows.append({"Question": template.format(q=question) + suffix, "Answer": answer, "language": language})
    return pd.DataFrame(rows)


@pytest.fixture
def small_qa_csv(tmp_path: Path) -> Path:
    """`data/qa_data.csv` inside a fresh working directory, as a user would have it."""
    path = tmp_path / "data" / "qa_data.csv"
    path.parent.mkdir()
    small_qa_frame().to_csv(path, index=False)
    return path


# A general set from other domains (geography, history, astronomy), English and German; the scripts find its columns
# case-insensitively.
GENERAL_ROWS = [
    ("What is the capital of France?", "Paris is the capital of France and its largest city.", "en"),
    ("Wie lang ist der Rhein?", "Der Rhein ist etwa 1.230 Kilometer lang.", "de"),
    ("How tall is Mount Everest?", "Mount Everest is 8,849 metres tall, the highest mountain on Earth.", "en"),
    ("Wann wurde Goethe geboren?", "Goethe wurde am 28. August 1749 in Frankfurt geboren.", "de"),
    ("When did the Berlin Wall fall?", "The Berlin Wall fell on 9 November 1989.", "en"),
    ("Was ist die Hauptstadt von Italien?", "Rom ist die Hauptstadt von Italien.", "de"),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun.", "en"),
    ("Welcher Planet ist der größte?", "Jupiter ist der größte Planet im Sonnensystem.", "de"),
]


def write_general_set(path: Path, rows=GENERAL_ROWS, columns=("Question", "Answer", "Language")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def build_tiny_model(folder: Path, texts: list[str]) -> Path:
    """Save a SentenceTransformer made of a fresh WordPiece tokenizer and a random 2-layer BERT."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    hf_folder = folder / "hf"
    hf_folder.mkdir(parents=True)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=128).save_pretrained(hf_folder)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_folder)
    transformer = Transformer(str(hf_folder), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")])
    model.save(str(folder / "model"))
    return folder / "model"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = small_qa_frame()
    texts = list(frame["Question"]) + list(frame["Answer"]) + ["query: passage:"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts)


def run_script(script: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """Run one of the project's scripts as a user would, in `cwd`, with extra environment variables."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    full_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / script)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
