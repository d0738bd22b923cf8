"""Typed, validated configuration.

One precedence rule: field defaults, then the YAML file, then the standard ``WANDB_PROJECT`` /
``WANDB_ENTITY`` environment variables, then ``--set key.sub=value`` overrides. Every problem
(unknown key, wrong type, missing field, bad value) is gathered and reported in one
`ConfigError` naming each key, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError, closest, near_name
from pipeline.refs import NAME_PATTERN


SEED_MAX = 2**32 - 1  # what NumPy accepts (transformers' set_seed seeds it too)
TABLE_ROWS = 10_000  # W&B keeps the first this many rows of a logged table (wandb.Table.MAX_ROWS) and drops the rest


def check_delimiter(value: str | None) -> str | None:
    """A CSV delimiter (``dataset.delimiter``, ``predict --delimiter``): one character, not a quote or a line break."""
    if value is not None and (len(value) != 1 or value in "\"\r\n"):
        raise ValueError("the delimiter is one character other than a quote or a line break, e.g. ';', '|' or a tab")
    return value


def check_escape_char(value: str | None, delimiter: str | None = None, quoting: bool = True,
                      quoting_off: str = "dataset.quoting false") -> str | None:
    """A CSV escape character (``dataset.escape_char``, ``predict --escape-char``): one character, not a quote, a line
    break or the delimiter, and only where fields are quoted (`quoting_off` names the setting that turns that off)."""
    if value is not None and (len(value) != 1 or value in "\"\r\n"):
        raise ValueError("the escape character is one character other than a quote or a line break, e.g. '\\' "
                         "(a backslash, as Spark writes CSV)")
    if value is not None and value == (delimiter or ","):
        raise ValueError(f"the escape character {value!r} is also the delimiter")
    if value is not None and not quoting:
        raise ValueError(f"it escapes quotes inside quoted fields; with {quoting_off} no field is quoted: set one or "
                         "the other")
    return value


def check_encoding(value: str) -> str:
    """A text encoding's one spelling ("UTF8", "utf_8" -> "utf-8"); ValueError for one Python does not know."""
    import codecs

    try:
        return codecs.lookup(value).name
    except LookupError:
        raise ValueError(f"unknown text encoding {value!r} (e.g. utf-8, cp1252, latin-1)") from None


# settings that a space or a tab is a value of, not an empty one: a tab-separated file named .csv
SPACING_ALLOWED = {"delimiter"}


