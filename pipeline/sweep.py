"""Hyperparameter sweeps of the finetune stage, from W&B's own sweep config format.

    method: random | grid | bayes
    metric: {name: val/loss, goal: minimize, target: 0.2}
    parameters: {learning_rate: {distribution: log_uniform_values, min: 1e-5, max: 1e-2}, batch_size: {values: [32, 64]}}
    early_terminate: {type: hyperband, min_iter: 1, eta: 3}
    run_cap: 20

Online, ``wandb.sweep`` creates the sweep and ``wandb.agent`` runs the finetune stage in-process
for each trial. Offline, a local engine with the same semantics runs on Optuna: its study
(kept in SQLite beside the local registry) holds every trial, so ``sweep --resume ID`` goes on
where an interrupted sweep stopped; ``bayes`` is Optuna's TPE sampler, hyperband early
termination is Optuna's ``HyperbandPruner`` fed the validation metric at every evaluation;
``random`` draws from W&B's distributions exactly as documented, ``grid`` walks the cartesian
product of the ``values`` (and of int_uniform and q_uniform ranges, enumerated as W&B's grid does)
in order and stops when it is exhausted.

Every trial is a finetune run in the sweep's group on the same pinned dataset version. Trials
publish nothing (no artifact bloat) unless asked; the best trial's model is published at the end
with aliases ``candidate`` and ``sweep-<id>-best``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import runlock
from pipeline.config import (Config, TrainConfig, config_from_dict, describe_diff, model_config_diff, safe_load_unique,
                             yaml_error)
from pipeline.errors import ConfigError, PipelineError, RefError

log = logging.getLogger(__name__)

METHODS = ("random", "grid", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
                 "q_log_uniform", "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
                 "log_normal", "q_log_normal", "beta", "q_beta")
STAGE_METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "weighted_f1", "loss")
_PREFIXES = ("eval", "val", "valid", "validation")
_ALIASES = {"f1": "macro_f1", "acc": "accuracy", "precision": "macro_precision", "recall": "macro_recall"}


@dataclass
class Param:
    name: str  # as written in the sweep file
    key: str  # the config key it sets, e.g. train.learning_rate
    distribution: str
    spec: dict[str, Any]


@dataclass
class SweepSpec:
    method: str
    metric_name: str  # as written, e.g. val/loss
    metric: str  # the finetune metric, e.g. loss
    goal: str  # minimize | maximize
    target: float | None
    params: list[Param]
    hyperband: dict[str, Any] | None
    run_cap: int | None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def maximize(self) -> bool:
        return self.goal == "maximize"

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, in W&B's grid order: the product over the parameters sorted by name (W&B's
        `HyperParameterSet` sorts them), each one's values in order (`grid_values`)."""
        ordered = sorted(self.params, key=lambda p: p.name)
        names = [p.key for p in ordered]
        return [dict(zip(names, combo)) for combo in itertools.product(*map(grid_values, ordered))]


# What a grid walks: values, a constant, and the two distributions W&B's grid search enumerates itself
GRID_DISTRIBUTIONS = ("categorical", "constant", "int_uniform", "q_uniform")
GRID_LIMIT = 10_000  # combinations: a grid of finetunes beyond this is a mistake in the file, not a plan


def grid_values(param: Param) -> list[Any]:
    """A grid parameter's values in order, as W&B's grid search makes them: int_uniform from min to max, and
    q_uniform min, min + q, ... below max (numpy's ``arange``, which W&B uses: max itself is left out)."""
    spec = param.spec
    if param.distribution == "categorical":
        return list(spec["values"])
    if param.distribution == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    if param.distribution == "q_uniform":
        import numpy as np

        return np.arange(spec["min"], spec["max"], spec["q"]).tolist()
    return [spec["value"]]


def _grid_size(param: Param) -> int:
    """``len(grid_values(param))``, without making them (a grid too big to run is refused before it is built)."""
    spec = param.spec
    if param.distribution == "int_uniform":
        return spec["max"] - spec["min"] + 1
    if param.distribution == "q_uniform":
        return max(0, math.ceil((spec["max"] - spec["min"]) / spec["q"]))  # numpy's arange length
    return len(spec["values"]) if param.distribution == "categorical" else 1


# -- reading and checking the sweep file -----------------------------------------------------------
def _config_keys(model=Config, prefix: str = "") -> dict[str, Any]:
    """Every settable leaf key of the config, with its field info."""
    from pydantic import BaseModel

    out = {}
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            out.update(_config_keys(sub, key + "."))
        else:
            out[key] = f
    return out


def map_metric(name: str, source: str = "sweep config") -> str:
    raw = name.strip()
    for sep in ("/", "_"):
        head, _, tail = raw.partition(sep)
        if tail and head.lower() in _PREFIXES:
            raw = tail
            break
    raw = _ALIASES.get(raw.lower(), raw.lower())
    if raw not in STAGE_METRICS:
        raise ConfigError(
            f"{source}: metric.name {name!r} is not logged by the finetune stage; use one of "
            + ", ".join(f"eval/{m}" for m in STAGE_METRICS) + " (val/..., validation/... and eval_... work too)"
        )
    return raw


def _infer_distribution(name: str, spec: dict[str, Any], where: str) -> str:
    if "distribution" in spec:
        return spec["distribution"]
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if both_int else "uniform"
    if "mu" in spec or "sigma" in spec:
        return "normal"
    raise ConfigError(f"{where}: give value, values, min/max or a distribution")


# model.* keys that are no hyperparameter, and why a sweep over them is refused
NOT_SWEPT = {
    "model.name": "it names the model every trial's best is published as (trials named otherwise would be published "
                  "under this config's name)",
    "model.trust_remote_code": "it is a decision to run a model's own code, not a hyperparameter (set it in the config)",
}


def _check_param(name: str, spec: Any, keys: dict[str, Any], source: str) -> Param:
    where = f"{source}: parameters.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (value, values, distribution, min, max, ...)")
    if isinstance(spec.get("parameters"), dict) and spec["parameters"]:
        # W&B's nested form would set the trial run's whole `train` (or `model`) config key, which W&B then locks
        # against the stage's own record of that group: the run would show the swept keys of it only.
        inner = next(iter(spec["parameters"]))
        raise ConfigError(f"{where}: nested parameters (`parameters:` inside a parameter) are not taken; name each "
                          f"swept key with dots instead, e.g. `{name}.{inner}:` at the top of parameters")
    key = name if "." in name else f"train.{name}"
    if key not in keys:
        near = [k for k in keys if k.endswith("." + name.split(".")[-1])]
        hint = f"; did you mean {', '.join(near)}?" if near else f"; bare names map onto train.* ({', '.join(sorted(TrainConfig.model_fields))})"
        raise ConfigError(f"{where}: maps to config key {key!r}, which does not exist{hint}")
    if key.split(".")[0] not in ("train", "model") or key in NOT_SWEPT:
        why = NOT_SWEPT.get(key) or ("the trials train on the dataset version the sweep pins, so dataset settings do not "
                                     "reach them" if key.startswith("dataset.") else "it does not change what a trial trains")
        raise ConfigError(f"{where}: {key} cannot be swept: {why}; a trial's model is shaped by train.* and model.* "
                          f"(not {' or '.join(NOT_SWEPT)})")
    numbers = {k: spec[k] for k in ("min", "max", "mu", "sigma", "q", "a", "b") if isinstance(spec.get(k), float)}
    if any(not math.isfinite(v) for v in numbers.values()):  # .nan or .inf in YAML: every draw would be refused
        raise ConfigError(f"{where}: {', '.join(k for k, v in numbers.items() if not math.isfinite(v))} must be a finite "
                          "number")
    dist = _infer_distribution(name, spec, where)
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {dist!r}; known: {', '.join(DISTRIBUTIONS)}")
    known = {"distribution", "value", "values", "probabilities", "min", "max", "mu", "sigma", "q", "a", "b"}
    extra = sorted(set(spec) - known)
    if extra:
        raise ConfigError(f"{where}: unknown keys {extra}")
    if dist == "constant" and "value" not in spec:
        raise ConfigError(f"{where}: constant needs value")
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: values must be a non-empty list")
        probs = spec.get("probabilities")
        if probs is not None:
            if not isinstance(probs, list) or len(probs) != len(values) or any(not isinstance(p, (int, float)) or p < 0 for p in probs):
                raise ConfigError(f"{where}: probabilities must be {len(values)} non-negative numbers")
            if not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ConfigError(f"{where}: probabilities sum to {sum(probs)}, not 1")
    if dist in ("int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "q_log_uniform",
                "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values"):
        if "min" not in spec or "max" not in spec:
            raise ConfigError(f"{where}: {dist} needs min and max")
        lo, hi = spec["min"], spec["max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise ConfigError(f"{where}: min and max must be numbers")
        if lo > hi:
            raise ConfigError(f"{where}: min ({lo}) is above max ({hi})")
        if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"{where}: int_uniform needs integer min and max")
        if dist.endswith("_values") and lo <= 0:
            raise ConfigError(f"{where}: {dist} needs min above 0 (got {lo})")
    if dist in ("normal", "q_normal", "log_normal", "q_log_normal"):
        if not all(isinstance(spec.get(k, 0), (int, float)) and not isinstance(spec.get(k), bool) for k in ("mu", "sigma")):
            raise ConfigError(f"{where}: mu and sigma must be numbers")
        if spec.get("sigma", 1) <= 0:
            raise ConfigError(f"{where}: sigma must be above 0")
    if dist in ("beta", "q_beta") and not all(isinstance(spec.get(k, 1), (int, float)) and not isinstance(spec.get(k), bool)
                                              and spec.get(k, 1) > 0 for k in ("a", "b")):
        raise ConfigError(f"{where}: {dist}'s a and b must be numbers above 0")
    if "q" in spec and not (isinstance(spec["q"], (int, float)) and spec["q"] > 0):
        raise ConfigError(f"{where}: q must be a number above 0")
    return Param(name=name, key=key, distribution=dist, spec=dict(spec))


