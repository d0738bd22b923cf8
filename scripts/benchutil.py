"""What more than one benchmark script needs."""

from __future__ import annotations

from pathlib import Path


def packaged_classifier(dest: Path, labels: tuple[str, ...] = ("billing", "shipping")) -> Path:
    """The packaged all-MiniLM-L6-v2 under a fresh classification head, saved as a classifier folder at `dest`:
    what `predict` loads (it refuses a base model without a head). The head is untrained; speed is what is measured."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.basemodel import resolve_base_model

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report
    hf_logging.disable_progress_bar()
    base = resolve_base_model("minilm").path
    AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    ).save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest
