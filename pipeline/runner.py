"""``pipeline run``: the four stages in order under one W&B group, handing exact references on.

Each stage gets the exact ``name:vN`` the previous one produced (never an alias that another
run could move in between). The first stage that fails stops the run with its exit code; a
gate that says no stops it with ``gate_failed`` before anything is deployed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError
from pipeline.launch import is_follower
from pipeline.results import StageResult, failed
from pipeline.tracking import new_run_id, open_registry, runs_opened

log = logging.getLogger(__name__)
ORDER = ("dataset-publish", "finetune", "evaluate", "deploy-fetch")


@dataclass
class PipelineResult:
    group: str | None  # None only when the command stopped before it had a config (and so a group)
    stages: list[StageResult] = field(default_factory=list)
    status: str = "ok"
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        produced = [r for s in self.stages for r in s.produced]
        consumed = [r for s in self.stages for r in s.consumed if r not in produced]
        metrics = {f"{s.stage}/{k}": v for s in self.stages for k, v in s.metrics.items()}
        paths = {f"{s.stage}/{k}": v for s in self.stages for k, v in s.paths.items()}
        out = StageResult(stage="run", status=self.status, run_id=None, consumed=list(dict.fromkeys(consumed)),
                          produced=produced, metrics=metrics, paths=paths, message=self.message).to_dict()
        out["group"] = self.group
        out["stages"] = [s.to_dict() for s in self.stages]
        return out


def run_all(config: Config, *, group: str | None = None, on_stage: Callable[[StageResult], None] | None = None,
            result: PipelineResult | None = None, reuse: bool = False, resume: str | None = None) -> PipelineResult:
    """Run the stages; `result` (made here when not given) is filled in as they finish, also on failure.
    `reuse`: a dataset version published from the same files, config and code is not read again, and a model
    version trained from the same inputs is not trained again (the stages' own `reuse`). `resume`: finetune's
    (``"auto"``: an interrupted run of this config and dataset version is continued)."""
    from pipeline.stages import dataset_publish, deploy_fetch, evaluate, finetune

    if result is None:
        result = PipelineResult(group=group or config.tracking.group or f"pipeline-{new_run_id()}")
    group = result.group
    if is_follower():  # under torchrun: the main process publishes, evaluates and deploys; this one trains
        return _follow(config, result, reuse=reuse, resume=resume)

    def step(name: str, fn, **kwargs) -> StageResult:
        log.info("== %s (group %s)", name, group)
        with runs_opened() as runs:
            try:
                r = fn(config, group=group, **kwargs)
            except BaseException as e:
                result.status = "failed"
                result.stages.append(failed(name, e, runs))
                result.message = f"{name} failed: {result.stages[-1].message}"
                if on_stage:
                    on_stage(result.stages[-1])
                raise
        result.stages.append(r)
        if on_stage:
            on_stage(r)
        return r

    def publish(config: Config, **kwargs: Any) -> StageResult:
        # the model name finetune will publish, another project's (a local registry that projects share): said before
        # the data is read, not once a new dataset version stands beside a model that cannot be trained (dataset-publish
        # asks for its own name)
        open_registry(config.tracking, project=config.project, entity=config.entity,
                      consuming=True).check_project(config.model.name)  # only read: no registry made for it
        split = config.dataset.split
        needs = {"train": "finetune trains on it", "validation": "finetune chooses the checkpoint on it",
                 config.evaluate.split: f"evaluate scores it (evaluate.split: {config.evaluate.split})"}
        missing = [s for s in needs if not getattr(split, s)]
        if not config.dataset.split_files and missing:  # a version the next stages refuse: said before it is published
            held_out = ("; to publish a held-out set, run `dataset-publish`, then score a model on it with `evaluate "
                        "--dataset NAME:vN`" if "train" in missing else "")
            raise ConfigError(f"`run` trains and evaluates on the dataset it publishes, which would have no "
                              f"{' and no '.join(missing)} rows (dataset.split: train {split.train:g}, validation "
                              f"{split.validation:g}, test {split.test:g}): {'; '.join(needs[s] for s in missing)}"
                              f"{held_out}")
        return dataset_publish.run(config, **kwargs)

    try:
        data = step("dataset-publish", publish, reuse=reuse)
    except Exception as e:  # the other processes of a torchrun wait to train: they stop too
        finetune.stop_followers(f"dataset-publish failed: {e}")
        raise

    def train(config: Config, **kwargs: Any) -> StageResult:
        # what evaluate would refuse (an empty evaluate.split, a gate naming labels the data lacks): said before
        # training, not after
        try:
            registry = open_registry(config.tracking, project=config.project, entity=config.entity)
            evaluate.check_evaluable(config, registry.resolve(data.produced[0], type="dataset"))
        except Exception as e:
            finetune.stop_followers(str(e))
            raise
        return finetune.run(config, **kwargs)

    model = step("finetune", train, dataset=data.produced[0], reuse=reuse, resume=resume)
    verdict = step("evaluate", evaluate.run, model=model.produced[0])
    if verdict.status == "gate_failed":
        result.status = "gate_failed"
        result.message = verdict.message
        return result
    production = verdict.details.get("production")
    if not production:
        raise PipelineError(f"evaluate passed {model.produced[0]} but no production version is set")
    step("deploy-fetch", deploy_fetch.run, model=production)
    result.message = f"{production} deployed at {result.stages[-1].paths['model_dir']}"
    return result


def _follow(config: Config, result: PipelineResult, **kwargs: Any) -> PipelineResult:
    """`run` in a process that torchrun (or accelerate launch) started beside the main one: it trains with the main
    process, which hands it what to train once it has published the data (`finetune.run`), and ends there; the main
    process alone publishes, evaluates and deploys, as each stage's own command does under a launcher. Each process
    ran every stage before: both published, and evaluate failed in this one, on the model it does not publish."""
    from pipeline.stages import finetune

    trained = finetune.run(config, group=result.group, **kwargs)
    result.stages.append(trained)
    result.status = trained.status
    return result
