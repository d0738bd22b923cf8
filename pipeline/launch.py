"""Which of several processes this is, when a launcher (torchrun, accelerate launch, mpirun) started it as one of
them, read from the launcher's environment without importing torch (the command line decides before any library
loads: `pipeline.cli.main`).

Training is the work that several processes share: finetune (and `run` and `reproduce`, which train through it)
runs in each, and the main process (rank 0) alone tracks, publishes and reports. Every other command runs in the
main process only (`one_process_enough`): the others have nothing to do, where before each ran the command again
(two evaluate runs, two deploys into one folder, a second `artifacts delete` that found nothing).
"""

from __future__ import annotations

import os

# as accelerate reads them: torchrun and accelerate launch, then MPI's
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
TRAINING_COMMANDS = frozenset({"finetune", "run", "reproduce", "sweep"})  # a sweep refuses several in each process


def launched_processes() -> int:
    """How many processes a launcher started this one as one of: 1 without."""
    def size(var: str) -> int:
        try:
            return int(os.environ.get(var) or 1)
        except ValueError:
            return 2  # unreadable: let accelerate decide

    return max(size(v) for v in WORLD_SIZE_VARS)


def process_rank() -> int:
    """This process's rank among those a launcher started (0, the main process, without a launcher)."""
    for var in RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def is_follower() -> bool:
    """One of several processes, and not the main one: it only trains, alongside the main process."""
    return launched_processes() > 1 and process_rank() > 0


def one_process_enough(command: str) -> bool:
    """Whether `command` runs in the main process only, and this is another one of several: it has nothing to do."""
    return command not in TRAINING_COMMANDS and is_follower()