def parse_sweep(raw: Any, source: str = "sweep config") -> SweepSpec:
    """Check a W&B sweep config completely, before any trial; one ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (method, metric, parameters, ...)")
    known = {"method", "metric", "parameters", "early_terminate", "run_cap", "name", "description", "program",
             "command", "project", "entity"}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConfigError(f"{source}: unknown keys {extra}; a sweep config has {', '.join(sorted(known))}")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"{source}: method {method!r} is not one of {', '.join(METHODS)}")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or "name" not in metric:
        raise ConfigError(f"{source}: metric.name is required (e.g. metric: {{name: val/loss, goal: minimize}})")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise ConfigError(f"{source}: metric.goal must be minimize or maximize, not {goal!r}")
    mapped = map_metric(str(metric["name"]), source)
    target = metric.get("target")
    if target is not None and (not isinstance(target, (int, float)) or isinstance(target, bool)
                               or not math.isfinite(target)):  # nan is never reached: the sweep would never stop early
        raise ConfigError(f"{source}: metric.target must be a finite number")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{source}: parameters must map at least one parameter name to its values")
    keys = _config_keys()
    params = [_check_param(str(n), s, keys, source) for n, s in params_raw.items()]
    dup = sorted({p.key for p in params if [q.key for q in params].count(p.key) > 1})
    if dup:
        raise ConfigError(f"{source}: several parameters set {dup}")
    # settings that change how the loss itself is computed: trials' validation losses are not comparable
    for key, how in (("class_weights", "weighted by its own class weights"), ("label_smoothing", "smoothed by its own "
                                                                                                  "label smoothing")):
        swept = next((p for p in params if p.key == f"train.{key}"), None)
        if swept is not None and mapped == "loss" and (swept.distribution != "constant" and
                                                       len(swept.spec.get("values") or [None, None]) > 1):
            raise ConfigError(f"{source}: a sweep over {key} cannot rank its trials by {metric['name']}: each trial's "
                              f"validation loss is {how}; rank them by a metric such as val/macro_f1 (goal: maximize)")
    if method == "grid":
        bad = [p for p in params if p.distribution not in GRID_DISTRIBUTIONS]
        if bad:
            raise ConfigError(f"{source}: grid search needs value, values, int_uniform or q_uniform for every parameter; "
                              f"{[p.name for p in bad]} ({', '.join(p.distribution for p in bad)}) have no grid")
        for p in params:
            if p.spec.get("probabilities") is not None:
                raise ConfigError(f"{source}: parameters.{p.name}: probabilities are for random and bayes draws; a grid "
                                  "tries every value (W&B refuses them in a grid too)")
            if not _grid_size(p):
                raise ConfigError(f"{source}: parameters.{p.name}: q_uniform from {p.spec['min']} to {p.spec['max']} by "
                                  f"{p.spec['q']} has no value below max (a grid stops below max, as W&B's does)")
        sizes = [(p.name, _grid_size(p)) for p in params]
        if (total := math.prod(n for _, n in sizes)) > GRID_LIMIT:
            raise ConfigError(f"{source}: grid search over {total} combinations "
                              f"({', '.join(f'{name} {n}' for name, n in sizes)}); at most {GRID_LIMIT}: give fewer values")
    if method == "bayes":
        bad = [p.name for p in params if p.distribution in ("normal", "q_normal", "log_normal", "q_log_normal")]
        if bad:
            raise ConfigError(f"{source}: the offline bayes engine (Optuna TPE) needs bounded parameters; "
                              f"{bad} are unbounded normals (use random, or min/max distributions)")
    hyperband = None
    et = raw.get("early_terminate")
    if et is not None:
        if not isinstance(et, dict) or et.get("type") != "hyperband":
            raise ConfigError(f"{source}: early_terminate.type must be hyperband")
        unknown = sorted(set(et) - {"type", "min_iter", "max_iter", "s", "eta", "strict"})
        if unknown:
            raise ConfigError(f"{source}: early_terminate has unknown keys {unknown}")
        if "min_iter" not in et and "max_iter" not in et:
            raise ConfigError(f"{source}: early_terminate needs min_iter or max_iter")
        for k in ("min_iter", "max_iter", "s", "eta"):
            if k in et and not (isinstance(et[k], int) and not isinstance(et[k], bool) and et[k] > 0):  # `true` is no count
                raise ConfigError(f"{source}: early_terminate.{k} must be a positive integer")
        if et.get("eta", 3) < 2:  # W&B's schema: above 1 (each band keeps the best 1/eta of the trials)
            raise ConfigError(f"{source}: early_terminate.eta must be above 1: each band keeps the best 1/eta of the trials")
        if "max_iter" in et and "min_iter" not in et and "s" not in et:  # W&B's schema: max_iter with s, or min_iter
            raise ConfigError(f"{source}: early_terminate with max_iter needs s, the number of bands below it (as W&B "
                              "requires), or give min_iter")
        hyperband = dict(et)
    run_cap = raw.get("run_cap")
    if run_cap is not None and not (isinstance(run_cap, int) and not isinstance(run_cap, bool) and run_cap > 0):
        raise ConfigError(f"{source}: run_cap must be a positive integer")
    return SweepSpec(method=method, metric_name=str(metric["name"]), metric=mapped, goal=goal, target=target,
                     params=params, hyperband=hyperband, run_cap=run_cap, raw=raw)


def keys_not_used(spec: SweepSpec, config: Config) -> list[str]:
    """What a sweep file written for ``wandb sweep`` and ``wandb agent`` says that this command does not follow: its
    program and command (each trial is the finetune stage, in this process), and a project or entity other than the
    config's (the trials run in the config's, as ``wandb.sweep``'s project and entity arguments take precedence over
    the file's). One line each, for the command to log."""
    raw = spec.raw
    said = []
    if "program" in raw or "command" in raw:
        said.append("the sweep file's program and command are not run: each trial is the finetune stage, in this process")
    for key, used, name in (("project", config.project, repr(config.project)),
                            ("entity", config.entity, repr(config.entity) if config.entity else "W&B's default entity")):
        if raw.get(key) is not None and raw[key] != used:
            said.append(f"the sweep file's {key} {raw[key]!r} is not where the trials run: they run in {name} (the "
                        f"config's {key}, or WANDB_{key.upper()}), as wandb.sweep's {key} argument takes precedence "
                        "over the file's")
    return said