class _Group(BaseModel):
    # inf and nan are no setting: `epochs: 1e400` would train forever and could not be recorded as JSON.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _not_empty(cls, value: Any, info) -> Any:
        """An empty value is no setting: `--set tracking.dir=$DIR` with DIR unset would keep the registry in the
        current folder, an empty `dataset.source` would read the current folder, an empty column names none."""
        if isinstance(value, str) and not value.strip() and not (value and info.field_name in SPACING_ALLOWED):
            field = cls.model_fields[info.field_name]
            if field.is_required():
                raise ValueError("is empty")
            unset = " (or write null to unset it)" if type(None) in typing.get_args(field.annotation) else ""
            quote = ('; YAML reads a bare | or > as the start of a block of text: quote it, delimiter: "|"'
                     if info.field_name in SPACING_ALLOWED else "")
            raise ValueError(f"is empty; leave the key out for its default{unset}{quote}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_for_a_number(cls, value: Any, info) -> Any:
        """YAML reads yes/no/true/false as booleans, and pydantic would take them as 1 and 0: `batch_size: yes`
        would train with a batch of one. A number field takes numbers only."""
        in_dict = isinstance(value, dict) and any(isinstance(v, bool) for v in value.values())
        if not (isinstance(value, bool) or in_dict):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        kinds = typing.get_args(annotation) or (annotation,)
        if not in_dict and bool not in kinds and any(k in (int, float) for k in kinds):
            raise ValueError("expected a number, not yes/no or true/false")
        # {label: number} settings likewise: `{billing: yes}` is not a weight of 1
        if in_dict and any(typing.get_origin(k) is dict and typing.get_args(k)[1] in (int, float) for k in kinds):
            raise ValueError("expected numbers as the values, not yes/no or true/false")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _number_keys_as_written(cls, value: Any, info) -> Any:
        """YAML reads `{0: 2.0}` with a number as the key; the labels of a {label: number} setting are text, as the
        label column is read, so integer labels can be named as they are written."""
        if not isinstance(value, dict) or not any(isinstance(k, (int, float)) for k in value):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        kinds = typing.get_args(annotation) or (annotation,)
        if not any(typing.get_origin(k) is dict and typing.get_args(k)[0] is str for k in kinds):
            return value
        return dict(zip(_as_written(list(value), "label names used as keys, e.g. {'yes': 2.0}"), value.values()))


def _as_written(names: list[Any], example: str) -> list[Any]:
    """Label names as the label column reads them: YAML's numbers as text; its yes/no (booleans) refused."""
    if any(isinstance(n, bool) for n in names):
        raise ValueError(f"YAML reads yes/no/true/false as booleans: quote {example}")
    return [str(n) if isinstance(n, (int, float)) else n for n in names]


def _expand_home(path: Path) -> Path:
    """``~/runs`` as a shell has it: W&B expands it in its run folders, so the registry beside them must too (it was
    a folder named `~` in the current one)."""
    return path.expanduser()


class TrackingConfig(_Group):
    dir: Path = Path(".pipeline")
    """Where the local registry and the wandb run folders live (``WANDB_DIR`` overrides the latter)."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B mode. ``auto``: ``WANDB_MODE`` when set, else online with credentials, else offline."""
    registry: Literal["auto", "local", "wandb"] = "auto"
    """Artifact registry. ``auto``: W&B when the run is online, else the local registry."""
    link_registry: str | None = None
    """Online only: also link published models to this W&B Registry (e.g. ``model``)."""
    tags: list[str] = Field(default_factory=list)
    """Tags added to every run."""
    notes: str | None = None
    """Notes added to every run."""
    group: str | None = None
    """W&B group shared by the runs of one pipeline execution (generated by ``run`` when unset)."""

    @field_validator("dir")
    @classmethod
    def _home(cls, value: Path) -> Path:
        return _expand_home(value)

    @field_validator("tags")
    @classmethod
    def _w_and_b_tags(cls, tags: list[str]) -> list[str]:
        """W&B's own rule (its `Settings` refuses these when the run opens, offline too): said before any work."""
        for tag in tags:
            if not tag.strip() or len(tag) > 64:
                raise ValueError(f"a W&B tag is 1 to 64 characters; {tag!r} has {len(tag)}")
        return tags


class SplitConfig(_Group):
    train: float = Field(0.8, ge=0, le=1)
    """Fraction of rows for training; 0 makes a dataset for evaluation only (`evaluate --dataset`), which
    finetune refuses."""
    validation: float = Field(0.1, ge=0, le=1)
    """Fraction of rows for validation (model selection, early stopping)."""
    test: float = Field(0.1, ge=0, le=1)
    """Fraction of rows for the held-out test split (the evaluation gate)."""
    seed: int = Field(42, ge=0, le=SEED_MAX)
    """Seed of the stratified split (it seeds the hash that ranks each label's texts); the same input and seed give
    byte-identical splits."""

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (train + validation + test = {total:g})")
        return self


def _readable_location(value: str) -> str:
    """A path (``~`` is the home folder, as a shell has it), glob or hub id as it is; a URL only with a scheme the stage
    reads (file, s3, gs)."""
    if value.startswith("~"):
        return os.path.expanduser(value)
    scheme, sep, _ = value.partition("://")
    if sep and scheme.lower() not in ("file", "s3", "gs"):
        raise ValueError(f"{scheme}:// is not read directly; use a local path, a file://, s3:// or gs:// "
                         "URI, or a Hugging Face hub dataset id (download other URLs first)")
    return _absolute_file_uri(value)


def _absolute_file_uri(value: str, paths_too: bool = True) -> str:
    """A ``file://`` URI names an absolute path (``file:///data/refs``): ``file://data/refs`` names a host, which
    pyarrow refuses only when the stage opens it, after its run has opened. `paths_too`: the setting also takes a
    plain path, which the message offers."""
    if value.lower().startswith("file://") and not value.startswith("/", len("file://")):
        raise ValueError("a file:// URI names an absolute path, with three slashes (file:///data/...)"
                         + ("; write a relative or ~ path without file://" if paths_too else ""))
    return value


class SplitFiles(_Group):
    train: str
    """File (or folder) holding the training rows."""
    validation: str
    """File (or folder) holding the validation rows."""
    test: str
    """File (or folder) holding the test rows."""

    @field_validator("train", "validation", "test")
    @classmethod
    def _location(cls, value: str) -> str:
        return _readable_location(value)

    @model_validator(mode="after")
    def _distinct(self) -> SplitFiles:
        named = [(s, getattr(self, s)) for s in ("train", "validation", "test")]
        for i, (a, pa_) in enumerate(named):
            for b, pb in named[i + 1:]:
                if os.path.normpath(pa_) == os.path.normpath(pb):
                    raise ValueError(f"split_files.{a} and split_files.{b} name the same source {pa_!r}: "
                                     "its rows would be in both splits")
        return self


class DatasetConfig(_Group):
    name: str = Field(pattern=NAME_PATTERN)
    """Dataset artifact name."""
    source: str
    """A CSV, TSV, JSONL/JSON, Parquet or Arrow IPC (.arrow, .feather) file, a folder of them (a path or a file://,
    s3://, gs:// URI), or a glob pattern of local files (``exports/**/part-*.csv``). Spark/Hive ``column=value``
    folders give a configured column the files lack (``partitionBy("label")``)."""
    text_column: str = "text"
    """Column holding the text to classify."""
    label_column: str = "label"
    """Column holding the class label."""
    id_column: str | None = None
    """Optional column of unique row ids."""
    text_pair_column: str | None = None
    """Optional second text column for sentence-pair tasks."""
    labels: list[str] | None = None
    """The label names in the order of the model's class ids, e.g. ``[negative, neutral, positive]``. A row
    with a label not listed is invalid (``unknown_label``), and every listed label needs rows. Unset: the
    labels found, in the order of a hub dataset's ``ClassLabel``, else in numeric order when all are
    integers (``2`` before ``10``), else sorted."""
    encoding: str = "utf-8"
    """Text encoding of CSV/TSV sources, e.g. ``cp1252`` for Excel's "CSV (Comma delimited)" on Windows.
    UTF-16/32 files with a byte-order mark are recognised whatever this says; JSON is always UTF-8."""
    delimiter: str | None = None
    """Field separator of CSV/TSV sources, e.g. ``;`` (Excel's CSV in many European locales); unset: a comma
    for ``.csv`` and a tab for ``.tsv``."""
    quoting: bool = True
    """Whether CSV/TSV fields may be quoted (``"a, b"``, a quote inside doubled: ``""``). ``false``: a quote is a
    character of the text like any other, as in GLUE's TSV files and the TSV most Unix tools write, where a text
    that starts with a quote would otherwise lose its quotes."""
    escape_char: str | None = None
    """The character that escapes a quote inside a quoted CSV/TSV field: ``\\`` for CSV as Spark writes it
    (``"he said \\"hi\\""``); unset: a quote inside a field is doubled (``""``), as RFC 4180 has it and Excel,
    pandas and Python's csv write it."""
    column_names: list[str] | None = None
    """Column names of CSV/TSV files that have no header row, in file order (Spark writes CSV without one by
    default); unset: the first row is the header."""
    on_invalid: Literal["error", "drop"] = "error"
    """Invalid rows: ``error`` stops before anything is written; ``drop`` drops, counts and records them."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Stratified split of ``source`` into train/validation/test."""
    split_files: SplitFiles | None = None
    """Your own splits instead (``source`` is then only a label for the dataset)."""
    sample_rows: int = Field(20, ge=0, le=TABLE_ROWS)
    """Rows per split in the sample table logged to W&B (W&B keeps at most 10,000 rows of a table)."""
    reference: str | None = Field(None, pattern=r"^(file|s3|gs)://.+")
    """Reference mode for big corpora: a file://, s3:// or gs:// prefix. The split files are stored
    there (content-addressed) and the artifact records their URIs and checksums instead of copies."""

    @field_validator("source")
    @classmethod
    def _location(cls, value: str) -> str:
        return _readable_location(value)

    @model_validator(mode="after")
    def _distinct_columns(self) -> DatasetConfig:
        """The text, label, id and pair columns are different columns: one column read as two (the text as its own
        label, say) would publish nonsense."""
        named: dict[str, str] = {}
        for key in ("text_column", "label_column", "id_column", "text_pair_column"):
            column = getattr(self, key)
            if column is None:
                continue
            if column in named:
                raise ValueError(f"{named[column]} and {key} both name the column {column!r}; they must be different columns")
            named[column] = key
        return self

    @field_validator("reference")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else _absolute_file_uri(value, paths_too=False)

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        return check_delimiter(value)

    @model_validator(mode="after")
    def _one_escape_character(self) -> DatasetConfig:
        try:
            check_escape_char(self.escape_char, self.delimiter, self.quoting)
        except ValueError as e:
            raise ValueError(f"dataset.escape_char: {e} (got {self.escape_char!r})") from None
        return self

    @field_validator("column_names")
    @classmethod
    def _distinct_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or any(not n.strip() for n in value):
                raise ValueError("name every column of the file, none of them empty, e.g. [id, text, label]")
            doubled = sorted({n for n in value if value.count(n) > 1})
            if doubled:
                raise ValueError(f"column name(s) {', '.join(map(repr, doubled))} appear more than once")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _numbers_as_written(cls, value: Any) -> Any:
        """YAML reads `[0, 1, 2]` as numbers; the label column is read as text."""
        return _as_written(value, "label names, e.g. ['yes', 'no']") if isinstance(value, list) else value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            value = [str(n).strip() for n in value]  # as the label column is read: trimmed
            if len(value) < 2 or any(not n for n in value):
                raise ValueError("list at least 2 label names, none of them empty, e.g. [negative, positive]")
            doubled = sorted({n for n in value if value.count(n) > 1})
            if doubled:
                raise ValueError(f"label name(s) {', '.join(map(repr, doubled))} appear more than once")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return check_encoding(value)


class ModelConfig(_Group):
    name: str = Field(pattern=NAME_PATTERN)
    """Model artifact name."""
    base: str = "minilm"
    """``minilm`` (the packaged all-MiniLM-L6-v2), a hub id (online), a local folder, or a model version in the
    registry (``NAME:vN`` or ``NAME:ALIAS``, e.g. ``intent-classifier:production``) to train further."""
    max_length: int = Field(128, gt=0)
    """Tokens kept per example."""
    trust_remote_code: bool = False
    """Run an architecture shipped as Python code in the base model's folder (transformers' ``trust_remote_code``,
    e.g. a hub model whose config.json has an ``auto_map``). That code runs in finetune, and in evaluate,
    deploy-fetch and sweep with this config; the models made from it carry it. Off: such a base is refused."""


METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "weighted_f1", "loss")


