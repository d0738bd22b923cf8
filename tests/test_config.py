import json
import re
from pathlib import Path

import pytest

from pipeline.config import Config, load_config, load_tracking
from pipeline.errors import ConfigError
from tests.conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    if "method" in yaml.safe_load(path.read_text()):  # a W&B sweep config
        from pipeline.sweep import load_sweep

        assert load_sweep(path).params
    else:
        assert isinstance(load_config(path), Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python -m pipeline"), "each config starts with the command that runs it"


def test_precedence_defaults_yaml_env_overrides(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("project: from-yaml\ndataset: {name: d, source: s}\nmodel: {name: m}\ntrain: {epochs: 2}\n")
    cfg = load_config(p)
    assert cfg.project == "from-yaml" and cfg.train.epochs == 2 and cfg.train.batch_size == 32
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    assert load_config(p).project == "from-env"
    cfg = load_config(p, ["project=from-set", "train.epochs=5", "train.learning_rate=1e-4", "tracking.tags=[a, b]"])
    assert cfg.project == "from-set" and cfg.train.epochs == 5
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.tracking.tags == ["a", "b"]


def test_all_problems_reported_together_naming_each_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dataset: {name: d}\nmodel: {name: m, colour: red}\ntrain: {epochs: three, batch_size: 0}\nextra_group: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["tracking.mode=sometimes"])
    msg = str(e.value)
    assert str(p) in msg
    for expected in (
        "dataset.source: missing required field",
        "model.colour: unknown key",
        "train.epochs:",
        "train.batch_size:",
        "extra_group: unknown key",
        "tracking.mode:",
    ):
        assert expected in msg, msg


def test_misspelt_keys_get_a_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["dataset.name=d", "dataset.source=x.csv", "model.name=m", "train.lerning_rate=1",
                           "dataset.split.tset=0.2", "modle.base=minilm", "evaluate.gate.min_acuracy=0.5", "zzz=1"])
    msg = str(e.value)
    for expected in ("train.lerning_rate: unknown key (did you mean train.learning_rate?)",
                     "dataset.split.tset: unknown key (did you mean dataset.split.test?)",
                     "modle: unknown key (did you mean model?)",
                     "evaluate.gate.min_acuracy: unknown key (did you mean evaluate.gate.min_accuracy?)",
                     "  zzz: unknown key\n"):
        assert expected in msg + "\n", msg


def test_keys_named_as_transformers_names_them_get_this_config_s_name():
    """A config written from a TrainingArguments script: each key named as it is here."""
    from pipeline.config import TrainConfig

    named = {"train.num_train_epochs": "train.epochs", "train.per_device_train_batch_size": "train.batch_size",
             "train.lr": "train.learning_rate", "train.lr_scheduler_type": "train.lr_scheduler",
             "train.gradient_checkpointing": "train.activation_checkpointing", "train.fp16": "train.precision",
             "train.label_smoothing_factor": "train.label_smoothing", "model.model_name_or_path": "model.base",
             "model.max_seq_length": "model.max_length"}
    with pytest.raises(ConfigError) as e:
        load_config(None, ["dataset.name=d", "dataset.source=x.csv", "model.name=m", *(f"{k}=1" for k in named)])
    for theirs, ours in named.items():
        assert f"{theirs}: unknown key (did you mean {ours}?)" in str(e.value), str(e.value)
    from pipeline.config import OTHER_NAMES, ModelConfig

    for group, names in OTHER_NAMES.items():  # every suggestion is a key that exists
        assert set(names.values()) <= set({"train": TrainConfig, "model": ModelConfig}[group[0]].model_fields)


def test_a_delimiter_yaml_reads_as_a_block_mark_says_to_quote_it(tmp_path):
    """`delimiter: |` in a YAML file is the start of a block of text (empty here), not a pipe."""
    p = tmp_path / "c.yaml"
    p.write_text("dataset:\n  name: d\n  source: x.csv\n  delimiter: |\nmodel: {name: m}\n")
    with pytest.raises(ConfigError, match=r'dataset.delimiter: is empty; .*YAML reads a bare \| or > as the start of a '
                                          r'block of text: quote it, delimiter: "\|"'):
        load_config(p)
    p.write_text('dataset:\n  name: d\n  source: x.csv\n  delimiter: "|"\nmodel: {name: m}\n')
    assert load_config(p).dataset.delimiter == "|"
    p.write_text('dataset:\n  name: d\n  source: x.csv\n  delimiter: "\\t"\nmodel: {name: m}\n')
    assert load_config(p).dataset.delimiter == "\t"  # a tab is a delimiter, not an empty value


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("dataset:\n  name: [unclosed\nmodel: {name: m}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml \(line \d+, column \d+\): invalid YAML"):
        load_config(p)


