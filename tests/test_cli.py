"""The command line itself: start-up cost, help, and the artifacts commands end to end."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.registry.local import LocalRegistry
from tests.conftest import REPO, fill_disk, run_cli


def test_help_imports_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "from pipeline.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "    try: main(['artifacts', '--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'wandb', 'datasets', 'pydantic') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_common_mistakes_are_said_before_torch_and_transformers_load(tmp_path):
    """Loading them takes seconds: a typo in a reference or a path is said at once."""
    from tests.tiny import write_tickets

    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: {{name: tickets, source: {write_tickets(tmp_path / 'data.csv')}, id_column: ticket_id}}\n"
                      f"model: {{name: clf}}\ntracking: {{dir: {tmp_path / 'track'}}}\n")
    published = run_cli("dataset-publish", "--config", str(config))
    assert published.returncode == 0, published.stderr[-2000:]
    cases = [
        (["finetune", "--config", str(config), "--dataset", "tickest:v3"], "no artifact named 'tickest'"),
        (["finetune", "--config", str(config), "--set", f"model.base={tmp_path / 'no-model'}"], "model.base="),
        (["sweep", "--config", str(config), "--sweep", str(tmp_path / "no.yaml"), "--count", "1"], "cannot read sweep file"),
        (["predict", "--model-dir", str(tmp_path / "deploy"), "where is my parcel"], "is not a model folder"),
    ]
    code = (
        "import sys, json, contextlib, io\n"
        "from pipeline.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        "    code = main(json.loads(sys.argv[1]))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules)\n"
        "print(json.dumps([code, err.getvalue(), heavy]))\n"
    )
    for argv, message in cases:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        code_, stderr, heavy = json.loads(out.stdout)
        assert code_ == 2 and message in stderr and heavy == [], (argv, code_, stderr, heavy)


def test_hugging_face_library_logs_are_printed_once_with_the_time_and_secrets_masked():
    """huggingface_hub and datasets printed every warning twice (their own handler, then the command's);
    transformers printed its own way, past the masking of secrets."""
    code = (
        "import os\n"
        "from pipeline.cli import _setup_logging\n"
        "_setup_logging(False)\n"
        "import huggingface_hub.utils.logging as hub, datasets.utils.logging as ds, transformers.utils.logging as tf\n"
        "hub.get_logger('huggingface_hub.file_download').warning('retrying the hub')\n"
        "ds.get_logger('datasets.load').warning('no cache for this dataset')\n"
        "tf.get_logger('transformers.trainer').warning('token %s', os.environ['WANDB_API_KEY'])\n"
        "tf.get_logger('transformers.trainer_utils').warning('mtime may not be reliable on this filesystem, falling "
        "back to numerical ordering')\n"  # a notice that asks nothing of the user: not printed
        "tf.set_verbosity_error()\n"
        "tf.get_logger('transformers.trainer').warning('below the verbosity asked for')\n"
    )
    key = "0123456789abcdef" * 2 + "01234567"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "WANDB_API_KEY": key})
    lines = out.stderr.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "WARNING huggingface_hub.file_download: retrying the hub",
        "WARNING datasets.load: no cache for this dataset",
        "WARNING transformers.trainer: token ***",
    ], out.stderr
    assert key not in out.stderr


def test_arrow_allocator_runs_without_transparent_huge_pages_unless_the_user_says():
    """mimalloc (Arrow's allocator) with THP in madvise mode had the kernel zero and split 2 MiB pages: a 1M-row
    publish spent 1.3 s of system time there. mimalloc reads its options when Arrow loads, after `run` began."""
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "mimalloc":
        pytest.skip("this pyarrow's allocator is not mimalloc")
    code = ("import sys\nfrom pipeline.cli import run\nsys.argv = ['pipeline', '--version']\n"
            "try:\n    run()\nexcept SystemExit:\n    pass\nimport pyarrow\npyarrow.allocate_buffer(1)\n")
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ALLOW_THP"}
    for users, expected in ((None, "0"), ("2", "2")):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**env, "MIMALLOC_VERBOSE": "1", **({"MIMALLOC_ALLOW_THP": users} if users else {})})
        options = dict(re.findall(r"option '(\w+)': (\S+)", out.stderr))
        assert options.get("allow_thp") == expected, out.stderr[-3000:]


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0 and "artifacts" in out.stdout


def test_verbose_is_accepted_before_or_after_the_command(tmp_path):
    from pipeline.cli import build_parser

    parser = build_parser()
    for argv, verbose in ((["-v", "artifacts", "list"], True), (["artifacts", "list", "-v"], True),
                          (["artifacts", "--verbose", "list"], True), (["artifacts", "list"], False),
                          (["finetune", "--config", "c.yaml", "-v"], True), (["finetune", "--config", "c.yaml"], False)):
        assert parser.parse_args(argv).verbose is verbose, argv
    (tmp_path / "data.csv").write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    (tmp_path / "c.yaml").write_text(f"dataset: {{name: d, source: {tmp_path / 'data.csv'}}}\nmodel: {{name: m}}\n"
                                     f"tracking: {{dir: {tmp_path / 'track'}}}\n")
    s = ["--config", str(tmp_path / "c.yaml")]
    after = run_cli("dataset-publish", *s, "-v", env={"WANDB_MODE": "offline"})
    assert after.returncode == 0 and " DEBUG " in after.stderr, after.stderr[-2000:]
    plain = run_cli("dataset-publish", *s, env={"WANDB_MODE": "offline"})
    assert plain.returncode == 0 and " DEBUG " not in plain.stderr


@pytest.mark.parametrize("argv, option", [
    (["finetune", "--config", "c.yaml", "--dataset", ""], "--dataset"),  # was: trained on <dataset.name>:latest
    (["evaluate", "--config", "c.yaml", "--model", " "], "--model"),  # was: judged <model.name>:candidate
    (["deploy-fetch", "--config", "c.yaml", "--to", ""], "--to"),  # was: deployed to deploy.dir
    (["finetune", "--config", "c.yaml", "--resume", ""], "--resume"),
    (["run", "--config", "c.yaml", "--result-json", ""], "--result-json"),
    (["artifacts", "list", "--type", ""], "--type"),
    (["dataset-publish", "--config", ""], "--config"),
])
def test_an_option_given_an_empty_value_is_refused_not_taken_for_its_default(argv, option, tmp_path, monkeypatch,
                                                                              capsys):
    """`--dataset "$REF"` with REF unset (an orchestrator's template, an empty result file read by a shell) must not
    quietly become the option's default: the stage would train on, judge or deploy what nobody named."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"error: {option} is empty (an unset shell variable?); give it a value")
    assert said.rstrip().endswith("give it a value") == (option == "--config")  # a required option has no default
    assert list(tmp_path.iterdir()) == []  # nothing was made: refused before any work


@pytest.mark.parametrize("command", ["dataset-publish", "run", "sweep", "artifacts"])
def test_a_second_config_file_is_refused_not_taken_in_place_of_the_first(command, tmp_path, monkeypatch, capsys):
    """`--config base.yaml --config small.yaml` (a base and an overlay, as other tools layer them) ran on the second
    file alone, without a word: the first file's dataset, model and gate were not what the command used."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    extra = {"sweep": ["--sweep", "s.yaml", "--count", "1"], "artifacts": ["list"]}.get(command, [])
    head = [command, *extra[:1]] if command == "artifacts" else [command, *extra]
    assert main([*head, "--config", "base.yaml", "--config", "small.yaml"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("error: --config is given twice (base.yaml, small.yaml): a command reads one config file; "
                           "change its fields with --set KEY=VALUE"), said
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or made
    (tmp_path / "c.yaml").write_text("project: p\ndataset: {name: d, source: x.csv}\nmodel: {name: m}\n")
    if command == "dataset-publish":  # the same file twice is one file
        assert main([command, "--config", "c.yaml", "--config", str(tmp_path / "c.yaml")]) == 2
        assert "--config is given" not in capsys.readouterr().err  # on to the data, which is missing


@pytest.mark.parametrize("tolerance", ["-1", "nan", "-inf"])
def test_reproduce_refuses_a_tolerance_no_difference_could_exceed_or_below_zero(tolerance, tmp_path, capsys):
    """`--tolerance nan` ran the whole rebuild, and `--check` passed whatever differed: nan is beyond no difference."""
    from pipeline.cli import main

    assert main(["reproduce", "clf:v0", "--check", f"--tolerance={tolerance}", "--set", f"tracking.dir={tmp_path}"]) == 2
    assert f"error: --tolerance must be a number, 0 or more (got {float(tolerance)})" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before the registry was opened


def test_finetune_and_run_reuse_a_version_trained_from_the_same_inputs_unless_told_to_retrain():
    from pipeline.cli import build_parser

    parser = build_parser()
    for command in ("finetune", "run"):
        assert parser.parse_args([command, "--config", "c.yaml"]).retrain is False
        assert parser.parse_args([command, "--config", "c.yaml", "--retrain"]).retrain is True


def test_artifacts_list_show_json(tmp_path):
    track = tmp_path / "track"
    reg = LocalRegistry(track / "registry")
    src = tmp_path / "f.txt"
    src.write_text("hello")
    reg.publish("ds", "dataset", {"data/f.txt": src}, metadata={"rows": 1, "label_names": ["Höhe", "🚀"]},
                aliases=["golden"])
    s = ["--set", f"tracking.dir={track}"]
    listed = run_cli("artifacts", "list", *s)
    assert listed.returncode == 0
    assert "ds:v0" in listed.stdout and "golden,latest" in listed.stdout
    shown = json.loads(run_cli("artifacts", "show", "ds:golden", "--json", *s).stdout)
    assert shown["ref"] == "ds:v0" and shown["metadata"] == {"rows": 1, "label_names": ["Höhe", "🚀"]}
    assert shown["project"] is None  # published by no run: no project's
    assert [f["path"] for f in shown["files"]] == ["data/f.txt"]
    text = run_cli("artifacts", "show", "ds", *s).stdout
    assert "ds:v0  (dataset" in text and "data/f.txt" in text
    assert '"Höhe",' in text and '"🚀"' in text  # labels as written, not as \u00f6 escapes
    as_json = json.loads(run_cli("artifacts", "list", "--json", "--type", "dataset", *s).stdout)
    assert [v["ref"] for v in as_json] == ["ds:v0"]


@pytest.mark.parametrize("rank", [{"RANK": "1", "WORLD_SIZE": "2"}, {"OMPI_COMM_WORLD_RANK": "1",
                                                                     "OMPI_COMM_WORLD_SIZE": "2"}])
def test_a_command_that_does_not_train_runs_in_the_main_process_only(tmp_path, rank):
    """Under torchrun (or mpirun) only training is shared: every other command is the main process's, and the others
    end at once, saying so, where each ran it again (two evaluate runs, two deploys into one folder, a second
    `artifacts delete` that found nothing to delete)."""
    track = tmp_path / "track"
    reg = LocalRegistry(track / "registry")
    src = tmp_path / "f.txt"
    src.write_text("hello")
    reg.publish("ds", "dataset", {"data/f.txt": src})
    s = ["--set", f"tracking.dir={track}"]
    other = run_cli("artifacts", "delete", "ds:v0", *s, env=rank)
    assert other.returncode == 0 and other.stdout == ""
    assert other.stderr.strip().endswith("process 1 of 2: artifacts runs in the main process only")
    assert [v.ref for v in reg.list_versions()] == ["ds:v0"]  # the main process's to delete
    main = run_cli("artifacts", "delete", "ds:v0", *s, env={k: "0" if "RANK" in k else v
                                                                     for k, v in rank.items()})
    assert main.returncode == 0, main.stderr
    assert reg.list_versions() == []


def test_what_wandb_raises_is_told_apart_network_from_key():
    """W&B's own exceptions as its SDK raises them: a key it could not check because the server did not answer is a
    network problem (exit 1, a retry may pass), a key it rejects is the user's to fix (exit 2)."""
    import wandb.errors

    from pipeline.cli import _wandb_problem

    unanswered = wandb.errors.AuthenticationError("Failed to verify credentials with https://api.wandb.ai: Failed to "
                                                  "execute API request: the service process is busy and did not respond")
    assert _wandb_problem(unanswered)[1] == 1
    assert _wandb_problem(wandb.errors.AuthenticationError("API key is invalid"))[1] == 2
    assert _wandb_problem(wandb.errors.CommError("Connection refused")) == ("W&B: Connection refused", 1)
    assert _wandb_problem(wandb.errors.UsageError("run.log_artifact takes an Artifact")) == (
        "W&B: run.log_artifact takes an Artifact", 2)
    assert _wandb_problem(ValueError("not W&B's")) is None


def test_an_alias_moved_by_hand_rolls_production_back_and_is_recorded(tmp_path, capsys):
    """Production misbehaves in a way the test split did not show: the operator points it at the version before
    (the gate is not asked), and the move is recorded with who, when, from where and why."""
    from pipeline.cli import main

    track = tmp_path / "track"
    reg = LocalRegistry(track / "registry")
    for n in range(2):
        (tmp_path / f"w{n}").write_text(f"weights {n}")
        reg.publish("clf", "model", {"model.safetensors": tmp_path / f"w{n}"}, metadata={"n": n}, aliases=["production"])
    s = ["--set", f"tracking.dir={track}"]
    assert reg.resolve("clf:production").ref == "clf:v1"
    assert main(["artifacts", "alias", "clf:v0", "production", "--reason", "v1 misroutes refunds", *s]) == 0
    assert capsys.readouterr().out == "production: clf:v1 -> clf:v0\n"
    assert reg.resolve("clf:production").ref == "clf:v0" and "production" not in reg.resolve("clf:v1").aliases
    [move] = reg.resolve("clf:v0").metadata["alias_moves"]
    assert (move["alias"], move["from"], move["reason"]) == ("production", "clf:v1", "v1 misroutes refunds")
    assert "@" in move["by"] and move["at"].startswith("20")
    assert reg.resolve("clf:v0").metadata["n"] == 0  # the rest of the metadata stays
    # again: nothing moves, nothing more is recorded
    assert main(["artifacts", "alias", "clf:production", "production", "--json", *s]) == 0
    assert json.loads(capsys.readouterr().out) == {"ref": "clf:v0", "alias": "production", "from": "clf:v0", "moved": False}
    assert len(reg.resolve("clf:v0").metadata["alias_moves"]) == 1
    # a new alias (on no version yet), and forward again: each move its own record
    assert main(["artifacts", "alias", "clf:v1", "staging", *s]) == 0 and "staging: on no version -> clf:v1" in capsys.readouterr().out
    assert main(["artifacts", "alias", "clf:v1", "production", *s]) == 0
    assert [m["from"] for m in reg.resolve("clf:v1").metadata["alias_moves"]] == [None, "clf:v0"]
    # refused, nothing changed: latest, a version-like alias, an unknown version
    for argv, said in ((["clf:v0", "latest"], "'latest' moves by itself"),
                       (["clf:v0", "v3"], "invalid alias 'v3': names of the form vN are versions"),
                       (["clf:v7", "production"], "clf has no version 'v7'")):
        assert main(["artifacts", "alias", *argv, *s]) == 2
        assert said in capsys.readouterr().err
    assert reg.resolve("clf:production").ref == "clf:v1" and reg.resolve("clf:latest").ref == "clf:v1"
    # an alias taken off (a model withdrawn, a stage emptied): on no version then, and recorded where it was
    assert main(["artifacts", "unalias", "clf:staging", "--reason", "stage torn down", *s]) == 0
    assert capsys.readouterr().out == "staging: taken off clf:v1; no version of clf holds it now\n"
    assert "staging" not in reg.resolve("clf:v1").aliases and "production" in reg.resolve("clf:v1").aliases
    last = reg.resolve("clf:v1").metadata["alias_moves"][-1]
    assert (last["alias"], last["removed"], last["reason"]) == ("staging", True, "stage torn down")
    for argv, said in ((["clf:staging"], "clf has no alias 'staging'"), (["clf"], "'latest' moves by itself"),
                       (["clf:v1"], "names of the form vN are versions")):
        assert main(["artifacts", "unalias", *argv, *s]) == 2
        assert said in capsys.readouterr().err
    assert sorted(reg.resolve("clf:v1").aliases) == ["latest", "production"]
    # lineage tells the moves made by hand on the version, with who and why
    from pipeline.lineage import build, render

    text = render(build(reg, "clf:v1"), "text").splitlines()
    moves = text[text.index("aliases moved by hand (artifacts alias, unalias)") + 1:]
    assert [line.split("  ", 2)[0] for line in moves] == ["├─ staging set (on no version before)",
                                                          "├─ production set (from clf:v0)",
                                                          "└─ staging taken off"]
    assert moves[-1].endswith("  stage torn down") and "@" in moves[-1]
    assert json.loads(render(build(reg, "clf:v1"), "json"))["alias_moves"] == reg.resolve("clf:v1").metadata["alias_moves"]


def test_artifacts_takes_its_config_before_or_after_the_action(tmp_path, capsys):
    """`artifacts --config c.yaml list` was "invalid choice: 'c.yaml'": the options belonged to each action only."""
    from pipeline.cli import main

    track = tmp_path / "track"
    src = tmp_path / "f.txt"
    src.write_text("hello")
    LocalRegistry(track / "registry").publish("ds", "dataset", {"f.txt": src})
    for name, folder in (("c.yaml", track), ("elsewhere.yaml", tmp_path / "other")):
        (tmp_path / name).write_text(f"dataset: {{name: d, source: x.csv}}\nmodel: {{name: m}}\ntracking: {{dir: {folder}}}\n")
    c = str(tmp_path / "c.yaml")
    for argv in (["artifacts", "--config", c, "list", "--json"], ["artifacts", "--json", "list", "--config", c],
                 ["artifacts", "--set", f"tracking.dir={tmp_path / 'other'}", "list", "--json", "--set",
                  f"tracking.dir={track}"]):  # the one after the action wins, as it comes later
        assert main(argv) == 0, argv
        assert [v["ref"] for v in json.loads(capsys.readouterr().out)] == ["ds:v0"], argv
    assert main(["artifacts", "--config", c, "show", "ds", "--config", str(tmp_path / "elsewhere.yaml")]) == 2
    assert "--config is given twice" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before a registry was opened


def test_the_console_script_ends_like_python_m_pipeline(tmp_path):
    """Both go through `cli.run`: main's exit code, and what the command wrote is all there."""
    script = Path(sys.executable).parent / "pipeline"
    track = tmp_path / "track"
    src = tmp_path / "f.txt"
    src.write_text("hello")
    LocalRegistry(track / "registry").publish("ds", "dataset", {"f.txt": src})
    for argv in ([str(script)], [sys.executable, "-m", "pipeline"]):
        listed = subprocess.run([*argv, "artifacts", "list", "--json", "--set", f"tracking.dir={track}"],
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and [v["ref"] for v in json.loads(listed.stdout)] == ["ds:v0"]
        missing = subprocess.run([*argv, "artifacts", "show", "missing:v3", "--set", f"tracking.dir={track}"],
                                 capture_output=True, text=True, timeout=120)
        assert missing.returncode == 2 and "no artifact named 'missing'" in missing.stderr


def test_artifacts_show_unknown_reference(tmp_path):
    track = tmp_path / "track"
    LocalRegistry(track / "registry")
    out = run_cli("artifacts", "show", "missing:v3", "--set", f"tracking.dir={track}")
    assert out.returncode == 2 and "no artifact named 'missing'" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("artifacts", "show", "bad:", "--set", f"tracking.dir={track}")
    assert out.returncode == 2 and "cannot parse artifact reference" in out.stderr


def test_a_closed_output_pipe_ends_the_command_quietly(tmp_path):
    """`pipeline artifacts list | head`: the reader went away; no traceback, exit 141 as Unix tools."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "artifacts", "list", "--config", "configs/demo.yaml",
                               "--set", f"tracking.dir={tmp_path}"],
                              cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_an_unwritable_result_path_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    track = tmp_path / "track"
    out = run_cli("dataset-publish", "--config", "configs/demo.yaml", "--set", f"tracking.dir={track}",
                  "--result-json", str(blocker / "result.json"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--result-json {blocker}/result.json cannot be written" in out.stderr
    assert not track.exists()  # nothing was published whose result would then be lost
    folder = run_cli("dataset-publish", "--config", "configs/demo.yaml", "--set", f"tracking.dir={track}",
                     "--result-json", str(tmp_path))
    assert folder.returncode == 2 and f"--result-json {tmp_path} is a folder" in folder.stderr
    assert not track.exists()
    # /dev/stdout is a link: the whole-file write renames a new file over the path, which would replace the link
    # itself (as root, the system's /dev/stdout) and print nothing; a pipe or a link to a file alike
    import os

    from pipeline.errors import ConfigError
    from pipeline.results import check_writable

    link, pipe = tmp_path / "latest.json", tmp_path / "pipe.json"
    link.symlink_to(blocker)
    os.mkfifo(pipe)
    for path in (link, pipe, Path("/dev/stdout")):
        with pytest.raises(ConfigError, match=f"--result-json {path} is not a regular file"):
            check_writable(path)
    assert link.is_symlink() and Path("/dev/stdout").is_symlink() and blocker.read_text() == "not a folder"


def test_a_command_stopped_by_its_config_writes_a_failed_result_over_an_earlier_one(tmp_path, monkeypatch, capsys):
    """An orchestrator reads the result file of each task: last night's `ok` left in place by a command that stopped
    at its config (before the stage began) would be read as tonight's result."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("dataset: {name: d, source: data.csv}\nmodel: {name: m}\n")
    result = tmp_path / "out" / "finetune.json"
    result.parent.mkdir()
    for argv, stage, message in (
            (["finetune", "--config", "c.yaml", "--set", "train.epochs=-1"], "finetune",
             "invalid config (c.yaml with --set train.epochs=-1):\n  train.epochs: Input should be greater than 0"),
            (["run", "--config", "nope.yaml"], "run", "config file not found: nope.yaml"),
            (["sweep", "--config", "c.yaml", "--sweep", "nope.yaml", "--count", "1"], "sweep",
             "cannot read sweep file nope.yaml")):
        result.write_text(json.dumps({"stage": stage, "status": "ok", "produced": ["m:v0"]}))
        assert main([*argv, "--result-json", str(result)]) == 2
        data = json.loads(result.read_text())
        assert (data["stage"], data["status"], data["produced"]) == (stage, "failed", [])
        assert data["message"].startswith(message) and capsys.readouterr().err.startswith(f"error: {message}")
        assert data.get("stages") == ([] if stage == "run" else None)  # run's shape: its stages (none ran)
    assert sorted(p.name for p in result.parent.iterdir()) == ["finetune.json"]  # written whole, nothing left over


def test_online_mode_with_no_api_key_is_one_message_and_a_failed_result(tmp_path):
    """WANDB_MODE=online on a machine with no W&B key: W&B's UsageError ended the command in a traceback."""
    (tmp_path / "c.yaml").write_text(f"dataset: {{name: d, source: {tmp_path / 'data.csv'}}}\nmodel: {{name: m}}\n"
                                     f"tracking: {{dir: {tmp_path / 'track'}}}\n")
    (tmp_path / "data.csv").write_text("text,label\na,x\nb,y\n")
    online = {"WANDB_MODE": "online"}
    for argv in (["artifacts", "list"], ["dataset-publish", "--result-json", str(tmp_path / "r.json")]):
        cli = run_cli(*argv, "--config", str(tmp_path / "c.yaml"), env=online, timeout=120)
        assert (cli.returncode, cli.stdout) == (2, ""), cli.stderr[-2000:]
        assert cli.stderr.startswith("error: W&B: No API key configured. Use `wandb login` to log in; online mode")
        assert "Traceback" not in cli.stderr
        assert cli.stderr.rstrip().endswith("online mode needs a W&B API key: set WANDB_API_KEY or run `wandb login`, "
                                            "or run offline (WANDB_MODE=offline: no account needed, artifacts in the "
                                            "local registry)")
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["status"], result["produced"]) == ("failed", []) and "No API key" in result["message"]
    assert not (tmp_path / "track" / "registry").exists()  # nothing was made
    # a key W&B rejects before it is sent (too short): said, and the key is not
    cli = run_cli("artifacts", "list", "--config", str(tmp_path / "c.yaml"), env={**online, "WANDB_API_KEY": "Zq9xK"})
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "Zq9xK" not in cli.stderr, cli.stderr[-2000:]
    assert re.match(r"error: W&B: WANDB_API_KEY invalid: .*; check WANDB_API_KEY \(or `wandb login --relogin`\) and "
                    r"that W&B can be reached \(WANDB_BASE_URL\), or run offline \(WANDB_MODE=offline", cli.stderr)


def test_no_space_met_by_a_file_write_is_one_message_and_publishes_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC wherever a stage meets it (here writing the split files on a worker thread): one message, exit 1."""
    import errno

    from pipeline import cli
    from pipeline.stages import dataset_publish
    from tests.tiny import write_tickets

    def full(tables, manifest, out):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.parquet"))

    monkeypatch.setattr(dataset_publish, "write_artifact_dir", full)
    monkeypatch.setattr("logging.raiseExceptions", True)  # cli.main turns it off; undone after the test
    # cli.main sets up this process's logging; the later tests' keep theirs: the root handlers come back after
    # the test, and the Hugging Face libraries' loggers exist already, so that they stay as the libraries make them.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    for library in cli._LIBRARIES:
        logging.getLogger(library)
    track = tmp_path / "track"
    code = cli.main(["dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"tracking.dir={track}",
                     "--set", f"dataset.source={write_tickets(tmp_path / 't.csv')}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: the disk is full (" in err and "train.parquet)" in err and "nothing half-written was published" in err
    assert LocalRegistry(track / "registry").list_versions() == []


@pytest.mark.parametrize("free_kib", [0, 100])
def test_a_really_full_disk_is_one_message_and_the_registry_stays_whole(small_disk, tmp_path, free_kib):
    import random

    rng = random.Random(free_kib)
    src = tmp_path / "t.csv"  # ~400 KB of text that does not compress much: it cannot fit in 100 KiB
    src.write_text("ticket_id,text,label\n" + "".join(
        f"t{i},{rng.randbytes(60).hex()},{('billing', 'shipping', 'tech')[i % 3]}\n" for i in range(3000)))
    track = small_disk / "track"
    cli = ("--config", "configs/demo.yaml", "--set", f"tracking.dir={track}", "--set", f"dataset.source={src}")
    first = run_cli("dataset-publish", *cli, "--set", "dataset.split.seed=1")  # v0 fits
    assert first.returncode == 0, first.stderr
    filler = fill_disk(small_disk, free_kib)

    full = run_cli("dataset-publish", *cli, "--set", "dataset.split.seed=2")  # other split files: a new version

    assert full.returncode == 1, full.stderr
    assert "error: the disk is full" in full.stderr and "Traceback" not in full.stderr, full.stderr
    assert "Logging error" not in full.stderr and full.stdout == ""
    # the path named is on the disk that is full, not the file being copied onto it (a temporary split file)
    named = re.search(r"the disk is full \((.+?)\)", full.stderr)
    assert named and Path(named.group(1)).is_relative_to(small_disk), full.stderr
    filler.unlink()
    check = run_cli("artifacts", "verify", "--set", f"tracking.dir={track}")
    assert check.returncode == 0, check.stdout + check.stderr
    assert [v.ref for v in LocalRegistry(track / "registry").list_versions()] == ["support-tickets:v0"]
    again = run_cli("dataset-publish", *cli, "--set", "dataset.split.seed=2")
    assert again.returncode == 0 and again.stdout.strip() == "support-tickets:v1"


def test_sigterm_ends_a_command_as_ctrl_c_does_and_exits_143(tmp_path, monkeypatch, capsys):
    """An orchestrator stops a task with SIGTERM, at any step: before the stage's run opened (here while the data is
    read), the command still ends as on Ctrl-C, with its result file, and exits 143 (128 + SIGTERM), as a process
    stopped by it; Ctrl-C stays 130. (SIGTERM once the run is open: tests/test_finetune.py.)"""
    import signal

    from pipeline import cli
    from pipeline.stages import dataset_publish
    from tests.tiny import write_tickets

    read = dataset_publish.read_files
    stop = {"signal": signal.SIGTERM}

    def stopped_while_reading(*args, **kwargs):
        if stop["signal"] == signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt  # what Ctrl-C raises
        return read(*args, **kwargs)

    monkeypatch.setattr(dataset_publish, "read_files", stopped_while_reading)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    for library in cli._LIBRARIES:
        logging.getLogger(library)
    track, result = tmp_path / "track", tmp_path / "result.json"
    argv = ["dataset-publish", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"tracking.dir={track}",
            "--set", f"dataset.source={write_tickets(tmp_path / 't.csv')}", "--result-json", str(result)]
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(argv) == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone with it
    err = capsys.readouterr().err
    assert err.rstrip().endswith("terminated (SIGTERM)") and "Traceback" not in err
    written = json.loads(result.read_text())
    assert (written["stage"], written["status"], written["produced"]) == ("dataset-publish", "failed", [])
    assert written["message"] == "interrupted (signal 15)"
    assert not (track / "registry").exists() or LocalRegistry(track / "registry").list_versions() == []

    stop["signal"] = signal.SIGINT
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.rstrip().endswith("interrupted")
    assert json.loads(result.read_text())["message"] == "interrupted"
