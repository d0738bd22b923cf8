"""The pipeline as an orchestrator runs it: one process per stage, chained through result files.

    python scripts/orchestrate.py --config configs/demo.yaml [--workdir runs/today] [--set key=value ...]

Each task is what an Airflow ``BashOperator``, a Prefect or Dagster task, an Argo step or a
cron line would run: ``python -m pipeline STAGE --config ... --result-json FILE``. The next
task reads the exact ``name:vN`` from the previous task's result file, never an alias that
something else could move in between, and branches on the exit code: 0 goes on, 3 means the
evaluation gate said no (stop cleanly, deploy nothing), anything else is a failure. finetune
runs with ``--resume auto``, so the orchestrator's retry of a task that was stopped (a preempted
node, SIGTERM) continues its run from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from pathlib import Path

GATE_FAILED = 3


def task(stage: str, config: str, result: Path, *extra: str, overrides: list[str]) -> dict:
    """One orchestrator task: run a stage in its own process and read its result file."""
    cmd = [sys.executable, "-m", "pipeline", stage, "--config", config, "--result-json", str(result), *extra]
    for item in overrides:
        cmd += ["--set", item]
    print(f"$ {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd).returncode
    data = json.loads(result.read_text()) if result.is_file() else {"status": "failed"}
    data["exit_code"] = code
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", default="orchestrate-results", help="where the result files go")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    group = ["--group", f"orchestrated-{uuid.uuid4().hex[:8]}"]  # all four runs side by side in W&B
    o = args.overrides

    data = task("dataset-publish", args.config, work / "1-dataset-publish.json", *group, overrides=o)
    if data["exit_code"] != 0:
        return data["exit_code"]
    dataset_ref = data["produced"][0]  # exact, e.g. support-tickets:v3

    # --resume auto: a retry of this task after the machine went away continues the interrupted run from its
    # last checkpoint (same config and dataset version), instead of training from the start
    model = task("finetune", args.config, work / "2-finetune.json", "--dataset", dataset_ref, "--resume", "auto", *group,
                 overrides=o)
    if model["exit_code"] != 0:
        return model["exit_code"]
    model_ref = model["produced"][0]

    verdict = task("evaluate", args.config, work / "3-evaluate.json", "--model", model_ref, *group, overrides=o)
    if verdict["exit_code"] == GATE_FAILED:
        print(f"gate said no to {model_ref}: {verdict.get('message')}; production unchanged, nothing deployed")
        return GATE_FAILED
    if verdict["exit_code"] != 0:
        return verdict["exit_code"]
    production = verdict["details"]["production"]

    deployed = task("deploy-fetch", args.config, work / "4-deploy-fetch.json", "--model", production, *group, overrides=o)
    if deployed["exit_code"] != 0:
        return deployed["exit_code"]
    print(f"{dataset_ref} -> {model_ref} -> production {production} -> {deployed['paths']['model_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
