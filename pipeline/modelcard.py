"""The model card (``README.md`` in Hugging Face's format) that ships inside each model version.

Its text is a pure function of what made the model (data version, base model, settings,
metrics), never of the run or the clock, so retraining bit-identical weights reproduces the
card byte for byte and the registry keeps one version.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


def render(*, model_name: str, base: dict[str, Any], dataset_ref: str, dataset_digest: str, label_names: list[str],
           num_rows: dict[str, int], train: dict[str, Any], max_length: int, metrics: dict[str, Any],
           best_metric: str, text_pair: bool = False, truncated: dict[str, int] | None = None,
           remote_code: bool = False) -> str:
    best = metrics.get("best", {})
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        # A hub id only: the Hub rejects a card whose base_model is not a model id (a local folder's path, a
        # registry version), as transformers' own cards leave it out for local folders. The text below names it.
        **({"base_model": base["id"]} if base.get("source") not in ("local", "registry") else {}),
        "tags": ["text-classification", "wandb-finetune-pipeline"],
        "model-index": [{
            "name": model_name,
            "results": [{
                "task": {"type": "text-classification", "name": "Text Classification"},
                "dataset": {"type": dataset_ref.split(":")[0], "name": dataset_ref, "split": "validation"},
                "metrics": [
                    {"type": k, "value": round(float(best[k]), 6), "name": f"validation {k}"}
                    for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall") if k in best
                ],
            }],
        }],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {model_name}",
        "",
        f"A {len(label_names)}-class text classifier fine-tuned from {_code(base['id'])} on the dataset "
        f"version `{dataset_ref}` by the `finetune` stage of wandb-finetune-pipeline.",
        "",
        "## Intended use",
        "",
        f"Single-label classification of short texts like those in `{dataset_ref}` into: "
        + ", ".join(_code(n) for n in label_names) + ". "
        "Every input gets one of these labels, so inputs unlike the training data still get a (possibly confident) "
        "label: check the evaluation report and calibration before relying on the confidences, and keep a human in "
        "the loop for decisions that matter.",
        "",
        "## Training data",
        "",
        f"- Dataset version: `{dataset_ref}` (digest `{dataset_digest}`)",
        "- Rows: " + ", ".join(f"{split} {n}" for split, n in sorted(num_rows.items(), key=lambda kv: _split_rank(kv[0]))),
        "- Labels (id order): " + ", ".join(f"{i}={n}" for i, n in enumerate(label_names)),
        "",
        "## Training procedure",
        "",
        f"- Base model: {_code(base['id'])} ({base['source']}, digest `{base['digest']}`)",
        f"- Max sequence length: {max_length} tokens",
        # only when texts were cut, so the card of a model whose texts all fit is what it always was
        *(["- Texts longer than that, cut to it: " + ", ".join(f"{split} {n} of {num_rows.get(split, '?')}"
                                                              for split, n in truncated.items())]
          if truncated and any(truncated.values()) else []),
        *(f"- {k}: {_number(v)}" for k, v in train.items() if v is not None),
        f"- Model kept: the checkpoint with the best validation `{best_metric}`",
        "",
        "## Validation metrics",
        "",
        "| metric | best checkpoint | final |",
        "|---|---|---|",
    ]
    final = metrics.get("final", {})
    for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss"):
        if k in best or k in final:
            fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
            lines.append(f"| {k} | {fmt(best.get(k))} | {fmt(final.get(k))} |")
    lines += [
        "",
        "Test-split metrics come from the `evaluate` stage and are recorded on this version when it runs.",
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        *(["# its architecture is the Python code in this folder: read it before trusting it",
           'classify = pipeline("text-classification", model="path/to/this/folder", trust_remote_code=True)']
          if remote_code else ['classify = pipeline("text-classification", model="path/to/this/folder")']),
        *(['classify({"text": "my order never arrived", "text_pair": "shipping"})  # a sentence-pair model']
          if text_pair else ['classify("my order never arrived")']),
        "```",
        "",
    ]
    return "\n".join(lines)


def _code(text: str) -> str:
    """`text` as a Markdown code span that stays one, whatever it holds (CommonMark): fenced by more backticks than
    its longest run of them, with a space inside where it starts or ends with one, and its line breaks as spaces
    (a label or a folder's name is shown, not parsed)."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _split_rank(split: str) -> tuple[int, str]:
    """train, validation, test first, in that order; any other split after them, by name."""
    order = ("train", "validation", "test")
    return (order.index(split), "") if split in order else (len(order), split)


def _number(value: object) -> object:
    """A whole float as the integer it is (``epochs: 3``, as the config was written), anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