class TrainConfig(_Group):
    epochs: float = Field(3, gt=0)
    """Training epochs (fractions allowed, as in ``TrainingArguments``)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (overrides ``epochs``); unset: train for ``epochs``."""
    learning_rate: float = Field(5.0e-5, gt=0)
    """Peak learning rate."""
    batch_size: int = Field(32, gt=0)
    """Per-device train batch size (the global batch is this x processes x accumulation)."""
    eval_batch_size: int | None = Field(None, gt=0)
    """Per-device evaluation batch size; unset: twice ``batch_size``."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """The learning rate after the warmup: ``linear`` falls to 0 at the last step, ``cosine`` falls to 0 along a
    half cosine, ``constant`` stays at ``learning_rate``."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradients are clipped to this total norm before each optimizer step; ``null``: not clipped."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy: the target gives this share of its probability evenly to every class
    (0.1 is common). The validation loss is computed the same way, so ``metric_for_best_model: loss`` compares
    smoothed losses; the evaluate stage's scores do not depend on it."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (gradient checkpointing, as
    transformers 4 called it): less memory (a larger batch or model on a GPU) for about a third more compute.
    Refused for architectures transformers does not support it in (ALBERT, MPNet, XLNet, ...)."""
    eval_strategy: Literal["epoch", "steps"] = "epoch"
    """When to evaluate on the validation split (checkpoints are saved at the same points)."""
    eval_steps: int | None = Field(None, gt=0)
    """With ``eval_strategy: steps``: evaluate and checkpoint every this many steps."""
    logging_steps: int = Field(10, gt=0)
    """Log training metrics every this many steps."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept on disk while training (the best one is always kept)."""
    metric_for_best_model: Literal["accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "weighted_f1",
                                   "loss"] = "macro_f1"
    """Validation metric that picks the model kept at the end (loss: lowest, others: highest; of equal ones,
    the lowest validation loss)."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without improvement of that metric (the same value with a lower
    validation loss counts as one); unset: never."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU."""
    misclassified_rows: int = Field(100, ge=0, le=TABLE_ROWS)
    """Rows in each misclassification table (the highest-loss ones); 0 turns the tables off. At most 10,000,
    the rows W&B keeps of a logged table."""
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    """Weights of the classes in the training loss. ``none``: every row counts the same. ``balanced``: each
    class weighs n_train / (classes x its train rows), so a rare class counts as much as a common one (the
    mean weight per row stays 1). ``{label: weight}``: these labels weigh so much, the others 1."""
    dataloader_workers: int = Field(0, ge=0)
    """Worker processes per dataloader."""
    seed: int = Field(42, ge=0, le=SEED_MAX)
    """Seed for data order, head initialisation and dropout."""

    @field_validator("class_weights", mode="before")
    @classmethod
    def _one_of_the_forms(cls, value: Any) -> Any:
        if not (value in ("none", "balanced") or isinstance(value, dict)):
            raise ValueError("expected none, balanced or {label: weight}")
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> TrainConfig:
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("train.eval_steps is required when train.eval_strategy is 'steps'")
        if self.eval_strategy == "epoch" and self.eval_steps is not None:  # the Trainer would ignore it without a word
            raise ValueError(f"train.eval_steps: evaluates every {self.eval_steps} steps only with train.eval_strategy: "
                             "steps (it is 'epoch'); set that too, or leave eval_steps out")
        if isinstance(self.class_weights, dict):
            bad = sorted(k for k, w in self.class_weights.items() if not w > 0)
            if bad or not self.class_weights:
                raise ValueError("train.class_weights needs a weight above 0 for each label it names"
                                 + (f" (not {', '.join(f'{k}={self.class_weights[k]}' for k in bad)})" if bad else ""))
        return self

    def eval_batch(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size


class GateConfig(_Group):
    min_accuracy: float = Field(0.0, ge=0, le=1)
    """The challenger must reach this test accuracy."""
    min_macro_f1: float = Field(0.0, ge=0, le=1)
    """The challenger must reach this test macro-F1."""
    min_class_recall: float | dict[str, float] | None = None
    """Optional minimum recall per class: one number for every class, or ``{label: minimum}``."""
    max_regression: float = Field(0.01, ge=0, le=1)
    """And be at most this much worse than production on the same data."""
    regression_metrics: list[Literal["accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision",
                                     "macro_recall"]] = Field(default_factory=lambda: ["accuracy", "macro_f1"])
    """Metrics the ``max_regression`` check compares against production."""
    regression_test: Literal["point", "non_inferiority"] = "point"
    """``point``: the challenger's measured value may be at most ``max_regression`` below production's.
    ``non_inferiority``: the lower end of the paired-bootstrap 95% interval of the difference must be above
    ``-max_regression``, so the test split must show, not just suggest, that the challenger is no worse."""

    better_than_chance: bool = True
    """And its accuracy must be shown (one-sided 95%) to be above chance: the accuracy that predictions made
    without looking at the text, in the same label shares, would reach (the agreement Cohen's kappa corrects
    for). A model that collapsed to one label, or guesses, fails it whatever the minimums say."""

    @model_validator(mode="after")
    def _check_recall(self) -> GateConfig:
        values = self.min_class_recall.values() if isinstance(self.min_class_recall, dict) else [self.min_class_recall]
        if any(v is not None and not 0 <= v <= 1 for v in values):
            raise ValueError("evaluate.gate.min_class_recall values must be between 0 and 1")
        return self


class EvaluateConfig(_Group):
    gate: GateConfig = Field(default_factory=GateConfig)
    """Promotion thresholds."""
    split: Literal["test", "validation"] = "test"
    """Dataset split the models are scored on."""
    batch_size: int = Field(64, gt=0)
    """Rows per inference batch."""
    calibration_bins: int = Field(10, gt=1)
    """Equal-width confidence bins for the calibration error and the reliability diagram."""
    misclassified_rows: int = Field(100, ge=0, le=TABLE_ROWS)
    """Rows in the table of misclassified examples (the highest-loss ones); at most 10,000, the rows W&B keeps
    of a logged table."""


class DeployConfig(_Group):
    dir: Path = Path("deploy")
    """Where deploy-fetch puts the verified copy (``--to`` overrides)."""

    @field_validator("dir")
    @classmethod
    def _home(cls, value: Path) -> Path:
        return _expand_home(value)


class Config(_Group):
    project: str = "support-intents"
    """W&B project (``WANDB_PROJECT`` overrides)."""
    entity: str | None = None
    """W&B entity (``WANDB_ENTITY`` overrides); your default entity when unset."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dataset: DatasetConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @field_validator("project")
    @classmethod
    def _a_w_and_b_project_name(cls, value: str) -> str:
        """W&B's own rule (its `Settings` refuses these when the run opens, offline too): said before any work."""
        bad = [c for c in "/\\#?%:" if c in value]
        if bad:
            hint = "; the entity (team or user) is set by `entity:` or WANDB_ENTITY" if "/" in bad else ""
            raise ValueError(f"a W&B project name cannot hold {' '.join(bad)}{hint}")
        if len(value) > 128:
            raise ValueError(f"a W&B project name is at most 128 characters (this one has {len(value)})")
        return value

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON types: what runs and artifacts record."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


MODEL_GROUPS = ("dataset", "model", "train")  # the config groups that decide what a model is


def model_config_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"train.seed": (1, 2)}``: keys of the model-shaping groups whose values differ, as ``--set`` writes them.

    `before` (a recorded config) is read with today's defaults first, so a key added since it was
    recorded (at its default) is not a difference; `after` is today's ``Config.to_dict()``.
    """
    a = _flatten({g: with_defaults(before).get(g) for g in MODEL_GROUPS})
    b = _flatten({g: after.get(g) for g in MODEL_GROUPS})
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe_diff(changed: dict[str, tuple[Any, Any]]) -> str:
    """``train.seed (1 -> 2), model.max_length (64 -> 128)``: a `model_config_diff` for a message."""
    return ", ".join(f"{k} ({then!r} -> {now!r})" for k, (then, now) in changed.items())


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config as today's `Config.to_dict()` gives it: keys added since, at their defaults."""
    try:
        return config_from_dict(data).to_dict()
    except ConfigError:  # recorded by a version whose keys no longer validate: compared as it is
        return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error: PyYAML keeps the last silently, so a
    second ``train:`` block would drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be set again here, as YAML has it
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    lines = f"lines {seen[key]} and {line}" if seen[key] != line else f"line {line}"
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping ({lines}); merge them", key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def yaml_error(path: str | Path, e: yaml.YAMLError) -> str:
    """``PATH (line L, column C): invalid YAML: PROBLEM``."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}"


def safe_load_unique(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{near_name(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = safe_load_unique(text)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(path, e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config groups, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    try:
        value = safe_load_unique(raw) if raw.strip() else raw  # a tab given as it is (or "" when nothing is)
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text and let validation judge it
    if value == "" and raw.strip() in ("|", ">", "|-", ">-", "|+", ">+"):
        value = raw.strip()  # YAML's block-scalar marks, alone: `dataset.delimiter=|` is a pipe, not an empty text
    parts = key.split(".")
    if not all(part.strip() for part in parts):  # `train..epochs`, `.train`, `train.`: a key with a part missing
        raise ConfigError(f"--set {item!r}: the key {key!r} has an empty part; expected key.sub=value")
    if isinstance(value, (bool, int, float)) and _text_field(parts):
        value = raw.strip()  # a text setting as written: `dataset.text_column=1`, `dataset.name=2024`, a path `yes`
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a group")
        node = child
    node[parts[-1]] = value


def _group(parts: tuple | list) -> Any:
    """The config group (a model class) at a key's leading parts (``["dataset", "split"]``), or None."""
    model: Any = Config
    for part in parts:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        groups = [a for a in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not groups:
            return None
        model = groups[0]
    return model


def _field(parts: tuple | list) -> Any:
    """The config field at a key's parts (``["dataset", "name"]``), or None when there is none."""
    group = _group(parts[:-1])
    return None if group is None else group.model_fields.get(str(parts[-1]))


def _text_field(parts: list[str]) -> bool:
    """Whether the key is a text setting: a string or a path (either or None)."""
    field = _field(parts)
    if field is None:
        return False
    kinds = set(typing.get_args(field.annotation)) - {type(None)} or {field.annotation}
    return len(kinds) == 1 and kinds <= {str, Path}


# keys as transformers' TrainingArguments and training scripts name them -> this config's
OTHER_NAMES = {
    ("train",): {"num_train_epochs": "epochs", "lr": "learning_rate", "per_device_train_batch_size": "batch_size",
                 "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
                 "lr_scheduler_type": "lr_scheduler", "warmup_steps": "warmup_ratio",
                 "label_smoothing_factor": "label_smoothing", "gradient_checkpointing": "activation_checkpointing",
                 "evaluation_strategy": "eval_strategy", "save_strategy": "eval_strategy",
                 "dataloader_num_workers": "dataloader_workers", "fp16": "precision", "bf16": "precision",
                 "clip_grad_norm": "max_grad_norm"},
    ("model",): {"model_name_or_path": "base", "pretrained_model_name_or_path": "base", "base_model": "base",
                 "max_seq_length": "max_length"},
}


def _did_you_mean(loc: tuple) -> str:
    """`` (did you mean train.learning_rate?)`` for a misspelt key, or one named as transformers names it; or nothing."""
    model = _group(loc[:-1])
    close = OTHER_NAMES.get(tuple(map(str, loc[:-1])), {}).get(str(loc[-1])) or \
        (closest(str(loc[-1]), list(model.model_fields)) if model is not None else None)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), close])}?)" if close else ""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(e["loc"])
        elif kind == "missing":
            msg = "missing required field"
        else:
            msg = e["msg"].removeprefix("Value error, ")  # our own validators' messages, as written
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
                if kind == "string_type" and isinstance(e["input"], (bool, int, float)):  # YAML read `1`, `yes` as such
                    msg += "; quote it to make it text, as YAML reads 1, 1.5, yes and no as numbers and booleans"
        # a group's own check names the key it is about ("train.eval_steps ..."): not "train: train.eval_steps ..."
        lines.append(f"  {msg}" if msg.startswith(f"{loc}.") else f"  {loc}: {msg}")
    return f"invalid config ({origin}):\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, merge and validate; raise one `ConfigError` listing every problem."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    origin = [str(path) if path else "no config file"]
    for env, key in (("WANDB_PROJECT", "project"), ("WANDB_ENTITY", "entity")):
        if os.environ.get(env):
            data[key] = os.environ[env]
            origin.append(env)  # so a bad value is looked for where it came from
    for item in overrides:
        _apply_override(data, item)
    for group in ("dataset", "model"):  # so a missing group reports its missing fields by name
        data.setdefault(group, {})
    return _validate(data, ", ".join(origin), overrides)


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     origin: str = "recorded config") -> Config:
    """Validate a config held as data (a model version's recorded config), with ``--set`` overrides."""
    data = json.loads(json.dumps(data))  # a deep copy of plain JSON
    for item in overrides:
        _apply_override(data, item)
    return _validate(data, origin, overrides)


def _validate(data: dict[str, Any], origin: str, overrides: list[str] | tuple[str, ...]) -> Config:
    if overrides:
        origin += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def load_tracking(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config | TrackingConfig:
    """For commands that only need the registry (``artifacts``): a full config when a file is
    given, else the tracking defaults (plus ``tracking.*`` overrides)."""
    if path:
        return load_config(path, overrides)
    data: dict[str, Any] = {}
    for item in overrides:
        _apply_override(data, item)
    unknown = sorted(set(data) - {"tracking"})
    if unknown:
        raise ConfigError(f"without --config only tracking.* can be set; got {', '.join(unknown)}")
    try:
        return TrackingConfig.model_validate(data.get("tracking", {}))
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "tracking overrides")) from None