def test_bad_override_forms(make_config):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        make_config("train.epochs")
    with pytest.raises(ConfigError, match="train.epochs is a value, not a group"):
        make_config("train.epochs=1", "train.epochs.x=1")
    with pytest.raises(ConfigError, match="train.epochs: Input should be a valid number"):
        make_config("train.epochs.x=1")
    with pytest.raises(ConfigError, match="dataset.name"):
        make_config("dataset.name=has space")
    for key in ("train..epochs", ".train", "train."):  # was "(top level): unknown key" or "train.: unknown key"
        with pytest.raises(ConfigError, match=rf"--set '{re.escape(key)}=1': the key '{re.escape(key)}' has an empty "
                                              "part; expected key.sub=value"):
            make_config(f"{key}=1")


def test_a_file_uri_naming_a_host_instead_of_an_absolute_path_is_a_config_error(make_config):
    """`file://data/refs` names a host called `data`: pyarrow refused it only when the split files were written, after
    the run had opened (and was marked failed)."""
    with pytest.raises(ConfigError, match=re.escape("dataset.reference: a file:// URI names an absolute path, with "
                                                    "three slashes (file:///data/...) (got 'file://data/refs')")):
        make_config("dataset.reference=file://data/refs")
    with pytest.raises(ConfigError, match=re.escape("dataset.source: a file:// URI names an absolute path, with three "
                                                    "slashes (file:///data/...); write a relative or ~ path without")):
        make_config("dataset.source=file://tickets.csv")
    with pytest.raises(ConfigError, match="dataset.split_files.test: a file:// URI names an absolute path"):
        make_config("dataset.split_files={train: a.csv, validation: b.csv, test: 'file://c.csv'}")
    cfg = make_config("dataset.reference=file:///data/refs", "dataset.source=file:///data/t.csv")
    assert (cfg.dataset.reference, cfg.dataset.source) == ("file:///data/refs", "file:///data/t.csv")