def load_sweep(path: str | Path) -> SweepSpec:
    import yaml

    p = Path(path)
    try:
        raw = safe_load_unique(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(p, e)) from None
    return parse_sweep(raw, str(p))


# -- sampling --------------------------------------------------------------------------------
def sample_random(param: Param, rng) -> Any:
    """One draw from a W&B sweep distribution, as W&B documents them."""
    s, d = param.spec, param.distribution

    def quant(x):
        return _quantised(x, s.get("q", 1))

    if d == "constant":
        return s["value"]
    if d == "categorical":
        i = rng.choice(len(s["values"]), p=s.get("probabilities"))
        return s["values"][int(i)]
    if d == "int_uniform":
        return int(rng.integers(s["min"], s["max"] + 1))
    if d == "uniform":
        return float(rng.uniform(s["min"], s["max"]))
    if d == "q_uniform":
        return quant(rng.uniform(s["min"], s["max"]))
    if d == "log_uniform":  # min and max are natural-log exponents
        return float(math.exp(rng.uniform(s["min"], s["max"])))
    if d == "q_log_uniform":
        return quant(math.exp(rng.uniform(s["min"], s["max"])))
    if d == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(s["min"]), math.log(s["max"]))))
    if d == "q_log_uniform_values":
        return quant(math.exp(rng.uniform(math.log(s["min"]), math.log(s["max"]))))
    if d == "inv_log_uniform":  # log(1/X) uniform between min and max
        return float(math.exp(-rng.uniform(s["min"], s["max"])))
    if d == "inv_log_uniform_values":  # 1/X log-uniform between 1/max and 1/min
        return float(1.0 / math.exp(rng.uniform(math.log(1 / s["max"]), math.log(1 / s["min"]))))
    if d in ("beta", "q_beta"):  # on [0, 1]; a and b 1 by default, as W&B's schema has them
        x = float(rng.beta(s.get("a", 1), s.get("b", 1)))
        return quant(x) if d == "q_beta" else x
    mu, sigma = s.get("mu", 0.0), s.get("sigma", 1.0)
    x = rng.normal(mu, sigma)
    if d == "normal":
        return float(x)
    if d == "q_normal":
        return quant(x)
    if d == "log_normal":
        return float(math.exp(x))
    return quant(math.exp(x))  # q_log_normal


def _quantised(x: float, q: int | float) -> int | float:
    """`x` rounded to a multiple of `q`, as W&B's q_ distributions give it: a whole number when `q` is one."""
    v = round(x / q) * q
    return int(v) if isinstance(q, int) else float(v)


def suggest_bayes(param: Param, trial) -> Any:
    """The same parameter as an Optuna suggestion, for TPE; a q_ distribution's value quantised as `sample_random`
    quantises it (TPE models the value before rounding)."""
    s, d = param.spec, param.distribution
    if d == "constant":
        return s["value"]
    if d == "categorical":
        return trial.suggest_categorical(param.key, s["values"])
    if d == "int_uniform":
        return trial.suggest_int(param.key, s["min"], s["max"])
    if d in ("uniform", "q_uniform"):
        x = trial.suggest_float(param.key, s["min"], s["max"])
    elif d in ("log_uniform", "q_log_uniform"):
        x = trial.suggest_float(param.key, math.exp(s["min"]), math.exp(s["max"]), log=True)
    elif d in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
        x = trial.suggest_float(param.key, s["min"], s["max"], log=True)
    elif d == "inv_log_uniform":
        x = trial.suggest_float(param.key, math.exp(-s["max"]), math.exp(-s["min"]), log=True)
    elif d in ("beta", "q_beta"):  # TPE searches its support, [0, 1]
        x = trial.suggest_float(param.key, 0.0, 1.0)
    else:
        raise ConfigError(f"bayes cannot sample {param.name} ({d})")
    return _quantised(x, s.get("q", 1)) if d.startswith("q_") else float(x)


# -- trials ----------------------------------------------------------------------------------
def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted config `key` (``train.learning_rate``) in a config held as data."""
    group, *rest = key.split(".")
    node = data.setdefault(group, {})
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value


def trial_config(base: Config, params: dict[str, Any], spec: SweepSpec) -> Config:
    data = base.to_dict()
    for key, value in params.items():
        _set_key(data, key, value)
    # keep the checkpoint that is best by the sweep's own metric
    data["train"]["metric_for_best_model"] = spec.metric
    return config_from_dict(data, origin="sweep trial " + json.dumps(params, default=str))


@dataclass
class TrialOutcome:
    number: int
    params: dict[str, Any]
    state: str  # complete | pruned | failed
    value: float | None = None
    run_id: str | None = None
    produced: list[str] = field(default_factory=list)
    error: str | None = None
    evaluations: int | None = None  # validation passes the trial ran (fewer when hyperband stopped it)
    loss: float | None = None  # the validation loss of the trial's kept checkpoint: breaks a tie of `value`

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "state": self.state, "value": self.value, "params": self.params,
                "run_id": self.run_id, "produced": self.produced, "evaluations": self.evaluations, "error": self.error,
                "loss": self.loss}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialOutcome:
        """What `to_dict` wrote."""
        return cls(int(d["trial"]), d.get("params") or {}, d.get("state") or "complete", value=d.get("value"),
                   run_id=d.get("run_id"), produced=d.get("produced") or [], error=d.get("error"),
                   evaluations=d.get("evaluations"), loss=d.get("loss"))


def better(spec: SweepSpec, outcome: TrialOutcome, than: TrialOutcome | None) -> bool:
    """Whether `outcome` beats `than` (None: no trial yet) on the sweep's metric; of two equal values, the
    lower validation loss wins (as between the checkpoints of one trial: `PreferLowerLossOnTies`), and
    with no loss to tell them apart, the earlier trial stays."""
    value = outcome.value
    if value is None or math.isnan(value):
        return False
    if than is None or than.value is None:
        return True
    if value == than.value:
        return outcome.loss is not None and than.loss is not None and outcome.loss < than.loss
    return value > than.value if spec.maximize else value < than.value


def train_trial(config: Config, spec: SweepSpec, number: int, params: dict[str, Any], *, dataset_ref: str, group: str,
                sweep_id: str, keep: Path | None, prune_trial=None, callbacks: tuple = (), adopt: bool = False,
                run=None, base_ref: str | None = None) -> TrialOutcome:
    """One trial: the finetune stage with `params` on the pinned dataset version (and base model version)."""
    from pipeline.redact import redact
    from pipeline.stages import finetune

    def failed(e: Exception) -> TrialOutcome:
        if run is not None:  # the agent's run for this trial, when the stage failed before it took the run over
            if not getattr(run, "_is_finished", False):  # as W&B itself tells a finished run
                run.summary.update(redact({"sweep/id": sweep_id, "sweep/trial": number, "sweep/error": str(e)}))
            run.finish(exit_code=1)  # failed, as W&B's sweep shows it (else finished, when the next run opens)
        return TrialOutcome(number, params, "failed", run_id=run.id if run is not None else None, error=str(e))

    try:
        cfg = trial_config(config, params, spec)
    except ConfigError as e:
        log.warning("sweep %s trial %d: invalid parameters, skipped: %s", sweep_id, number, e)
        return failed(e)
    from pipeline.callbacks import SweepMetricCallback

    metric_cb = SweepMetricCallback(spec.metric, prune_trial, alias=spec.metric_name, run=run, maximize=spec.maximize)
    try:
        result = finetune.run(cfg, group=group, dataset=dataset_ref, base=base_ref, callbacks=(metric_cb, *callbacks), aliases=(),
                              tags=("sweep",), keep_model=keep, adopt_wandb_run=adopt, sweep=sweep_id,
                              summary={"sweep/id": sweep_id, "sweep/trial": number,
                                       **{f"sweep/{k}": v for k, v in params.items()}})
    except (PipelineError, RuntimeError, ValueError) as e:  # one bad trial does not end the sweep
        log.warning("sweep %s trial %d failed: %s", sweep_id, number, e)
        return failed(e)
    value = result.metrics.get(f"eval_{spec.metric}")
    outcome = TrialOutcome(number, params, "pruned" if metric_cb.pruned else "complete", value=value,
                           run_id=result.run_id, produced=list(result.produced), evaluations=metric_cb.evaluations,
                           loss=result.metrics.get("eval_loss"))
    log.info("sweep %s trial %d: %s=%s (%s) %s", sweep_id, number, spec.metric_name, _number(value), outcome.state, params)
    return outcome


def keep_if_best(spec: SweepSpec, outcome: TrialOutcome, best: TrialOutcome | None, keep: Path | None,
                 best_dir: Path) -> None:
    """Only the best trial's model stays on disk (as `best_dir`); the others are removed."""
    if keep is None or not keep.exists():
        return
    if better(spec, outcome, best):
        shutil.rmtree(best_dir, ignore_errors=True)
        best_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(keep, best_dir)
        (best_dir / "trial.json").write_text(json.dumps(outcome.to_dict(), default=str) + "\n", encoding="utf-8")
    else:
        shutil.rmtree(keep, ignore_errors=True)


