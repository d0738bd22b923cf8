"""Lineage of an artifact version: who made it from what (upstream) and who used it for what (downstream).

The graph is read from the registry, never assumed: a version names the run that produced
it, a run names the versions it consumed and produced, and a version lists the runs that
used it. Offline that is the local registry's catalog; online the same questions go to W&B
(``logged_by``, ``used_by``, ``used_artifacts``, ``logged_artifacts``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import RefError
from pipeline.registry.base import ArtifactVersion, Registry


@dataclass
class Graph:
    root: str
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)  # ("artifact:x:v0", "run:id") = input, reverse = output
    upstream: list[dict[str, Any]] = field(default_factory=list)  # trees for text output
    downstream: list[dict[str, Any]] = field(default_factory=list)
    reproductions: list[dict[str, Any]] = field(default_factory=list)  # the root's rebuilds (`reproduce`), oldest first
    alias_moves: list[dict[str, Any]] = field(default_factory=list)  # aliases moved on the root by hand, oldest first

    def edge(self, src: str, dst: str) -> None:
        if (src, dst) not in self.edges:
            self.edges.append((src, dst))

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "artifacts": list(self.artifacts.values()),
            "runs": list(self.runs.values()),
            "edges": [{"from": a, "to": b, "kind": "input" if a.startswith("artifact:") else "output"} for a, b in self.edges],
            "upstream": self.upstream,
            "downstream": self.downstream,
            "reproductions": self.reproductions,
            "alias_moves": self.alias_moves,
        }


def _run_summary(run: dict[str, Any]) -> str:
    cfg, summary = run.get("config") or {}, run.get("summary") or {}
    job = run.get("job_type")
    if job == "dataset-publish":
        d = cfg.get("dataset") or {}
        if d.get("split_files"):  # then `source` only names the dataset: the split files are what was read
            return ", ".join(f"{s}={d['split_files'].get(s)}" for s in ("train", "validation", "test"))
        return f"source={d.get('source')}"
    if job == "finetune":
        t, m = cfg.get("train") or {}, cfg.get("model") or {}
        epochs = t.get("epochs")  # a float in the config (fractions allowed): 3, not 3.0
        epochs = int(epochs) if isinstance(epochs, float) and epochs.is_integer() else epochs
        parts = [f"base={m.get('base')}", f"epochs={epochs}", f"lr={t.get('learning_rate')}",
                 f"batch={t.get('batch_size')}", f"seed={t.get('seed')}"]
        if "reproduces" in summary:
            parts.append(f"reproduces={summary['reproduces']}")
        if summary.get("reused"):  # trained nothing: a version trained before from the same inputs
            parts.append(f"reused {summary['reused']} (trained before from the same inputs)")
        return ", ".join(parts)
    # a run that failed before it decided or deployed anything shows only its state ("failed"), not "gate: ?"
    if job == "evaluate":
        return f"gate: {summary['gate/outcome']}" if summary.get("gate/outcome") else ""
    if job == "deploy-fetch":
        return f"deployed to {summary['deploy/dir']}" if summary.get("deploy/dir") else ""
    return ""


class _Walker:
    def __init__(self, registry: Registry, graph: Graph):
        self.registry = registry
        self.graph = graph
        self._runs: dict[str, dict[str, Any] | None] = {}
        self._versions: dict[str, ArtifactVersion] = {}

    def version(self, ref: str) -> ArtifactVersion:
        if ref not in self._versions:
            v = self.registry.resolve(ref, include_deleted=True)  # a deleted version is still part of the history
            self._versions[ref] = v
            self.graph.artifacts.setdefault(v.ref, {
                "ref": v.ref, "type": v.type, "aliases": sorted(v.aliases), "digest": v.digest,
                "created_at": v.created_at, "produced_by": v.produced_by, "used_by": list(v.used_by),
                **({"deleted_at": v.deleted_at} if v.deleted_at else {}),
            })
        return self._versions[ref]

    def run(self, run_id: str) -> dict[str, Any] | None:
        if run_id not in self._runs:
            try:
                r = self.registry.get_run(run_id)
            except RefError:
                r = None  # a run the registry never recorded (e.g. logged elsewhere)
            self._runs[run_id] = r
            if r is not None:
                self.graph.runs[run_id] = {
                    "id": run_id, "job_type": r.get("job_type"), "status": r.get("status"), "group": r.get("run_group"),
                    "started_at": r.get("started_at"), "summary": _run_summary(r),
                    "consumed": list(r.get("consumed") or []), "produced": list(r.get("produced") or []),
                }
        return self._runs[run_id]

    def up(self, ref: str, depth: int) -> list[dict[str, Any]]:
        v = self.version(ref)
        if depth <= 0 or not v.produced_by:
            return []
        run = self.run(v.produced_by)
        self.graph.edge(f"run:{v.produced_by}", f"artifact:{v.ref}")
        node = {"run": v.produced_by, "inputs": []}
        for inp in (run or {}).get("consumed") or []:
            iv = self.version(inp)
            self.graph.edge(f"artifact:{iv.ref}", f"run:{v.produced_by}")
            node["inputs"].append({"artifact": iv.ref, "upstream": self.up(iv.ref, depth - 1)})
        return [node]

    def down(self, ref: str, depth: int) -> list[dict[str, Any]]:
        v = self.version(ref)
        if depth <= 0:
            return []
        out = []
        for run_id in v.used_by:
            run = self.run(run_id)
            self.graph.edge(f"artifact:{v.ref}", f"run:{run_id}")
            node = {"run": run_id, "outputs": []}
            for produced in (run or {}).get("produced") or []:
                pv = self.version(produced)
                self.graph.edge(f"run:{run_id}", f"artifact:{pv.ref}")
                node["outputs"].append({"artifact": pv.ref, "downstream": self.down(pv.ref, depth - 1)})
            out.append(node)
        return out


def build(registry: Registry, ref: str, depth: int = 5) -> Graph:
    root = registry.resolve(ref, include_deleted=True)
    graph = Graph(root=root.ref)
    walker = _Walker(registry, graph)
    walker.version(root.ref)
    graph.upstream = walker.up(root.ref, depth)
    graph.downstream = walker.down(root.ref, depth)
    graph.reproductions = list(root.metadata.get("reproductions") or [])
    graph.alias_moves = list(root.metadata.get("alias_moves") or [])
    return graph


# -- output ----------------------------------------------------------------------------------
def _artifact_line(g: Graph, ref: str) -> str:
    a = g.artifacts[ref]
    aliases = f"  aliases: {', '.join(a['aliases'])}" if a["aliases"] else ""
    deleted = f"  DELETED {a['deleted_at'][:19]}" if a.get("deleted_at") else ""
    return f"{ref}  {a['type']}{aliases}  digest {a['digest'][:12]}{deleted}"


def _run_line(g: Graph, run_id: str) -> str:
    r = g.runs.get(run_id)
    if r is None:
        return f"run {run_id}  (not recorded in this registry)"
    group = f"  group {r['group']}" if r.get("group") else ""
    extra = f"  {r['summary']}" if r.get("summary") else ""
    return f"run {run_id}  {r['job_type']}  {r['status']}{group}{extra}"


def to_text(g: Graph) -> str:
    lines = [_artifact_line(g, g.root)]

    def tree(items: list[tuple[str, Any]], prefix: str) -> None:
        for i, (label, children) in enumerate(items):
            last = i == len(items) - 1
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{label}")
            tree(children, prefix + ("   " if last else "│  "))

    def up_items(nodes) -> list[tuple[str, Any]]:
        return [(_run_line(g, n["run"]), [(_artifact_line(g, i["artifact"]), up_items(i["upstream"])) for i in n["inputs"]])
                for n in nodes]

    def down_items(nodes) -> list[tuple[str, Any]]:
        return [(_run_line(g, n["run"]), [(_artifact_line(g, o["artifact"]), down_items(o["downstream"]))
                                          for o in n["outputs"]]) for n in nodes]

    lines.append("upstream (made from)")
    if g.upstream:
        tree(up_items(g.upstream), "")
    else:
        lines.append("   (nothing recorded: published outside a run)")
    lines.append("downstream (used by)")
    if g.downstream:
        tree(down_items(g.downstream), "")
    else:
        lines.append("   (not used by any run yet)")
    if g.reproductions:
        lines.append("reproduced (reproduce)")
        tree([(f"run {r.get('run')}  {str(r.get('at'))[:19]}  {_reproduction(r)}", []) for r in g.reproductions], "")
    if g.alias_moves:
        lines.append("aliases moved by hand (artifacts alias, unalias)")
        tree([(_alias_move(m), []) for m in g.alias_moves], "")
    return "\n".join(lines) + "\n"


def _alias_move(move: dict[str, Any]) -> str:
    """One alias moved by hand (`artifacts alias` or `unalias` records it in the version's metadata) in words."""
    if move.get("removed"):
        what = f"{move.get('alias')} taken off"
    else:
        what = f"{move.get('alias')} set ({'from ' + move['from'] if move.get('from') else 'on no version before'})"
    why = f"  {move['reason']}" if move.get("reason") else ""
    return f"{what}  {str(move.get('at'))[:19]}  {move.get('by')}{why}"


def _reproduction(record: dict[str, Any]) -> str:
    """One reproduction's outcome (`reproduce` records it in the original's metadata) in words."""
    version = record.get("version")
    if record.get("same_digest"):
        return f"{version}: bit for bit (same digest)"
    if record.get("same_weights") and record.get("matches"):
        return f"{version}: the same weights, other files differ"
    if record.get("matches"):
        return f"{version}: matches within {record.get('tolerance')} (weights differ)"
    return (f"{version}: differs (largest metric difference {record.get('max_abs_metric_delta', 0):.4g}; "
            f"{record.get('test_predictions_differ')} of {record.get('test_rows')} {record.get('split', 'test')} "
            "predictions differ)")


class _MermaidIds:
    """Mermaid node ids: the node's name with every other character as `_` (`artifact_clf_v0`), readable in the
    source. Names that differ only there (`tickets-v2:v0` and `tickets_v2:v0`) would be one node, their edges
    merged: the later one gets `_2` (`_3`, ...) until its id is free."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, node: str) -> str:
        if node not in self._ids:
            base = candidate = re.sub(r"[^A-Za-z0-9_]", "_", node)
            n = 1
            while candidate in self._taken:
                n += 1
                candidate = f"{base}_{n}"
            self._ids[node] = candidate
            self._taken.add(candidate)
        return self._ids[node]


def to_mermaid(g: Graph) -> str:
    mid = _MermaidIds()
    lines = ["flowchart LR"]
    for ref, a in g.artifacts.items():
        aliases = f"<br/>{', '.join(a['aliases'])}" if a["aliases"] else ""
        aliases += "<br/>deleted" if a.get("deleted_at") else ""
        lines.append(f'  {mid("artifact:" + ref)}[("{ref}<br/>{a["type"]}{aliases}")]')
    for run_id, r in g.runs.items():
        lines.append(f'  {mid("run:" + run_id)}(["{r["job_type"]}<br/>run {run_id}<br/>{r["status"]}"])')
    for src, dst in g.edges:
        for node in (src, dst):
            if node.startswith("run:") and node[4:] not in g.runs:
                lines.append(f'  {mid(node)}(["run {node[4:]}"])')
        lines.append(f"  {mid(src)} --> {mid(dst)}")
    lines.append(f"  style {mid('artifact:' + g.root)} stroke-width:3px")
    return "\n".join(dict.fromkeys(lines)) + "\n"


def render(g: Graph, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(g.to_dict(), indent=2) + "\n"
    if fmt == "mermaid":
        return to_mermaid(g)
    return to_text(g)
