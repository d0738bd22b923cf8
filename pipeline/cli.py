"""Command line: a small table from command name to the module that implements it.

Only argparse is imported at start-up; each command imports what it needs (torch,
transformers and wandb stay out of ``--help``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from pathlib import Path

from pipeline import __version__

# name -> (module with add_arguments(parser) and main(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "dataset-publish": ("pipeline.commands.dataset_publish", "validate, split and publish raw labeled text as NAME:vN"),
    "finetune": ("pipeline.commands.finetune", "train a classifier on an exact dataset version and publish MODEL:vM"),
    "evaluate": ("pipeline.commands.evaluate", "score a model version on its test split and gate its promotion to production"),
    "deploy-fetch": ("pipeline.commands.deploy_fetch", "fetch a model version into a folder, verified and smoke-tested"),
    "run": ("pipeline.commands.run", "run dataset-publish, finetune, evaluate and deploy-fetch in order"),
    "sweep": ("pipeline.commands.sweep", "search finetune hyperparameters with a W&B sweep config (online or offline)"),
    "reproduce": ("pipeline.commands.reproduce", "retrain a model version from what it recorded and compare"),
    "lineage": ("pipeline.commands.lineage", "show what a version was made from and what used it (text, json, mermaid)"),
    "predict": ("pipeline.commands.predict", "classify text with a fetched or deployed model"),
    "artifacts": ("pipeline.commands.artifacts", "list, show, compare, verify, delete and prune artifact versions"),
}


class _StoreEach(argparse.Action):
    """argparse's store (the last value given), keeping each value given in ``_given_<dest>`` too: a second
    ``--config`` took the first one's place without a word, where a user meant to layer one file over another."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, f"_given_{self.dest}", [*getattr(namespace, f"_given_{self.dest}", []), values])
        setattr(namespace, self.dest, values)


def _given_twice(args: argparse.Namespace) -> str | None:
    """The message for a config file given twice (two files; the same file twice is one)."""
    given = getattr(args, "_given_config", [])
    if len({str(Path(g).resolve()) for g in given}) < 2:
        return None
    return (f"error: --config is given {'twice' if len(given) == 2 else f'{len(given)} times'} ({', '.join(given)}): "
            "a command reads one config file; "
            "change its fields with --set KEY=VALUE (repeatable), or write the combined file")


def add_config_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, metavar="YAML", action=_StoreEach,
                   help="experiment config file (configs/*.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=1 (repeatable; wins over the file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Fine-tune Hugging Face classifiers in versioned, traceable stages (W&B online or offline).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _add_arguments_lazily(p, module)
        _accept_verbose_anywhere(p)
    return parser


def _accept_verbose_anywhere(p: argparse.ArgumentParser) -> None:
    """-v after the command too (`pipeline finetune --config c.yaml -v`), and after an artifacts action.
    Left unset there unless given, so a -v before the command is not overwritten."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for nested in action.choices.values():
                _accept_verbose_anywhere(nested)


def _add_arguments_lazily(p: argparse.ArgumentParser, module: str) -> None:
    # Command modules import nothing heavy at top level, so this stays fast.
    importlib.import_module(module).add_arguments(p)


def _setup_logging(verbose: bool) -> None:
    from pipeline.redact import RedactingFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.addFilter(_without_notices)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "httpx2", "httpcore"):  # a line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Made before the libraries (imported later) configure them, so that they take this class.
    logging.setLoggerClass(_LibraryLogger)
    try:
        for library in _LIBRARIES:
            logging.getLogger(library)
    finally:
        logging.setLoggerClass(logging.Logger)


_LIBRARIES = ("huggingface_hub", "datasets", "transformers")

# Library warnings that ask nothing of the user: (logger, start of the message).
_NOTICES = (
    # The Trainer orders checkpoints by their folders' mtimes, and by their step numbers when two were written within a
    # second (small models, frequent evaluations): the order the pipeline's numbered checkpoints have anyway.
    ("transformers.trainer_utils", "mtime may not be reliable"),
)


def _without_notices(record: logging.LogRecord) -> bool:
    return not any(record.name == name and str(record.msg).startswith(start) for name, start in _NOTICES)


class _LibraryLogger(logging.Logger):
    """The root logger of a Hugging Face library, whose records go to the command's one handler.

    huggingface_hub and datasets add a stderr handler of their own and also pass each record on,
    so every warning was printed twice; transformers adds one and stops passing records on, so
    its records were printed without the time and past the handler's secret masking. Here their
    own stderr handler is not added, and records always pass on to the root handler.
    """

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        if type(hdlr) is logging.StreamHandler and hdlr.stream in (sys.stderr, sys.__stderr__):
            return
        super().addHandler(hdlr)

    @property
    def propagate(self) -> bool:
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass


def _empty_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Action | None:
    """The first option given an empty value (`--dataset "$REF"` with REF unset). Taken as given, it would fall back
    to the option's default, as if it had not been given: the stage would train on `latest`, evaluate `candidate` or
    deploy to `deploy.dir`, none of which the caller named."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # the command (or artifacts action) given
            chosen = action.choices.get(getattr(args, action.dest, None))
            found = chosen and _empty_option(chosen, args)
            if found:
                return found
        elif action.option_strings and isinstance(getattr(args, action.dest, None), str) \
                and not getattr(args, action.dest).strip():
            return action
    return None