def _grid_todo(grid: list[dict[str, Any]], outcomes: list[TrialOutcome], since: int | None = None) -> list[dict[str, Any]]:
    """The grid points no finished (or pruned) trial has covered yet, in order. A point whose trial failed is tried
    again when the sweep is resumed (its trial was cut off, say), but not by the process it failed in, whose trials
    are numbered `since` and on: a trial that runs out of memory would fail the same way again, and take the
    trials of the points after it."""
    skip = {_grid_key(o.params) for o in outcomes if o.state in ("complete", "pruned")} | _failed_since(outcomes, since)
    return [g for g in grid if _grid_key(g) not in skip]


def _failed_since(outcomes: list[TrialOutcome], since: int | None) -> set[str]:
    return set() if since is None else {_grid_key(o.params) for o in outcomes if o.state == "failed" and o.number >= since}


def _grid_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _target_reached(spec: SweepSpec, value: float | None) -> bool:
    if spec.target is None or value is None:
        return False
    return value >= spec.target if spec.maximize else value <= spec.target


# -- the offline engine ----------------------------------------------------------------------
def _storage(config: Config) -> str:
    root = Path(config.tracking.dir).resolve() / "registry"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'sweeps.db'}"


def _evaluations_per_trial(config: Config) -> int | None:
    t = config.train
    if t.eval_strategy == "epoch" and t.max_steps is None:
        return max(1, math.ceil(t.epochs))
    return None


def _pruner(spec: SweepSpec, config: Config):
    import optuna

    if not spec.hyperband:
        return optuna.pruners.NopPruner()
    hb = spec.hyperband
    return optuna.pruners.HyperbandPruner(min_resource=_first_band(hb),
                                          max_resource=hb.get("max_iter", _evaluations_per_trial(config) or "auto"),
                                          reduction_factor=hb.get("eta", 3))


def _first_band(hb: dict[str, Any]) -> int:
    """The first evaluation at which hyperband compares trials. W&B counts its iterations in logged metric values:
    here, evaluations of the validation split. Given ``max_iter`` and ``s`` (and no ``min_iter``), W&B's bands are
    max_iter / eta, / eta**2, ... s of them, each at least 1: the first is the last of those."""
    if "min_iter" in hb or "max_iter" not in hb:
        return hb.get("min_iter", 1)
    eta, band = hb.get("eta", 3), hb["max_iter"]
    first = band
    for _ in range(hb["s"]):
        band /= eta
        if band < 1:
            break
        first = int(band)
    return first


def _sampler(spec: SweepSpec, seed: int):
    import optuna

    if spec.method == "bayes":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    return optuna.samplers.RandomSampler(seed=seed)  # bookkeeping only: random and grid draw W&B's way


def _outcomes(study) -> list[TrialOutcome]:
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False):
        state = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned",
                 optuna.trial.TrialState.FAIL: "failed"}.get(t.state, t.state.name.lower())
        a = t.user_attrs
        out.append(TrialOutcome(t.number, a.get("params") or {}, state, value=a.get("value"), run_id=a.get("run_id"),
                                produced=a.get("produced") or [], error=a.get("error"), evaluations=a.get("evaluations"),
                                loss=a.get("loss")))
    return out


