"""A tiny BERT and tokenizer built from a config (no download), and a small labeled dataset."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import demo_data


def write_tiny_model(folder: Path, *, hidden: int = 32, layers: int = 2, max_positions: int = 128) -> Path:
    """A 2-layer BERT whose WordPiece vocabulary covers the demo tickets' words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, set_seed

    words = set()
    for r in demo_data.generate(rows=3000, seed=1):
        words.update(re.findall(r"[a-z0-9]+", r["text"].lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                  model_max_length=max_positions)
    set_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max_positions)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_decoder(folder: Path, *, eos: bool = True, hidden: int = 32, positions: int = 128,
                       tokenizer_limit: int | None = None, padding_side: str = "right") -> Path:
    """A 2-layer GPT-2 with a word-level tokenizer that, like GPT-2's own, has no padding token (and
    with `eos`, an end-of-sequence token). The tokenizer's own length limit is `tokenizer_limit` (default
    the model's `positions`); it pads on `padding_side` (some decoders' tokenizers say left)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast, set_seed

    words = set()
    for r in demo_data.generate(rows=3000, seed=1):
        words.update(re.findall(r"[a-z0-9]+", r["text"].lower()))
    vocab = ["<|endoftext|>", "<unk>", *sorted(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"} if eos else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=tokenizer_limit or positions,
                                        padding_side=padding_side, **special)
    folder.mkdir(parents=True, exist_ok=True)
    set_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=hidden, n_layer=2, n_head=2, n_positions=positions,
                         bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tickets(path: Path, rows: int = 240, seed: int = 7) -> Path:
    import csv

    seen: dict[str, str] = {}
    records = [r for r in demo_data.generate(rows=rows, seed=seed) if seen.setdefault(r["text"], r["label"]) == r["label"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["ticket_id", "text", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(records)
    return path


def write_ticket_pairs(tickets: Path, path: Path, header: tuple[str, str, str, str] = ("ticket_id", "text", "topic", "verdict"),
                       rows: int = 240) -> Path:
    """A sentence-pair dataset from the first `rows` tickets: (id, ticket text, a topic, match or mismatch); half
    the pairs name the ticket's own topic, half another one."""
    import csv

    with open(tickets, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))[:rows]
    topics = sorted({r["label"] for r in records})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, r in enumerate(records):
            topic = r["label"] if i % 2 == 0 else topics[(topics.index(r["label"]) + 1 + i % 3) % len(topics)]
            w.writerow([r["ticket_id"], r["text"], topic, "match" if i % 2 == 0 else "mismatch"])
    return path


def write_separable_tickets(path: Path, per_label: int = 60) -> Path:
    """Two labels whose texts share no word: a tiny model is perfect on them within an epoch or two, after which
    accuracy and F1 stay at 1 while the loss still falls (a plateau of the metric)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ticket_id", "text", "label"])
        for i in range(per_label):
            w.writerow([f"a{i}", f"refund charged invoice {'twice ' * (i % 5)}{i}", "billing"])
            w.writerow([f"b{i}", f"parcel delivery arrived {'late ' * (i % 5)}{i}", "shipping"])
    return path


def write_tiny_custom_code_model(folder: Path) -> Path:
    """The tiny BERT as an architecture shipped as Python code in its folder (config.json's auto_map), as some hub
    models are: transformers runs that code only with trust_remote_code. Its classes are BERT's, renamed."""
    import json

    write_tiny_model(folder)
    (folder / "configuration_tinycustom.py").write_text(
        "from transformers import BertConfig\n\n\n"
        "class TinyCustomConfig(BertConfig):\n    model_type = \"tiny-custom\"\n", encoding="utf-8")
    (folder / "modeling_tinycustom.py").write_text(
        "from transformers import BertForSequenceClassification, BertModel\n\n"
        "from .configuration_tinycustom import TinyCustomConfig\n\n\n"
        "class TinyCustomModel(BertModel):\n    config_class = TinyCustomConfig\n\n\n"
        "class TinyCustomForSequenceClassification(BertForSequenceClassification):\n"
        "    config_class = TinyCustomConfig\n", encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "tiny-custom"
    config["auto_map"] = {"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
                          "AutoModel": "modeling_tinycustom.TinyCustomModel",
                          "AutoModelForSequenceClassification": "modeling_tinycustom.TinyCustomForSequenceClassification"}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