def test_a_source_url_the_stage_cannot_read_is_refused_by_name(make_config):
    with pytest.raises(ConfigError, match=r"dataset.source: https:// is not read directly; use a local path, a file://, "
                                          r"s3:// or gs:// URI, or a Hugging Face hub dataset id"):
        make_config("dataset.source=https://example.com/tickets.csv")
    with pytest.raises(ConfigError, match=r"dataset.split_files.test: hf:// is not read directly"):
        make_config("dataset.split_files.train=a.csv", "dataset.split_files.validation=b.csv",
                    "dataset.split_files.test=hf://datasets/org/name/test.csv")
    for fine in ("S3://bucket/key.csv", "file:///data/t.csv", "org/dataset-id", "exports/**/part-*.csv"):
        assert make_config(f"dataset.source={fine}").dataset.source == fine


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file not found: {tmp_path}/nope.yaml$"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "demo.yaml").write_text("project: p\n")
    with pytest.raises(ConfigError, match=rf"config file not found: {tmp_path}/dmo.yaml; did you mean {tmp_path}/demo.yaml\?$"):
        load_config(tmp_path / "dmo.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_tracking_only_without_config():
    t = load_tracking(None, ["tracking.dir=/x"])
    assert Path(t.dir) == Path("/x")
    with pytest.raises(ConfigError, match="only tracking"):
        load_tracking(None, ["train.epochs=1"])


def test_resolved_config_is_plain_json_and_stable(make_config):
    a, b = make_config(), make_config()
    assert a.to_dict() == b.to_dict() and a.digest() == b.digest()
    assert make_config("train.seed=1").digest() != a.digest()


def test_cli_config_error_is_one_message_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dataset: {name: d, source: s}\nmodel: {name: m}\ntrain: {epochs: -1}\n")
    out = run_cli("artifacts", "list", "--config", str(p))
    assert out.returncode == 2
    assert "train.epochs" in out.stderr and "Traceback" not in out.stderr


def test_a_key_added_since_a_config_was_recorded_is_not_a_difference():
    """Resuming or reproducing a model recorded before `dataset.encoding` existed sees no change."""
    from pipeline.config import model_config_diff

    now = load_config(None, ["dataset.name=a", "dataset.source=b", "model.name=m"]).to_dict()
    recorded = json.loads(json.dumps(now))
    del recorded["dataset"]["encoding"]
    assert model_config_diff(recorded, now) == {}
    recorded["train"]["seed"] = 1
    assert model_config_diff(recorded, now) == {"train.seed": (1, 42)}
    recorded["dataset"]["encoding"] = "cp1252"
    assert model_config_diff(recorded, now)["dataset.encoding"] == ("cp1252", "utf-8")


@pytest.mark.parametrize("override, message", [
    ("train.epochs=1e400", "train.epochs: Input should be a finite number"),  # YAML reads it as inf
    ("train.learning_rate=.nan", "train.learning_rate: Input should be a finite number"),
    ("evaluate.gate.max_regression=.inf", "evaluate.gate.max_regression: Input should be a finite number"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("dataset.split.seed=4294967296", "dataset.split.seed: Input should be less than or equal to 4294967295"),
    # W&B keeps the first 10,000 rows of a logged table and drops the rest without a word
    ("train.misclassified_rows=20000", "train.misclassified_rows: Input should be less than or equal to 10000"),
    ("evaluate.misclassified_rows=10001", "evaluate.misclassified_rows: Input should be less than or equal to 10000"),
    ("dataset.sample_rows=50000", "dataset.sample_rows: Input should be less than or equal to 10000"),
])
def test_values_no_stage_could_use_are_refused_at_load(make_config, override, message):
    """inf/nan would be recorded as invalid JSON after the run opened; NumPy refuses seeds outside 0..2**32-1."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(override)
    assert make_config("train.seed=4294967295").train.seed == 4294967295


@pytest.mark.parametrize("override, message", [
    ("dataset.source=", "dataset.source: is empty (got '')"),  # was: the current folder read as the data
    ("dataset.text_column='  '", "dataset.text_column: is empty; leave the key out for its default (got '  ')"),
    ("dataset.id_column=", "dataset.id_column: is empty; leave the key out for its default (or write null to unset it)"),
    ("tracking.dir=", "tracking.dir: is empty; leave the key out for its default"),  # was: the registry in the cwd
    ("model.base=", "model.base: is empty; leave the key out for its default"),
    ("train.epochs=", "train.epochs: is empty; leave the key out for its default"),
    ("project=team/intents", "project: a W&B project name cannot hold /; the entity (team or user) is set by "
                             "`entity:` or WANDB_ENTITY (got 'team/intents')"),
    ("project=a:b?", "project: a W&B project name cannot hold ? :"),
    ("project=" + "p" * 129, "project: a W&B project name is at most 128 characters (this one has 129)"),
    ("tracking.tags=[nightly, " + "t" * 65 + "]", f"tracking.tags: a W&B tag is 1 to 64 characters; '{'t' * 65}' has 65"),
    ("tracking.tags=[nightly, '']", "tracking.tags: a W&B tag is 1 to 64 characters; '' has 0"),
    # one column read as two: named by its keys, under the group that holds them
    ("dataset.label_column=text", "dataset: text_column and label_column both name the column 'text'"),
    ("dataset.id_column=label", "dataset: label_column and id_column both name the column 'label'"),
    ("dataset.text_pair_column=text", "dataset: text_column and text_pair_column both name the column 'text'"),
])
def test_an_empty_value_or_a_project_name_wandb_refuses_is_a_config_error(make_config, override, message):
    """`--set tracking.dir=$DIR` with DIR unset, or a project W&B's `Settings` refuses when the run opens (a traceback,
    after the data was read), is said when the config loads."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(override)
    assert make_config("dataset.id_column=null", "project=" + "p" * 128, "tracking.tags=[" + "t" * 64 + "]").dataset.id_column is None


def test_an_empty_setting_or_a_bad_project_from_the_environment_stops_the_command_before_any_work(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nhello,a\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {{name: d, source: {tmp_path / 't.csv'}}}\nmodel: {{name: m}}\n")
    out = run_cli("dataset-publish", "--config", str(cfg), "--set", "dataset.text_column=", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr  # was a TypeError from Arrow
    assert "dataset.text_column: is empty" in out.stderr
    out = run_cli("dataset-publish", "--config", str(cfg), cwd=tmp_path, env={"WANDB_PROJECT": "me/intents"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"invalid config ({cfg}, WANDB_PROJECT):\n  project: a W&B project name cannot hold /" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "t.csv"]  # no registry, no run


def test_a_path_starting_with_a_tilde_is_in_the_home_folder_as_w_and_b_reads_it(make_config, tmp_path, monkeypatch):
    """W&B expands `~` in its run folders: `tracking.dir: ~/runs` put the runs in the home folder and the registry in
    a folder named `~` in the current one, and `dataset.source: ~/data.csv` was not found."""
    from pipeline.tracking import wandb_root

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = make_config("tracking.dir=~/runs", "deploy.dir=~/deployed", "dataset.source=~/data/*.csv")
    assert (cfg.tracking.dir, cfg.deploy.dir, cfg.dataset.source) == (home / "runs", home / "deployed", f"{home}/data/*.csv")
    split = make_config("dataset.split_files={train: ~/t.csv, validation: ~/v.csv, test: ~/s.csv}").dataset.split_files
    assert (split.train, split.test) == (f"{home}/t.csv", f"{home}/s.csv")
    assert wandb_root(cfg) == str(home / "runs")
    monkeypatch.setenv("WANDB_DIR", "~/wandb-runs")
    assert wandb_root(cfg) == str(home / "wandb-runs") and (home / "wandb-runs").is_dir()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("override", ["train.batch_size=yes", "train.epochs=true", "train.max_steps=on",
                                      "evaluate.gate.min_class_recall=no"])
def test_yes_or_no_is_not_taken_for_a_number(make_config, override):
    """YAML reads yes/true/on as True, which pydantic would take as 1: a batch of one, silently."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{key}: expected a number, not yes/no or true/false")):
        make_config(override)


@pytest.mark.parametrize("override", ["evaluate.gate.min_class_recall={billing: yes}", "train.class_weights={billing: on}"])
def test_yes_or_no_is_not_taken_for_a_number_in_a_label_mapping(make_config, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{key}: expected numbers as the values, not yes/no or true/false")):
        make_config(override)


def test_a_text_setting_given_by_set_is_the_text_as_written(make_config):
    """YAML reads `1`, `007`, `2024` and `yes` as numbers and booleans: a text setting was refused (`dataset.text_column:
    Input should be a valid string (got 1)`), or would have been `7` for `007`. A numeric setting stays a number."""
    cfg = make_config("dataset.text_column=1", "dataset.label_column=007", "dataset.name=2024", "project=2024",
                      "dataset.source=yes", "dataset.id_column=12", "tracking.dir=1.5", "train.epochs=3")
    d = cfg.dataset
    assert (d.text_column, d.label_column, d.name, cfg.project, d.source, d.id_column) == ("1", "007", "2024", "2024",
                                                                                           "yes", "12")
    assert cfg.tracking.dir == Path("1.5") and cfg.train.epochs == 3.0
    assert make_config("dataset.id_column=null").dataset.id_column is None  # null still unsets an optional one


def test_a_number_where_a_config_file_wants_text_says_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: {name: d, source: data.csv, text_column: 1, label_column: yes}\nmodel: {name: m}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert ("dataset.text_column: Input should be a valid string (got 1); quote it to make it text, as YAML reads 1, "
            "1.5, yes and no as numbers and booleans") in str(e.value)
    assert "dataset.label_column: Input should be a valid string (got True); quote it" in str(e.value)


def test_integer_labels_can_be_named_as_written_in_label_mappings(make_config):
    """YAML reads {0: 2.0} with a number as the key; labels are text, as the label column is read."""
    cfg = make_config("train.class_weights={0: 2.0, 10: 1.0}", "evaluate.gate.min_class_recall={1: 0.5}",
                      "dataset.labels=[0, 1, 10]")
    assert cfg.train.class_weights == {"0": 2.0, "10": 1.0} and cfg.evaluate.gate.min_class_recall == {"1": 0.5}
    assert cfg.dataset.labels == ["0", "1", "10"]
    with pytest.raises(ConfigError, match=re.escape("train.class_weights: YAML reads yes/no/true/false as booleans: "
                                                    "quote label names used as keys")):
        make_config("train.class_weights={yes: 2.0, no: 1.0}")


@pytest.mark.parametrize("override, message", [
    ("train.class_weights=sometimes", "train.class_weights: expected none, balanced or {label: weight} (got 'sometimes')"),
    ("train.class_weights=2", "train.class_weights: expected none, balanced or {label: weight} (got 2)"),
    ("train.class_weights={billing: 0, shipping: -1}",
     "train.class_weights needs a weight above 0 for each label it names (not billing=0.0, shipping=-1.0)"),
    ("train.class_weights={}", "train.class_weights needs a weight above 0 for each label it names"),
])
def test_class_weights_take_three_forms(make_config, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(override)
    assert make_config("train.class_weights=balanced").train.class_weights == "balanced"
    assert make_config("train.class_weights={billing: 2}").train.class_weights == {"billing": 2.0}
    assert make_config().train.class_weights == "none"


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` block would silently reset epochs to 3."""
    p = tmp_path / "c.yaml"
    p.write_text("project: x\ndataset: {name: d, source: s}\nmodel: {name: m}\ntrain:\n  epochs: 7\ntrain:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p} (line 6, column 1): invalid YAML: key 'train' appears twice "
                                                    "in one mapping (lines 4 and 6); merge them")):
        load_config(p)
    p.write_text("project: x\ndataset: {name: d, source: s, name: e}\nmodel: {name: m}\n")
    with pytest.raises(ConfigError, match="key 'name' appears twice in one mapping"):
        load_config(p)
    s = tmp_path / "sweep.yaml"
    s.write_text("method: grid\nmetric: {name: eval/macro_f1, goal: maximize}\nparameters:\n"
                 "  train.learning_rate: {values: [1e-4]}\n  train.learning_rate: {values: [2e-4]}\n")
    from pipeline.sweep import load_sweep

    with pytest.raises(ConfigError, match=re.escape("(line 5, column 3): invalid YAML: key 'train.learning_rate' appears "
                                                    "twice in one mapping (lines 4 and 5)")):
        load_sweep(s)


def test_yaml_merge_keys_share_settings_and_a_key_set_again_wins(tmp_path):
    """`<<: *defaults` is YAML's way to share a block; the duplicate-key check read `<<` as a key and failed with
    "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'"."""
    p = tmp_path / "c.yaml"
    p.write_text("project: x\ndataset: {name: d, source: s}\nmodel: {name: m}\n"
                 "evaluate: {gate: &strict {min_accuracy: 0.9, min_macro_f1: 0.8}}\n"
                 "train:\n  <<: {epochs: 1, batch_size: 8}\n  batch_size: 16\n")
    cfg = load_config(p)
    assert (cfg.train.epochs, cfg.train.batch_size) == (1, 16)  # merged, and the key set again in the block wins
    assert cfg.evaluate.gate.min_accuracy == 0.9
    p.write_text("project: x\ndataset: {name: d, source: s}\nmodel: {name: m}\n"
                 "train:\n  <<: {epochs: 1}\n  batch_size: 16\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"key 'batch_size' appears twice in one mapping \(lines 6 and 7\)"):
        load_config(p)


def test_eval_steps_without_the_steps_strategy_is_refused_not_ignored(make_config):
    """The Trainer ignores eval_steps when it evaluates per epoch: a user who wrote eval_steps: 50 would get one
    evaluation (and one checkpoint) per epoch, and no word about it."""
    with pytest.raises(ConfigError, match=re.escape("train.eval_steps: evaluates every 50 steps only with "
                                                    "train.eval_strategy: steps (it is 'epoch')")):
        make_config("train.eval_steps=50")
    assert make_config("train.eval_steps=50", "train.eval_strategy=steps").train.eval_steps == 50