def best_of(spec: SweepSpec, outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    best = None
    for o in outcomes:
        if o.state in ("complete", "pruned") and better(spec, o, best):
            best = o
    return best


def _one_process() -> None:
    """A sweep trains each trial in its own process. Under torchrun each process ran a sweep of its own (two sweeps,
    one traceback from their shared catalog), and a trial cannot train in several: its pruner stops it in one."""
    from pipeline.launch import launched_processes

    if (n := launched_processes()) > 1:
        raise ConfigError(f"a sweep trains each trial in one process, but a launcher (torchrun, accelerate launch, "
                          f"mpirun) started this one as one of {n}, each of which would run a sweep of its own: start it "
                          "with `python -m pipeline sweep ...`. To run trials side by side, run an online sweep's agents "
                          "side by side (`sweep --resume SWEEP_ID` in each, one per GPU with CUDA_VISIBLE_DEVICES)")


def run(config: Config, *, sweep: SweepSpec, count: int, resume: str | None = None, group: str | None = None,
        publish_trials: bool = False, callbacks: tuple = (), seed: int | None = None,
        on_failure: dict[str, Any] | None = None, dataset: str | None = None) -> SweepResult:
    """Run up to `count` trials of a new sweep, or `count` more of sweep `resume`, with the offline engine.

    `dataset`: the dataset version a new sweep's trials train on (default ``<dataset.name>:latest``), pinned to its
    ``vN`` when the sweep starts; a resumed sweep keeps the version it started on, and one named must be that one.

    `resume` ``"auto"``: the trials left of the count of the interrupted sweep that `_sweep_to_continue` finds (the
    same command, retried), else a new sweep. `on_failure` (a dict) gets ``resume``, the sweep id, once the sweep
    exists: what a failed sweep's result file tells."""
    _one_process()
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    from pipeline.tracking import new_run_id, open_registry

    # The sweep's folder is locked while this process runs it (`runlock`): a second process (an overlapping cron
    # job, a retry while this one is alive) neither continues it nor marks its running trial failed.
    with contextlib.ExitStack() as lock:
        if count < 1:
            raise ConfigError("--count must be at least 1")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        registry = open_registry(config.tracking, project=config.project, entity=config.entity, consuming=True)
        if registry.missing:  # nothing published with this tracking.dir: said before a sweeps catalog is made
            registry.resolve(dataset or f"{config.dataset.name}:latest", type="dataset")
        storage = _storage(config)
        registry.check_project(config.model.name)  # each trial publishes it: another project's, refused before the first
        more = resume not in (None, AUTO)  # --resume ID --count N: N more trials (auto: as many as the sweep has left)
        continued, auto = False, resume == AUTO  # continued: --resume auto goes on with an interrupted sweep
        if auto:
            resume, count = _sweep_to_continue(config, sweep, storage, registry, count, seed, dataset)
            continued = resume is not None
        if resume:
            try:
                attrs = optuna.load_study(study_name=resume, storage=storage).user_attrs
            except KeyError:
                names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
                raise RefError(f"no sweep {resume!r} under {config.tracking.dir}; sweeps: {', '.join(names) or 'none'}") from None
            if attrs.get("sweep") != sweep.raw:
                raise ConfigError(f"sweep {resume} was started with a different sweep config; resume it with the same file")
            changed = _unswept_changes(attrs.get("config") or config.to_dict(), config, sweep)
            if changed:
                raise ConfigError(f"cannot resume sweep {resume}: the config differs from the one it started with in "
                                  + describe_diff(changed)
                                  + "; its trials would not be comparable")
            sweep_id, dataset_ref, seed, base_ref = resume, attrs["dataset"], attrs["seed"], attrs.get("base")
            _check_pinned_dataset(sweep_id, dataset_ref, dataset, registry)
            if attrs.get("base_digest") and (now := base_pins(config, sweep, registry, base_ref)[1]) != attrs["base_digest"]:
                raise ConfigError(f"cannot resume sweep {sweep_id}: the base model {config.model.base} has other files "
                                  f"now (digest {now[:12]}) than the sweep began with ({attrs['base_digest'][:12]}); "
                                  "its trials would not be comparable")
            lock.enter_context(runlock.hold(sweep_folder(config, sweep_id), f"sweep {sweep_id}", doing="running"))
            study = optuna.load_study(study_name=sweep_id, storage=storage, sampler=_sampler(sweep, seed),
                                      pruner=_pruner(sweep, config))
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(t.number, state=TrialState.FAIL)  # it was running when the sweep stopped
                log.warning("sweep %s: trial %d was interrupted; marked failed", sweep_id, t.number)
            if more:  # what --resume auto counts down from; a sweep resumed after its end is unfinished again
                study.set_user_attr("count", _trials_run(study) + count)
                study.set_user_attr("finished", None)
        else:
            dataset_ref, base_ref, base_digest = _before_trials(config, sweep, registry, dataset)
            sweep_id = new_run_id()
            lock.enter_context(runlock.hold(sweep_folder(config, sweep_id), f"sweep {sweep_id}", doing="running"))
            # Each sweep draws its own trials, as W&B's do: a second sweep of the same config explores new points
            # instead of repeating the first one's. The seed is recorded, and `--seed` draws a sweep's trials again.
            seed = secrets.randbits(31) if seed is None else seed
            log.info("sweep %s started with seed %d (%s)", sweep_id, seed,
                     "a retry of this command continues it after an interruption" if auto
                     else f"continue it after an interruption with --resume {sweep_id}")
            study = optuna.create_study(study_name=sweep_id, storage=storage, sampler=_sampler(sweep, seed),
                                        pruner=_pruner(sweep, config),
                                        direction="maximize" if sweep.maximize else "minimize")
            for k, v in {"sweep": sweep.raw, "dataset": dataset_ref, "seed": seed, "config": config.to_dict(),
                         "count": count, "started": time.time(), **({"base": base_ref} if base_ref else {}),
                         **({"base_digest": base_digest} if base_digest else {})}.items():
                study.set_user_attr(k, v)
        if on_failure is not None:
            on_failure["resume"] = sweep_id
        group = group or f"sweep-{sweep_id}"
        work = sweep_folder(config, sweep_id)
        best_dir = work / "best"
        _remove_leftovers(config)  # once the checks have passed: a command refused changes nothing
        grid = sweep.grid() if sweep.method == "grid" else None
        stop_reason = f"count {study.user_attrs['count'] if continued else count} done"
        first = len(study.get_trials(deepcopy=False))  # the number of this process's first trial (`_grid_todo`)
        for _ in range(count):
            outcomes = _outcomes(study)
            best = best_of(sweep, outcomes)
            finished = [o for o in outcomes if o.state in ("complete", "pruned", "failed")]
            if sweep.run_cap is not None and len(finished) >= sweep.run_cap:
                stop_reason = f"run_cap {sweep.run_cap} reached"
                break
            if best is not None and _target_reached(sweep, best.value):
                stop_reason = f"metric target {sweep.target} reached by trial {best.number}"
                break
            if grid is not None:
                todo = _grid_todo(grid, outcomes, first)
                if not todo:
                    stop_reason = _grid_exhausted(grid, outcomes, first)
                    break
            trial = study.ask()
            if grid is not None:
                params = todo[0]
            elif sweep.method == "bayes":
                params = {p.key: suggest_bayes(p, trial) for p in sweep.params}
            else:
                rng = np.random.default_rng([seed, trial.number])  # a trial's draw depends on the sweep seed and its number only
                params = {p.key: sample_random(p, rng) for p in sweep.params}
            trial.set_user_attr("params", params)
            keep = None if publish_trials else work / f"trial-{trial.number}"
            outcome = train_trial(config, sweep, trial.number, params, dataset_ref=dataset_ref, group=group, sweep_id=sweep_id,
                                  keep=keep, prune_trial=trial if sweep.hyperband else None, callbacks=callbacks,
                                  base_ref=base_ref)
            for k in ("value", "run_id", "produced", "error", "evaluations", "loss"):
                trial.set_user_attr(k, getattr(outcome, k))
            keep_if_best(sweep, outcome, best, keep, best_dir)
            if outcome.state == "failed":
                study.tell(trial, state=TrialState.FAIL)
            elif outcome.state == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, outcome.value)
        else:
            outcomes = _outcomes(study)
            if grid is not None and not _grid_todo(grid, outcomes, first):
                stop_reason = _grid_exhausted(grid, outcomes, first)
        result = publish_best(config, sweep, sweep_id, group, dataset_ref, _outcomes(study), best_dir, stop_reason, seed)
        study.set_user_attr("finished", stop_reason)  # published: --resume auto starts the next sweep afresh
        return result


def _grid_exhausted(grid: list[dict[str, Any]], outcomes: list[TrialOutcome], since: int) -> str:
    failed_here = _failed_since(outcomes, since)
    failed = f"; {len(failed_here)} failed, tried again if the sweep is resumed" if failed_here else ""
    return f"grid exhausted ({len(grid)} combinations{failed})"


AUTO = "auto"  # --resume auto: an orchestrator's retry of the same command


def _unswept_changes(recorded: dict[str, Any], config: Config, sweep: SweepSpec) -> dict[str, tuple[Any, Any]]:
    """How `config` differs from the config a sweep's trials trained with (`recorded`), outside what may differ: the
    swept parameters, and ``dataset.*`` (the data is pinned by version, so those keys may move). Trials trained
    otherwise would not be comparable."""
    swept = {p.key for p in sweep.params}
    return {k: v for k, v in model_config_diff(recorded, config.to_dict()).items()
            if not k.startswith("dataset.") and k not in swept}


def sweep_folder(config: Config, sweep_id: str) -> Path:
    """Where a sweep keeps its best trial's model until it publishes it, and the lock of the process running it."""
    return Path(config.tracking.dir).resolve() / "sweeps" / sweep_id


AGENT = ".agent-"  # online: sweeps/<sweep id>.agent-<token>, the folder of one agent process of the sweep


def agent_folder(config: Config, sweep_id: str) -> Path:
    """Online: where this process keeps its trials' models. Several agents of one W&B sweep may run at once on one
    machine (one per GPU, as W&B suggests), so each has a folder of its own."""
    from pipeline.tracking import new_run_id

    return sweep_folder(config, f"{sweep_id}{AGENT}{new_run_id()}")


def sweep_of(folder: Path) -> str:
    """The sweep id of a folder under ``<tracking.dir>/sweeps`` (`sweep_folder` or `agent_folder`)."""
    return folder.name.split(AGENT, 1)[0]


def _publish_abandoned(config: Config, sweep: SweepSpec, sweep_id: str, group: str, dataset_ref: str) -> None:
    """Online: the best model so far of each agent of this sweep whose process was killed, published as that agent
    would have at its end (nothing else would: the sweep goes on in other agents, each with a folder of its own).
    It becomes the sweep's best only if it beats the one published, as at any agent's end. A live agent's folder
    is left alone."""
    for folder in sorted((Path(config.tracking.dir).resolve() / "sweeps").glob(f"{sweep_id}{AGENT}*")):
        try:
            with runlock.hold(folder, f"sweep {sweep_id} agent {folder.name}", doing="running"):
                for trial in folder.glob("trial-*"):  # a trial's model cut off while it was being kept
                    shutil.rmtree(trial, ignore_errors=True)
                try:
                    kept = TrialOutcome.from_dict(json.loads((folder / "best" / "trial.json").read_text(encoding="utf-8")))
                except FileNotFoundError:
                    continue  # killed before any trial of its ended
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("sweep %s: %s holds a model whose trial cannot be read (%s); left as it is", sweep_id,
                                folder, e)
                    continue
                log.info("sweep %s: publishing the best model (trial %d) of an agent whose process was killed, %s",
                         sweep_id, kept.number, folder)
                with runlock.exclusive(folder.parent):
                    publish_best(config, sweep, sweep_id, group, dataset_ref, [kept], folder / "best",
                                 f"its agent's process was killed; published by the next agent (pid {os.getpid()})")
        except runlock.RunBusy:
            continue  # an agent running now


