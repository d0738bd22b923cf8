"""Use a model version: load a fetched or deployed folder and classify text.

    from pipeline.predict import load
    classifier = load("deploy/intent-classifier")
    classifier.predict(["my parcel never arrived"])   # [[("shipping", 0.97), ...]]

The evaluate stage scores test splits with the same class, so what is measured is what runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import OutOfMemory, PipelineError, near_name, out_of_memory


@dataclass
class Prediction:
    label: Any  # a label name (text); an int, float or bool where the training data's source had such labels
    confidence: float
    top: list[tuple[Any, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": self.confidence, "top": [{"label": n, "score": p} for n, p in self.top]}


class Classifier:
    def __init__(self, model_dir: str | Path, max_length: int | None = None, device: str | None = None,
                 trust_remote_code: bool = False):
        """`trust_remote_code`: run an architecture shipped as Python code in the folder (a model fine-tuned
        with ``model.trust_remote_code: true`` carries its base's code); off, such a folder is refused."""
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():  # said before torch and transformers load (seconds)
            why = "no config.json" if self.dir.exists() else f"it does not exist{near_name(self.dir)}"  # a typo, maybe
            since = _compared_with_manifest(self.dir)  # a deployed folder whose config.json went: how to restore it
            raise PipelineError(f"{self.dir} is not a model folder ({why}){since or '; fetch one with deploy-fetch'}")
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from safetensors import SafetensorError

        from pipeline.basemodel import (REMOTE_CODE_HINT, is_classifier, is_custom_code_error, match_padding,
                                        max_positions, missing_vocabulary, missing_weights, separate_pairs,
                                        set_padding, too_many_tokens)
        from pipeline.cpus import torch_threads_within_quota

        torch_threads_within_quota()  # called from Python, where no command line set OMP_NUM_THREADS from a CPU limit
        trust = {"trust_remote_code": trust_remote_code}  # never a prompt; their code only when trusted
        try:
            config = AutoConfig.from_pretrained(self.dir, **trust)
            if not is_classifier(config):  # its head would be made up on the spot: random predictions
                raise PipelineError(
                    f"{self.dir} is not a trained classifier (its config.json says {config.architectures or 'no architecture'}, "
                    "not a ...ForSequenceClassification), so it has no head to predict labels with; give a folder "
                    "from deploy-fetch, or fine-tune this model first (model.base)")
            if config.problem_type in ("multi_label_classification", "regression") or config.num_labels < 2:
                raise PipelineError(
                    f"{self.dir} is a {'regression' if config.num_labels < 2 or config.problem_type == 'regression' else 'multi-label'} "
                    "model; predict gives one label per text, from a single-label classifier (as finetune makes)")
            self.tokenizer = AutoTokenizer.from_pretrained(self.dir, **trust)
            if (missing := missing_vocabulary(self.tokenizer)) is not None:  # every word would read as unknown
                raise PipelineError(f"{self.dir}: {missing}" + _compared_with_manifest(self.dir))
            self.model, loaded = AutoModelForSequenceClassification.from_pretrained(self.dir, output_loading_info=True,
                                                                                    **trust)
            if loaded["missing_keys"]:  # transformers fills them with random values, and says so only in a warning
                raise PipelineError(
                    f"{self.dir}: {missing_weights(loaded['missing_keys'], loaded['unexpected_keys'], len(self.model.state_dict()))}; "
                    "without them its predictions would be random" + _compared_with_manifest(self.dir))
            try:
                rows = getattr(self.model.get_input_embeddings(), "num_embeddings", None)
            except (NotImplementedError, AttributeError):  # an architecture (its own code, say) that does not say
                rows = None
            if (wrong := too_many_tokens(self.tokenizer, rows)) is not None:
                raise PipelineError(f"{self.dir}: {wrong}" + _compared_with_manifest(self.dir))
        except ValueError as e:
            if is_custom_code_error(e) and not trust_remote_code:
                raise PipelineError(f"{self.dir}: its architecture is Python code shipped in the folder (transformers' "
                                    f"trust_remote_code); {REMOTE_CODE_HINT}") from None
            raise self._not_loading(e) from e
        except (OSError, RuntimeError, SafetensorError, ImportError) as e:  # missing, truncated or damaged files
            raise self._not_loading(e) from e
        set_padding(self.tokenizer)  # as finetune pads (a hub decoder classifier may have no padding token)
        if self.tokenizer.pad_token is None:
            raise PipelineError(f"{self.dir}: its tokenizer has no padding token and no end-of-sequence token to pad "
                                "with, so texts of different lengths cannot be batched")
        match_padding(self.model, self.tokenizer)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.label_names = [cfg.id2label[i] for i in range(cfg.num_labels)]
        # the labels as predictions give them: as the training data's source had them (0 and 1 where its label
        # column held numbers, so they join that table), else the names
        self.labels = self._typed_labels() or list(self.label_names)
        self.truncated = 0  # texts classified so far that were longer than max_length (their beginning was)
        training = self._training_config()
        try:
            self.max_length = max_length or int(training["model"]["max_length"])
        except (KeyError, TypeError, ValueError):
            self.max_length = min(512, max_positions(self.dir) or 512)  # a folder finetune did not make
        # Sentence-pair models record their inputs (finetune writes them); single-text ones never had the key.
        self.takes_pairs = training.get("inputs") == ["text", "text_pair"]
        if self.takes_pairs and training.get("pair_separator"):
            # trained with a token between a pair's texts: its saved tokenizer puts it there, and this keeps it
            # so should a tokenizer class rebuild its template on loading
            separate_pairs(self.tokenizer)

    def _not_loading(self, error: BaseException) -> PipelineError:
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        if "ignore_mismatched_sizes" in reason:  # transformers names a setting of its own, not what is wrong
            return PipelineError(f"{self.dir}: the model does not load: the shapes of its weights do not match its "
                                 "config.json (transformers' load report above names them): the config and the "
                                 "weights are of different models, or one was edited" + _compared_with_manifest(self.dir))
        return PipelineError(f"{self.dir}: the model does not load ({type(error).__name__}: {reason})"
                             + _compared_with_manifest(self.dir))

    def _typed_labels(self) -> list[Any] | None:
        """The label names as ints, floats or booleans, when ``labels.json`` (finetune writes it) says the training
        data's source had them so, and names these labels."""
        from pipeline.data import typed_labels

        try:
            recorded = json.loads((self.dir / "labels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(recorded, dict) or recorded.get("label_names") != self.label_names:
            return None
        return typed_labels(self.label_names, recorded.get("label_type"))

    def _training_config(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / "training_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def logits(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, batch_size: int = 64,
               sort_by_length: bool = True) -> np.ndarray:
        """One row of logits per text, in input order.

        Texts are batched in order of length (characters), so each batch pads to a similar length
        instead of to the longest text of a random mix; the rows are put back in input order.
        """
        import torch

        texts, text_pairs = _as_texts(texts, "texts"), None if text_pairs is None else _as_texts(text_pairs, "text_pairs")
        if self.takes_pairs and text_pairs is None:
            raise PipelineError(f"{self.dir} classifies text pairs (it was trained on text and text_pair); "
                                "give a second text for each")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise PipelineError(f"{len(texts)} texts but {len(text_pairs)} second texts; give one pair per text")
        out = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        order = np.arange(len(texts))
        if sort_by_length:
            chars = [len(t) + (len(text_pairs[i]) if text_pairs is not None else 0) for i, t in enumerate(texts)]
            order = np.argsort(np.asarray(chars, dtype=np.int64), kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                pair = [text_pairs[i] for i in rows] if text_pairs is not None else None
                batch = [texts[i] for i in rows]
                enc = self.tokenizer(batch, pair, truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt")
                self.truncated += count_cut(self.tokenizer, enc, batch, pair, self.max_length)
                try:
                    out[rows] = self.model(**enc.to(self.device)).logits.float().cpu().numpy()
                except (RuntimeError, MemoryError) as e:
                    if not out_of_memory(e):
                        raise
                    raise OutOfMemory(
                        f"out of memory on {self.device} scoring {len(rows)} texts at a time (of up to "
                        f"{enc['input_ids'].shape[1]} tokens) with {self.dir}: score fewer at a time (evaluate.batch_size "
                        "for evaluate and reproduce)") from e
        return out

    def predict(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, top_k: int = 3) -> list[Prediction]:
        from pipeline.metrics import log_softmax

        probs = np.exp(log_softmax(self.logits(texts, text_pairs)))
        preds = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:top_k]
            top = [(self.labels[j], float(row[j])) for j in order]
            preds.append(Prediction(label=top[0][0], confidence=top[0][1], top=top))
        return preds


def count_cut(tokenizer, enc, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> int:
    """How many of the texts that `tokenizer` encoded into `enc` (with truncation) were longer than
    `max_length` tokens. A fast tokenizer keeps what it cut off in each encoding's `overflowing` (empty
    when the text fit); a slow one's texts are measured again, whole."""
    if enc.encodings is not None:
        return sum(1 for e in enc.encodings if e.overflowing)
    return sum(1 for ids in tokenizer(list(texts), pairs, truncation=False)["input_ids"] if len(ids) > max_length)


def _compared_with_manifest(folder: Path) -> str:
    """For a deploy-fetch folder: which files differ from what was deployed, and how to restore them."""
    from pipeline.registry.local import hash_file

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        files = {f["path"]: f["sha256"] for f in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    changed = []
    for path, sha in sorted(files.items()):
        target = folder / path
        if not target.is_file():
            changed.append(f"{path} missing")
            continue
        if hash_file(target)[0] != sha:
            changed.append(f"{path} changed")
    if not changed:
        return ""
    return (f"; since deploy-fetch put {manifest.get('ref', 'it')} here: {', '.join(changed)}. "
            f"Run deploy-fetch --model {manifest.get('ref', 'NAME:vN')} --to {folder} again to restore it")


def _as_texts(texts: str | Sequence[str], what: str) -> list[str]:
    """A list of strings: one string is one text (not a sequence of characters); anything else is named."""
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise PipelineError(f"{what}[{bad}] is a {type(texts[bad]).__name__}, not a string")
    return texts


def load(model_dir: str | Path, **kwargs) -> Classifier:
    return Classifier(model_dir, **kwargs)


def predict(model_dir: str | Path, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
            top_k: int = 3) -> list[Prediction]:
    """One call: load the folder and classify `texts` (with `text_pairs` for a sentence-pair model)."""
    return load(model_dir).predict(texts, text_pairs, top_k=top_k)