_QUOTA_THREADS: int | None = None  # OMP_NUM_THREADS as `run` set it from a cgroup CPU quota
# The commands that load a model (whose own code transformers may copy into its module cache)
LOADS_MODELS = frozenset({"finetune", "evaluate", "deploy-fetch", "predict", "run", "sweep", "reproduce"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    empty = _empty_option(parser, args)
    if empty:
        print(f"error: {'/'.join(empty.option_strings)} is empty (an unset shell variable?); give it a value"
              + ("" if empty.required else ", or leave it out for its default"), file=sys.stderr)
        return 2
    if twice := _given_twice(args):
        print(twice, file=sys.stderr)
        return 2
    _setup_logging(args.verbose)
    from pipeline.launch import launched_processes, one_process_enough, process_rank

    if one_process_enough(args.command):  # under torchrun: the main process runs it
        logging.getLogger("pipeline").info("process %d of %d: %s runs in the main process only", process_rank(),
                                           launched_processes(), args.command)
        return 0
    if args.command in LOADS_MODELS:
        from pipeline.homes import hf_modules_where_writable

        if (moved := hf_modules_where_writable()) is not None:
            logging.getLogger("pipeline").info("the home folder's Hugging Face module cache cannot be written: a "
                                               "model's own code is copied to %s (HF_MODULES_CACHE)", moved)
    if _QUOTA_THREADS:
        from pipeline.cpus import usable_cpus

        logging.getLogger("pipeline").info(
            "this process runs under a CPU quota of %d CPU(s) (a container's limit), of the %d it can run on: "
            "OMP_NUM_THREADS=%d, so torch, NumPy and Arrow start as many threads", _QUOTA_THREADS, usable_cpus(),
            _QUOTA_THREADS)
    # A log handler that cannot write (a full disk under W&B's debug log) must not print a traceback per record.
    logging.raiseExceptions = False
    if not sys.stderr.isatty():  # a log file or an orchestrator's pipe: no progress bars redrawn with \r
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers (the Trainer's bars: finetune)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets' map and save_to_disk
    from pipeline.errors import TERMINATED, PipelineError, signals_as_interrupt

    # Under torchrun only the main process writes the result file.
    result_json = getattr(args, "result_json", None) if process_rank() == 0 else None
    # SIGTERM ends the command as Ctrl-C does (its result file written, its run marked killed), from its first step:
    # not only once a stage's run is open. It exits 143 (128 + 15), as a process stopped by it. Either one again
    # within a second is the same request, which lets the first's way out finish: the result file, the message.
    with signals_as_interrupt():
        try:
            if result_json:
                from pipeline.results import check_writable

                check_writable(result_json)
                # A file left there by an earlier command (last night's `ok`) is never to be read as this one's result:
                # removed now, so the file is this command's result or absent.
                Path(result_json).unlink(missing_ok=True)
            try:
                return int(importlib.import_module(args._module).main(args) or 0)
            except BaseException as e:
                if result_json and not os.path.exists(result_json) and not (isinstance(e, SystemExit) and not e.code):
                    # stopped before the stage could say so (a config error)
                    _write_failed(result_json, args.command, e)
                raise
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            if str(e) == TERMINATED:
                print("terminated (SIGTERM)", file=sys.stderr)
                return 143
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head` closed stdout: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
            return 141
        except Exception as e:
            from pipeline.errors import DiskFull, full_path, no_space_left, out_of_memory

            if (said := _wandb_problem(e)) is not None:
                logging.getLogger("pipeline").debug("W&B refused", exc_info=True)  # where, with -v
                print(f"error: {said[0]}", file=sys.stderr)
                return said[1]
            if out_of_memory(e) and not no_space_left(e):  # where no stage said what to lower (loading a model, say)
                logging.getLogger("pipeline").debug("out of memory", exc_info=True)  # where, with -v
                print(f"error: out of memory: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                      file=sys.stderr)
                return 1
            if not no_space_left(e):
                raise
            logging.getLogger("pipeline").debug("the disk is full", exc_info=True)  # where, with -v
            print(f"error: {DiskFull(full_path(e))}", file=sys.stderr)
            return DiskFull.exit_code


def _wandb_problem(error: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for what W&B itself refuses online (no API key, a key it rejects, a server it cannot
    reach), which the user fixes outside the pipeline: one line instead of W&B's traceback. None for other errors.
    W&B's messages name no key; they are redacted all the same."""
    errors = sys.modules.get("wandb.errors")  # only W&B raises these: not imported, not one of them
    if errors is None or not isinstance(error, (errors.UsageError, errors.AuthenticationError, errors.CommError)):
        return None
    from pipeline.redact import redact

    message = "W&B: " + redact(" ".join(str(error).split()) or type(error).__name__)
    offline = "or run offline (WANDB_MODE=offline: no account needed, artifacts in the local registry)"
    if isinstance(error, errors.AuthenticationError):  # a CommError too
        # A key W&B rejects, or one it could not check: the server did not answer (W&B says "Failed to execute API
        # request"), which a later try may get past, as other network errors (exit 1).
        unanswered = "failed to execute api request" in str(error).lower()
        return (message.rstrip(".") + "; check WANDB_API_KEY (or `wandb login --relogin`) and that W&B can be reached "
                f"(WANDB_BASE_URL), {offline}"), 1 if unanswered else 2
    if isinstance(error, errors.CommError):  # the network or the server: perhaps gone by the next try
        return message, 1
    if "api key" in str(error).lower():
        message = message.rstrip(".") + f"; online mode needs a W&B API key: set WANDB_API_KEY or run `wandb login`, {offline}"
    return message, 2


def _write_failed(path: str, command: str, error: BaseException) -> None:
    from pipeline.results import failed, write_json_atomic

    try:
        write_json_atomic(path, failed(command, error).to_dict())
    except OSError:  # the error being reported is the one to see (a full disk, say)
        logging.getLogger("pipeline").debug("the result file %s could not be written", path, exc_info=True)


def run() -> None:
    """``python -m pipeline`` and the ``pipeline`` console script: `main`, then the process ends.

    Before it ends, the objects alive are frozen out of the cyclic garbage collector
    (`gc.freeze`). Python's shutdown otherwise collects them all once more: a full second after
    torch and transformers are loaded (predict, finetune, evaluate, deploy-fetch), 0.1 s after
    W&B and Arrow. The memory goes back to the system at exit either way. The atexit handlers
    still run (W&B's teardown, logging's flush) and objects are still freed by reference
    counting; only the finalizers of objects caught in reference cycles are skipped, and every
    file, run and registry connection is closed explicitly before this point.

    Arrow's allocator (mimalloc) is told not to use transparent huge pages, unless the user set
    ``MIMALLOC_ALLOW_THP`` themselves: it must be set before Arrow loads, which is why it is here
    and not in a stage. On Linux with THP in ``madvise`` mode (most distributions' default),
    mimalloc asks for huge pages for its arenas, and the kernel then zeroes, splits and faults
    2 MiB pages as Arrow's buffers come and go: reading, validating and splitting 1M rows for
    dataset-publish took 0.8 s longer in most runs, up to 1.7 s of it system time (how much
    depends on the kernel's state; mimalloc's maintainers give the same remedy:
    microsoft/mimalloc#1323). Only Arrow's buffers are concerned; torch and NumPy use the C
    library's allocator.
    """
    os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")
    import atexit

    from pipeline.cpus import limit_threads_to_quota
    from pipeline.errors import exit_on_signal, ignore_signals

    atexit.register(ignore_signals)  # first registered, so the last to run

    global _QUOTA_THREADS
    _QUOTA_THREADS = limit_threads_to_quota()  # a container's CPU limit, before torch, NumPy or Arrow load
    code = main()
    exit_on_signal()  # a Ctrl-C during the interpreter's exit: no traceback from an exit handler
    gc.freeze()
    sys.exit(code)