def _remove_leftovers(config: Config) -> None:
    """What killed sweep processes left, before a sweep starts or goes on: the checkpoint folders of trials (never
    resumed) and sweep folders holding nothing but a free lock. A sweep or trial running now keeps its own."""
    from pipeline.stages.finetune import remove_trial_leftovers

    for run_id, sweep_id in remove_trial_leftovers(config):
        log.info("sweep %s: removed the checkpoints of trial run %s, whose process was killed", sweep_id, run_id)
    for folder in (Path(config.tracking.dir).resolve() / "sweeps").glob("*"):
        if runlock.remove_if_abandoned(folder):  # a sweep process killed before it kept a model left only its lock
            log.debug("removed %s: a sweep's folder that held nothing but its lock", folder)


def _trials_run(study) -> int:
    """Trials of the sweep that ran to their end (complete, pruned, or failed with an error of their own); not the
    ones cut off by an interruption, which `run` marks failed when the sweep goes on and which never got their
    outcome recorded (``run_id`` is set, None or not, for every trial that ended)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if "run_id" in t.user_attrs)


def _sweep_to_continue(config: Config, sweep: SweepSpec, storage: str, registry, count: int,
                       seed: int | None, dataset: str | None = None) -> tuple[str | None, int]:
    """`--resume auto`: (the newest unfinished sweep that this command started, the trials it has left of its count),
    else (None, `count`): a new sweep. This command's sweep: the same sweep file, the same config but for the swept
    keys and ``dataset.*``, the dataset version (and base model version) a new sweep would pin now, so that a
    retry the next day, after new data, does not go on with yesterday's sweep, and the `seed` when one is given."""
    import optuna

    studies = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
               if "count" in s.user_attrs and not s.user_attrs.get("finished")]
    if not studies:
        return None, count
    dataset_ref = registry.resolve(dataset or f"{config.dataset.name}:latest", type="dataset").ref
    base_ref, digest = base_pins(config, sweep, registry)
    passed = []  # why each unfinished sweep is not this command's: said when none is
    for summary in sorted(studies, key=lambda s: s.user_attrs.get("started", 0), reverse=True):
        attrs, name = summary.user_attrs, summary.study_name
        changed = _unswept_changes(attrs.get("config") or {}, config, sweep)
        if attrs.get("sweep") != sweep.raw:
            passed.append(f"{name}: another sweep file")
        elif (busy := runlock.holder(sweep_folder(config, name))) is not None:  # not interrupted: another process runs it
            passed.append(f"{name}: running now ({runlock.describe(busy)})")
        elif attrs.get("dataset") != dataset_ref:
            passed.append(f"{name}: sweeps {attrs.get('dataset')}")
        elif attrs.get("base") != base_ref:
            passed.append(f"{name}: trains {attrs.get('base')}")
        elif changed:
            passed.append(f"{name}: config differs in {describe_diff(changed)}")
        elif attrs.get("base_digest") and attrs["base_digest"] != digest:
            passed.append(f"{name}: its base model's files changed since it began")
        elif seed is not None and attrs.get("seed") != seed:
            passed.append(f"{name}: drawn from seed {attrs.get('seed')}")
        else:
            done = _trials_run(optuna.load_study(study_name=name, storage=storage))
            left = max(0, attrs["count"] - done)
            log.info("continuing interrupted sweep %s (--resume auto): %d of its %d trials ran, %d to go", name, done,
                     attrs["count"], left)
            return name, left
    if len(passed) > 5:  # the newest; abandoned sweeps stay unfinished
        passed[5:] = [f"{len(passed) - 5} older"]
    log.info("no interrupted sweep of this sweep file, config and %s: starting a new one (--resume auto)%s", dataset_ref,
             f" ({'; '.join(passed)})" if passed else "")
    return None, count


# -- online: W&B sweeps and agents -----------------------------------------------------------
DATASET_PARAM = "pipeline_dataset"  # the pinned dataset version rides in the sweep config as a constant
BASE_PARAM = "pipeline_base"  # and so does a base model version from the registry, or a hub commit (`base_pins`)


def _before_trials(config: Config, sweep: SweepSpec, registry,
                   dataset: str | None = None) -> tuple[str, str | None, str | None]:
    """Everything a trial needs, checked before the first one starts, so that a problem fails the sweep once,
    not each trial: the exact dataset version every trial trains on (`dataset`, default ``<dataset.name>:latest``;
    one finetune can train on), the base model's pin and digest (`base_pins`), and the config of each grid point.
    (dataset ref, base pin or None, base digest or None)"""
    from pipeline.stages import finetune

    version = registry.resolve(dataset or f"{config.dataset.name}:latest", type="dataset")
    finetune.check_trainable(version)
    base_ref, base_digest = base_pins(config, sweep, registry)
    if sweep.method == "grid":
        for combo in sweep.grid():
            trial_config(config, combo, sweep)
    else:
        check_values(config, sweep)
    return version.ref, base_ref, base_digest


class _End:
    """Stands in for a random generator in `sample_random` to give the low (or high) end of a distribution as it
    is sampled (its transform and quantisation included); a normal distribution gives its mean."""

    def __init__(self, high: bool):
        self.high = high

    def uniform(self, low, high):
        return high if self.high else low

    def integers(self, low, high):  # high is exclusive, as NumPy's
        return high - 1 if self.high else low

    def normal(self, mu, sigma):
        return mu

    def beta(self, a, b):
        return 1.0 if self.high else 0.0


PROBES = 8  # draws of each distribution checked, besides its ends


def check_values(config: Config, sweep: SweepSpec, seed: int = 0) -> None:
    """A random or bayes sweep's parameters give values the config accepts: each listed value, each end of a range
    and a few draws, each with the config's other settings. A value no trial can use (a batch size of 0, a float
    batch size from ``min: 8.0``) fails the sweep before it starts, not every trial it is drawn in. Only a problem
    with the parameter's own key counts: one that depends on another parameter's value (``eval_steps`` with
    ``eval_strategy: steps``) is the trial's to report."""
    import numpy as np
    from pydantic import ValidationError

    rng = np.random.default_rng(seed)
    base = config.to_dict()
    for param in sweep.params:
        if param.distribution == "categorical":
            values = list(param.spec["values"])
        else:
            values = [sample_random(param, _End(False)), sample_random(param, _End(True)),
                      *(sample_random(param, rng) for _ in range(PROBES if param.distribution != "constant" else 0))]
        key = tuple(param.key.split("."))
        for value in values:
            data = json.loads(json.dumps(base))
            _set_key(data, param.key, value)
            try:
                Config.model_validate(data)
            except ValidationError as e:
                own = [err for err in e.errors() if tuple(map(str, err["loc"]))[:len(key)] == key]
                if own:
                    said = own[0]["msg"].removeprefix("Value error, ")
                    if own[0]["type"] == "int_from_float":
                        said += " (int_uniform, q_uniform with a whole q, or values give whole numbers)"
                    raise ConfigError(f"sweep parameter {param.name} ({param.distribution}) gives {param.key}={value!r}, "
                                      f"which no trial can train with: {said}") from None


def _check_pinned_dataset(sweep_id: str, pinned: str, dataset: str | None, registry) -> None:
    """A resumed sweep trains on the dataset version it started on: `dataset` (``--dataset``), when given, must name
    that version, or its trials would not be comparable."""
    if dataset is None:
        return
    given = registry.resolve(dataset, type="dataset").ref
    if given != pinned:
        raise ConfigError(f"sweep {sweep_id} trains on {pinned}, and --dataset {dataset} "
                          + (f"names {given}" if given != dataset else "is another version")
                          + f"; resume it without --dataset, or start a new sweep on {given}")


def base_pins(config: Config, sweep: SweepSpec, registry, pinned: str | None = None) -> tuple[str | None, str | None]:
    """(pin, digest) of the base model every trial starts from, resolved once for the whole sweep (`pinned`: the pin
    a sweep recorded, for a resumed one). The pin: the exact ``name:vN`` of a registry reference (``model.base:
    clf:production``) or the commit a hub model is at, so that every trial trains from the same one even if the alias
    moves, or the hub model gets a new commit, meanwhile; None for a folder or the packaged model. The digest of its
    files (a hub model downloaded here once, before the trials, which then find it in the cache), recorded so that a
    resumed sweep goes on from the same files; None for a registry version, whose pin fixes its files. (None, None)
    when the base is itself swept."""
    from pipeline.basemodel import is_registry_ref, registry_base, resolve_base_model

    if "model.base" in {p.key for p in sweep.params}:
        return None, None
    if is_registry_ref(config.model.base):
        return registry_base(config.model.base, registry, pinned).ref, None
    base = resolve_base_model(config.model.base, pinned=pinned, trust_remote_code=config.model.trust_remote_code)
    return (base.revision if base.source == "hub" else None), base.digest


def _online_sweep_pins(started: dict[str, Any], sweep: SweepSpec, path: str) -> tuple[str, str | None]:
    """An online sweep resumed by id: (the dataset version, the base model version or None) it pinned when it started,
    from its config in W&B. W&B's controller draws the trials from that config, and this process reads them with
    the sweep file it was given, so the two must name the same parameters and the same metric: a parameter only W&B
    knows would be dropped from every trial unseen, and another metric would rank the trials otherwise."""
    params = started.get("parameters") or {}
    if DATASET_PARAM not in params:
        raise ConfigError(f"W&B sweep {path} was not started by `pipeline sweep` (its config has no {DATASET_PARAM} "
                          "parameter, the dataset version its trials train on); start a new sweep without --resume")
    theirs = sorted(k for k in params if k not in (DATASET_PARAM, BASE_PARAM))
    ours = sorted(p.name for p in sweep.params)
    metric = started.get("metric") or {}
    said = []
    if theirs != ours:
        said.append(f"parameters {', '.join(theirs)} in W&B, {', '.join(ours)} in the sweep file")
    if (metric.get("name"), metric.get("goal", "minimize")) != (sweep.metric_name, sweep.goal):
        said.append(f"metric {metric.get('name')} ({metric.get('goal', 'minimize')}) in W&B, {sweep.metric_name} "
                    f"({sweep.goal}) in the sweep file")
    if said:
        raise ConfigError(f"W&B sweep {path} was started with another sweep config: " + "; ".join(said)
                          + "; resume it with the file it was started with")
    return params[DATASET_PARAM]["value"], (params.get(BASE_PARAM) or {}).get("value")


def _check_online_config(config: Config, sweep: SweepSpec, runs: list, path: str) -> None:
    """An online sweep resumed by id: the config outside the swept keys and ``dataset.*`` must be the one its trials
    trained with (each trial's run records it), so that the trials stay comparable, as an offline resume requires."""
    fields = set(Config.model_fields)
    trained = next(({k: v for k, v in run.config.items() if k in fields} for run in runs
                    if isinstance(run.config.get("train"), dict)), None)
    if trained is None:  # no trial got as far as recording its config
        return
    changed = _unswept_changes(trained, config, sweep)
    if changed:
        raise ConfigError(f"cannot resume W&B sweep {path}: the config differs from the one its trials trained with in "
                          + describe_diff(changed) + "; its trials would not be comparable")


def run_online(config: Config, *, sweep: SweepSpec, count: int, resume: str | None = None, group: str | None = None,
               publish_trials: bool = False, callbacks: tuple = (), on_failure: dict[str, Any] | None = None,
               dataset: str | None = None) -> SweepResult:
    """``wandb.sweep`` + ``wandb.agent``; each trial runs the finetune stage in this process, on a thread the agent
    starts for it. `callbacks`, `on_failure` and `dataset`: as `run`'s."""
    _one_process()
    import wandb

    from pipeline.tracking import open_registry, run_settings, wandb_root

    registry = open_registry(config.tracking, project=config.project, entity=config.entity)
    first = 0  # the number of this call's first trial: after the runs the sweep has when resumed
    if resume:
        sweep_id = resume
        path = f"{config.entity or wandb.Api().default_entity}/{config.project}/{sweep_id}"
        try:
            api_sweep = wandb.Api().sweep(path)
        except (wandb.errors.CommError, ValueError) as e:
            raise RefError(f"no W&B sweep {path}: {e}") from None
        runs = list(api_sweep.runs or [])
        dataset_ref, base_ref = _online_sweep_pins(api_sweep.config or {}, sweep, path)
        _check_pinned_dataset(path, dataset_ref, dataset, registry)
        _check_online_config(config, sweep, runs, path)
        first = len(runs)
    else:
        dataset_ref, base_ref, _ = _before_trials(config, sweep, registry, dataset)
        raw = json.loads(json.dumps(sweep.raw))
        raw["parameters"][DATASET_PARAM] = {"value": dataset_ref}
        if base_ref:
            raw["parameters"][BASE_PARAM] = {"value": base_ref}
        sweep_id = wandb.sweep(raw, project=config.project, entity=config.entity)
    if on_failure is not None:
        on_failure["resume"] = sweep_id
    group = group or f"sweep-{sweep_id}"
    work = agent_folder(config, sweep_id)  # this agent's own: others of the sweep may run beside it
    best_dir = work / "best"
    by_name = {p.name: p.key for p in sweep.params}
    outcomes: list[TrialOutcome] = []

    def trial() -> None:
        # the agent hands this run its parameters; its folder and settings are every other run's
        run = wandb.init(group=group, job_type="finetune", dir=wandb_root(config), settings=run_settings(config))
        params = {by_name[k]: v for k, v in dict(run.config).items() if k in by_name}
        number = first + len(outcomes)
        keep = None if publish_trials else work / f"trial-{number}"
        try:
            outcome = train_trial(config, sweep, number, params, dataset_ref=dataset_ref, group=group, sweep_id=sweep_id,
                                  keep=keep, adopt=True, run=run, base_ref=base_ref, callbacks=callbacks)
        except Exception as e:
            # What the agent raises in this thread to stop the run (W&B's hyperband, or Stop in its UI: a bare
            # Exception), or an error of the stage's own: the trial counts as failed, its model goes, and the agent,
            # which tells the two apart, gets it.
            log.warning("sweep %s trial %d stopped: %s", sweep_id, number, str(e) or type(e).__name__)
            outcomes.append(TrialOutcome(number, params, "failed", run_id=run.id, error=str(e) or type(e).__name__))
            if keep is not None:
                shutil.rmtree(keep, ignore_errors=True)
            raise
        keep_if_best(sweep, outcome, best_of(sweep, outcomes), keep, best_dir)
        outcomes.append(outcome)

    with runlock.hold(work, f"sweep {sweep_id} agent {work.name}", doing="running"):
        _publish_abandoned(config, sweep, sweep_id, group, dataset_ref)
        _remove_leftovers(config)
        wandb.agent(sweep_id, function=trial, count=count, project=config.project, entity=config.entity)
        # The agent ends before the count when W&B has no more runs for it (a grid done, run_cap reached, the sweep
        # stopped or deleted), after runs that failed one after another, or on Ctrl-C.
        stop_reason = f"count {count} done" if len(outcomes) >= count else \
            f"W&B's agent ended after {len(outcomes)} of {count} trials"
        # One agent at a time compares its best with the sweep's published one and publishes: two that end together
        # would otherwise both find theirs better than the one before, and the last to set the aliases would win.
        with runlock.exclusive(work.parent):
            return publish_best(config, sweep, sweep_id, group, dataset_ref, outcomes, best_dir, stop_reason)


# -- the end of a sweep ----------------------------------------------------------------------
@dataclass
class SweepResult:
    sweep_id: str
    status: str
    best: TrialOutcome | None
    best_config: dict[str, Any] | None
    best_model: str | None
    trials: list[TrialOutcome]
    stop_reason: str
    dataset: str
    run_id: str | None = None
    run_dir: str | None = None
    seed: int | None = None  # the offline engine's: the same seed draws the same trials
    metric_name: str = "value"  # the sweep's metric, as its file writes it (val/loss)

    def _stopped(self) -> str:
        """Said of a best trial that hyperband stopped: its config run as it is (best_config) trains longer."""
        if self.best is None or self.best.state != "pruned":
            return ""
        n = self.best.evaluations
        return (f"; the pruner stopped it after {n} evaluation{'s' if n != 1 else ''}" if n else
                "; the pruner stopped it") + ", so its config run in full trains longer"

    def to_stage_result(self):
        from pipeline.results import StageResult

        return StageResult(
            stage="sweep", status=self.status, run_id=self.run_id, consumed=[self.dataset],
            produced=[self.best_model] if self.best_model else [],
            metrics={"best_value": self.best.value} if self.best else {},
            paths={"run_dir": self.run_dir or ""},
            message=f"sweep {self.sweep_id}: {self.stop_reason}; "
                    + (f"best trial {self.best.number} ({self.metric_name} {_number(self.best.value)}{self._stopped()}) "
                       f"-> {self.best_model}" if self.best else "no trial finished"),
            details={"sweep_id": self.sweep_id, "stop_reason": self.stop_reason, "seed": self.seed,
                     "best_trial": self.best.number if self.best else None,
                     "best_params": self.best.params if self.best else {}, "best_config": self.best_config,
                     "best_model": self.best_model, "trials": [t.to_dict() for t in self.trials]},
        )


def publish_best(config: Config, sweep: SweepSpec, sweep_id: str, group: str, dataset_ref: str,
                 outcomes: list[TrialOutcome], best_dir: Path, stop_reason: str, seed: int | None = None) -> SweepResult:
    """A sweep run: the trials table, and the best trial's model published with its aliases."""
    import wandb

    from pipeline.tracking import tracked_run

    best = best_of(sweep, outcomes)
    best_model = None
    with tracked_run(config, "sweep", group=group, tags=("sweep",)) as trun:
        trun.registry.use(dataset_ref, trun, type="dataset")
        keys = [p.key for p in sweep.params]
        loss = sweep.metric != "loss"  # the tie-break, shown beside the metric (unless it is the metric)
        trun.log({"sweep/trials": wandb.Table(
            columns=["trial", "state", sweep.metric_name, *(["validation_loss"] if loss else []), *keys, "run_id"],
            data=[[o.number, o.state, o.value, *([o.loss] if loss else []), *[_cell(o.params.get(k)) for k in keys],
                   o.run_id] for o in outcomes])})
        aliases = ["candidate", f"sweep-{sweep_id}-best"]
        # What an earlier call of this sweep published as its best: an online sweep resumed by id sees only its own
        # trials, and one resumed after its end has no model folder left of the trials before
        earlier_ref, earlier = published_best(trun.registry, config.model.name, sweep_id)
        if best is not None and earlier is not None and earlier_ref not in best.produced and not better(sweep, best, earlier):
            log.info("sweep %s: the model it published before, %s (trial %d, %s %s), is still its best", sweep_id,
                     earlier_ref, earlier.number, sweep.metric_name, _number(earlier.value))
            best, best_model = earlier, earlier_ref
            for alias in aliases:
                trun.registry.set_alias(best_model, alias)
        elif best is not None and best.produced:  # trials published their own models: tag the best one
            best_model = best.produced[0]
            # what `published_best` reads, as on a version this publishes itself
            trun.registry.update_metadata(best_model, {"sweep": _sweep_record(sweep_id, sweep, best)})
            for alias in aliases:
                trun.registry.set_alias(best_model, alias)
        elif best is not None and (best_dir / "model").is_dir():
            meta = json.loads((best_dir / "metadata.json").read_text(encoding="utf-8"))
            base = meta.get("base_model") or {}
            if base.get("source") == "registry":  # the model version the best trial trained further
                trun.registry.use(base["id"], trun, type="model")
            meta["sweep"] = _sweep_record(sweep_id, sweep, best)
            best_model = trun.registry.publish(config.model.name, "model", best_dir / "model", metadata=meta,
                                               aliases=aliases, run=trun).ref
        elif best is not None:
            log.warning("sweep %s: the model of its best trial (%d) is neither on disk nor published; nothing to publish",
                        sweep_id, best.number)
        trun.set_summary(**{"sweep/id": sweep_id, "sweep/best_trial": best.number if best else None,
                            f"sweep/best/{sweep.metric_name}": best.value if best else None,
                            "sweep/best_model": best_model, "sweep/stop_reason": stop_reason,
                            "sweep/trial_count": len(outcomes), **({"sweep/seed": seed} if seed is not None else {})})
    # The version holds the best model now: its folder (hundreds of MB) goes, and the sweep's folder with it when
    # empty (every other trial's model went as the trial ended)
    shutil.rmtree(best_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        best_dir.parent.rmdir()
    best_config = trial_config(config, best.params, sweep).to_dict() if best else None
    return SweepResult(sweep_id=sweep_id, status="ok" if best else "failed", best=best, best_config=best_config,
                       best_model=best_model, trials=outcomes, stop_reason=stop_reason, dataset=dataset_ref,
                       run_id=trun.id, run_dir=str(trun.wandb_dir) if trun.wandb_dir else None, seed=seed,
                       metric_name=sweep.metric_name)


def kept_models(tracking_dir: Path | str) -> list[dict[str, Any]]:
    """The folders sweeps keep under ``<tracking.dir>/sweeps``, newest first: the best trial's model so far of a sweep
    that has not published it (one running now, or interrupted: it stays until the sweep goes on and publishes).
    Sweep id, model name, best trial and its value, bytes on disk, when last written, folder, and the process
    running the sweep now (`runlock.holder`; None: it was interrupted)."""
    from pipeline.stages.finetune import disk_usage

    out = []
    for folder in Path(tracking_dir).resolve().glob("sweeps/*"):
        if not folder.is_dir() or (usage := disk_usage(folder)) is None or runlock.only_the_lock(folder):  # no model kept (yet)
            continue
        trial, meta = {}, {}
        with contextlib.suppress(OSError, ValueError):
            trial = json.loads((folder / "best" / "trial.json").read_text(encoding="utf-8"))
            meta = json.loads((folder / "best" / "metadata.json").read_text(encoding="utf-8"))
        out.append({"sweep": sweep_of(folder), "model": ((meta.get("config") or {}).get("model") or {}).get("name"),
                    "trial": trial.get("trial"), "value": trial.get("value"), "path": str(folder),
                    "running": runlock.holder(folder), **usage})
    return sorted(out, key=lambda r: r["modified"], reverse=True)


def _sweep_record(sweep_id: str, sweep: SweepSpec, best: TrialOutcome) -> dict[str, Any]:
    """``metadata.sweep`` of the version a sweep publishes or tags as its best."""
    return {"id": sweep_id, "trial": best.number, "metric": sweep.metric_name, "value": best.value, "loss": best.loss,
            "params": best.params}


def published_best(registry, name: str, sweep_id: str) -> tuple[str | None, TrialOutcome | None]:
    """The version this sweep published as its best (alias ``sweep-<id>-best``), and its trial as it recorded it;
    (None, None) when there is none."""
    try:
        version = registry.resolve(f"{name}:sweep-{sweep_id}-best", type="model")
    except RefError:
        return None, None
    meta = version.metadata.get("sweep") or {}
    if meta.get("value") is None:  # a trial's own version tagged before it recorded its outcome there
        return None, None
    return version.ref, TrialOutcome(meta.get("trial", -1), meta.get("params") or {}, "complete", value=meta["value"],
                                     run_id=(version.metadata.get("training") or {}).get("run_id"),
                                     loss=meta.get("loss"))


def _number(value: float | None) -> str:
    """A metric as people read it: four significant digits (0.1777, 1.234e-05)."""
    return "-" if value is None else f"{value:.4g}"


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
