"""``pipeline artifacts list | show REF | diff A B | verify | alias REF ALIAS | unalias NAME:ALIAS | delete REF |
prune NAME --keep N``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments

    # `artifacts --config c.yaml list` as well as `artifacts list --config c.yaml`: kept apart (argparse lets an
    # action's own defaults overwrite what was given before it) and joined in `_joined`.
    p.add_argument("--config", dest="config_before", metavar="YAML", help="experiment config file (before or after ACTION)")
    p.add_argument("--set", dest="overrides_before", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (before or after ACTION; repeatable)")
    p.add_argument("--json", dest="json_before", action="store_true", help="print JSON instead of text")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="every artifact version with its type, size and aliases")
    ls.add_argument("--type", help="only artifacts of this type (dataset, model)")
    ls.add_argument("--name", help="only versions of this artifact")
    show = sub.add_parser("show", help="one version: metadata, files, producing and consuming runs")
    show.add_argument("ref", metavar="REF", help="name, name:vN or name:ALIAS")
    verify = sub.add_parser("verify", help="re-hash every stored object; exit 1 on any corruption")
    diff = sub.add_parser("diff", help="what changed between two versions: files, metadata, and a dataset's rows",
                          description="Compare two versions of one type: files by content hash, metadata key by key, "
                          "and for datasets every row (matched by id, or by text when a version or a row has no id): added, "
                          "removed, relabelled, moved to another split.")
    diff.add_argument("ref_a", metavar="A", help="the earlier version (name:vN or name:ALIAS)")
    diff.add_argument("ref_b", metavar="B", help="the later version")
    diff.add_argument("--show", type=int, default=5, metavar="N", help="example rows of each kind (default 5)")
    alias = sub.add_parser("alias", help="point an alias at a version by hand (production: a rollback), recorded",
                           description="Point ALIAS at the version REF names, taking it off the version that holds "
                           "it. For production this rolls back (or forward) without the gate: deploy-fetch then "
                           "fetches that version, and the next evaluate compares its challenger with it. The move is "
                           "recorded in the version's metadata (alias_moves: the alias, the version it was on, when, "
                           "by whom, and --reason).")
    alias.add_argument("ref", metavar="REF", help="the version to point it at: name:vN (or name:ALIAS)")
    alias.add_argument("alias", metavar="ALIAS", help="the alias, e.g. production (not latest, which is on the "
                       "version published last)")
    alias.add_argument("--reason", metavar="TEXT", help="why, recorded with the move (an incident, a ticket)")
    unalias = sub.add_parser("unalias", help="take an alias off its version by hand (production: withdrawn), recorded",
                             description="Take ALIAS off the version that holds it, leaving it on none: for production, "
                             "a model withdrawn with no version to replace it (deploy-fetch of NAME:production then "
                             "fails, naming the aliases there are). Recorded in that version's metadata (alias_moves).")
    unalias.add_argument("ref", metavar="NAME:ALIAS", help="the alias to take off, e.g. intent-classifier:staging")
    unalias.add_argument("--reason", metavar="TEXT", help="why, recorded with the removal")
    delete = sub.add_parser("delete", help="delete one version's files (its record stays for lineage)",
                            description="Delete one artifact version. Its files go (stored objects that no other "
                            "version shares are removed); its record, lineage and number stay, and the number is "
                            "never used again. `latest`, if it held it, moves to the newest remaining version.")
    delete.add_argument("ref", metavar="REF", help="name:vN (or name:ALIAS)")
    prune = sub.add_parser("prune", help="delete all but the newest versions of an artifact",
                           description="Delete the versions of NAME older than the newest --keep ones. Versions that "
                           "hold an alias (production, ...), versions other live versions were made from and versions a run "
                           "in progress uses, an interrupted finetune resumes from or an unpublished sweep trains on are kept.")
    prune.add_argument("name", metavar="NAME", help="artifact name")
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="newest versions to keep (at least 1)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    for q in (delete, prune):
        q.add_argument("--delete-aliases", action="store_true",
                       help="also delete versions that hold aliases, and those aliases (delete: latest never stops it, and "
                            "moves to the newest version left; prune keeps an older version that holds latest without it)")
        q.add_argument("--force", action="store_true",
                       help="also delete versions that live versions were made from (they can no longer be reproduced), "
                       "and versions a run in progress uses, an interrupted finetune resumes from or an unpublished sweep trains on")
    for q in (ls, show, verify, diff, alias, unalias, delete, prune):
        add_config_arguments(q, required=False)
        q.add_argument("--json", action="store_true", help="print JSON instead of text")


# what only reads the registry: these work on one this user cannot write (another account's, a read-only mount)
READING = ("list", "show", "diff", "verify")


def _open(args: argparse.Namespace, read_only: bool = False):
    """(registry, tracking.dir). Every action reads or changes versions there are: where there is no registry, none
    is made."""
    from pipeline.config import Config, load_tracking
    from pipeline.tracking import open_registry

    cfg = load_tracking(args.config, args.overrides)
    if isinstance(cfg, Config):
        return open_registry(cfg.tracking, project=cfg.project, entity=cfg.entity, scoped=False,
                             read_only=read_only, consuming=True), cfg.tracking.dir
    return open_registry(cfg, read_only=read_only, consuming=True), cfg.dir


def _delete(registry, tracking_dir, ref: str, args: argparse.Namespace, dry_run: bool = False,
            needed: dict[str, str] | None = None):
    """Delete one version; a dataset's tokenised copies go with its content's last live version. A version that
    `_needed` names (`needed`: its result, when the caller has it for several versions) is refused, as the registry
    refuses one that a run in progress uses."""
    if not args.force:
        from pipeline.errors import RegistryError

        needed = _needed(tracking_dir) if needed is None else needed
        exact = registry.resolve(ref).ref if needed else ref  # a name or an alias: the version it stands for
        if exact in needed:
            raise RegistryError(f"{exact} is what {needed[exact]}, or pass --force")
    result = registry.delete(ref, delete_aliases=args.delete_aliases, force=args.force, dry_run=dry_run)
    v = result.version
    if not dry_run and v.type == "dataset" and not any(o.digest == v.digest for o in registry.list_versions(type="dataset")):
        from pipeline.stages.finetune import drop_tokenized

        result.copies_removed += [str(p) for p in drop_tokenized(Path(tracking_dir).resolve() / "cache" / "tokenized",
                                                                  v.digest)]
    return result


def _needed(tracking_dir) -> dict[str, str]:
    """The versions (exact refs: a dataset or a registry base model) that work kept on disk still needs, each with
    who needs it and how to let it go: an interrupted finetune run that `finetune --resume` continues (a checkpoint
    kept, not a sweep trial's, not training now), and a sweep keeping a best model it has not published (running, or
    interrupted until `sweep --resume`). Deleted, the run's checkpoints would have nothing to continue on, and the
    sweep's model nothing to be published from. Read from the listings `artifacts list` prints."""
    from pipeline.stages.finetune import RESUME_FILE, interrupted_runs
    from pipeline.sweep import kept_models

    def state(path: Path) -> dict:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # finished or published (its folder removed) since it was listed, or unreadable
            return {}

    needed: dict[str, str] = {}
    for run in interrupted_runs(tracking_dir):
        if run["sweep_trial"] or run["checkpoint"] is None or run["training"] is not None:
            continue
        resume = state(Path(run["path"]) / RESUME_FILE)
        why = (f"interrupted finetune run {run['run_id']} resumes from (its checkpoints: {run['path']}); continue it "
               f"(finetune --resume {run['run_id']}) or delete that folder first")
        for ref in (resume.get("dataset"), resume.get("base")):
            if ref:
                needed.setdefault(ref, why)
    for sweep in kept_models(tracking_dir):
        meta = state(Path(sweep["path"]) / "best" / "metadata.json")
        base = meta.get("base_model") or {}
        then = "let it publish it" if sweep["running"] else f"continue it (sweep --resume {sweep['sweep']})"
        why = (f"sweep {sweep['sweep']} trains on (its best model so far, not published yet: {sweep['path']}); {then} "
               "or delete that folder first")
        for ref in ((meta.get("dataset") or {}).get("ref"), base.get("id") if base.get("source") == "registry" else None):
            if ref:
                needed.setdefault(ref, why)
    return needed


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _joined(args: argparse.Namespace) -> argparse.Namespace:
    """The options given before the action joined with those after it; a config named in both places must be one."""
    from pipeline.errors import ConfigError

    if args.config_before is not None:
        if args.config is not None and Path(args.config).resolve() != Path(args.config_before).resolve():
            raise ConfigError(f"--config is given twice, {args.config_before!r} before the action and "
                              f"{args.config!r} after it; give one")
        args.config = args.config_before
    args.overrides = [*args.overrides_before, *args.overrides]  # those after the action win, as they come later
    args.json = args.json or args.json_before
    return args


def main(args: argparse.Namespace) -> int:
    args = _joined(args)
    registry, tracking_dir = _open(args, read_only=args.action in READING)
    if args.action == "list":
        versions = registry.list_versions(name=args.name, type=args.type)
        if args.json:
            print(json.dumps([v.to_dict() for v in versions], indent=2))
            return 0
        if not versions:
            print("no artifact versions" + (f" (there is no registry at {registry.root})" if registry.missing else ""))
        else:
            _table([("REF", "TYPE", "SIZE", "ALIASES", "CREATED", "PROJECT", "PRODUCED BY")] + [
                (v.ref, v.type, _size(v.size), ",".join(sorted(v.aliases)) or "-", v.created_at[:19], v.project or "-",
                 v.produced_by or "-")
                for v in versions])
        if args.type in (None, "model"):
            _list_interrupted(tracking_dir, args.name)
            _list_sweep_models(registry, tracking_dir, args.name)
        return 0

    if args.action == "delete":
        result = _delete(registry, tracking_dir, args.ref, args)
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            print(_deleted_line(result))
        return 0

    if args.action == "prune":
        return _prune(registry, tracking_dir, args)

    if args.action == "alias":
        return _alias(registry, args)

    if args.action == "unalias":
        return _unalias(registry, args)

    if args.action == "diff":
        from pipeline.diff import diff_versions, format_diff

        if args.show < 0:
            print("error: --show must be 0 or more", file=sys.stderr)
            return 2
        d = diff_versions(registry, args.ref_a, args.ref_b, examples=args.show)
        print(json.dumps(d.to_dict(), indent=2, default=str) if args.json else format_diff(d))
        return 0

    if args.action == "show":
        v = registry.resolve(args.ref, include_deleted=True)
        if args.json:
            print(json.dumps(v.to_dict(), indent=2))
            return 0
        print(f"{v.ref}  ({v.type}, {_size(v.size)}, {len(v.files)} files)")
        print(f"  digest:      {v.digest}")
        print(f"  aliases:     {', '.join(sorted(v.aliases)) or '-'}")
        print(f"  created:     {v.created_at}")
        if v.deleted_at:
            print(f"  deleted:     {v.deleted_at} (its files are gone)")
        print(f"  project:     {v.project or '-'}")
        print(f"  produced by: {v.produced_by or '-'}")
        print(f"  used by:     {', '.join(v.used_by) or '-'}")
        print("  metadata:")
        for line in json.dumps(v.metadata, indent=2, sort_keys=True, ensure_ascii=False).splitlines():
            print(f"    {line}")
        print("  files:")
        for f in v.files:
            where = f"  -> {f.ref}" if f.ref else ""  # reference mode: the bytes live at this URI
            print(f"    {f.path}  {_size(f.size)}  {f.digest[:16]}{where}")
        return 0

    # verify
    if not hasattr(registry, "verify"):
        print("error: `artifacts verify` checks the local registry's object store; W&B verifies on download",
              file=sys.stderr)
        return 2
    report = registry.verify()
    if args.json:
        print(json.dumps({
            "ok": report.ok, "objects_checked": report.objects_checked, "bytes_checked": report.bytes_checked,
            "corrupt": report.corrupt, "missing": report.missing, "affected_versions": report.affected_versions,
        }, indent=2))
    else:
        print(f"checked {report.objects_checked} objects ({_size(report.bytes_checked)})")
        for label, bad in (("CORRUPT", report.corrupt), ("MISSING", report.missing)):
            for key, users in bad.items():
                what = f"reference {key}" if "://" in key else f"object sha256:{key[:16]}..."  # referenced files: by URI
                print(f"{label} {what} used by: {'; '.join(users)}")
        if report.ok:
            print("all objects match their hashes")
        else:
            print(f"affected versions: {', '.join(report.affected_versions)}", file=sys.stderr)
            print("publishing the same content again restores a missing or damaged file: `dataset-publish --reread` of "
                  "the same data for a dataset version; `finetune --retrain` (or `reproduce`) for a model version, when "
                  "its training gives the same bytes again (reproduce says whether it does)", file=sys.stderr)
    return 0 if report.ok else 1


def _table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _list_interrupted(tracking_dir, name: str | None) -> None:
    """The checkpoints that interrupted finetune runs keep (a few hundred MB each for a small model): not
    versions, but disk that only a resume or a deletion frees."""
    from pipeline.runlock import describe
    from pipeline.stages.finetune import interrupted_runs

    runs = [r for r in interrupted_runs(tracking_dir) if name in (None, r["model"])]
    if not runs:
        return

    def state(r) -> str:
        if r["training"] is not None:
            return f"training now ({describe(r['training'])})"
        return "a sweep trial's (not resumable)" if r["sweep_trial"] else r["checkpoint"] or "none (nothing to resume)"

    print(f"\nfinetune checkpoints: {_size(sum(r['bytes'] for r in runs))}, of runs that were interrupted (or are "
          "training now); continue one with `finetune --resume RUN_ID`, or delete its folder to free the space")
    _table([("MODEL", "RUN", "SIZE", "LAST CHECKPOINT", "WRITTEN", "FOLDER")] + [
        (r["model"], r["run_id"], _size(r["bytes"]), state(r), r["modified"][:19], r["path"]) for r in runs], indent="  ")


def _list_sweep_models(registry, tracking_dir, name: str | None) -> None:
    """The best model so far that each unfinished sweep keeps on disk until it publishes it (and, left by versions
    of the pipeline before it removed them, folders of models that are published)."""
    from pipeline.errors import PipelineError
    from pipeline.runlock import describe
    from pipeline.sweep import kept_models, published_best

    kept = [k for k in kept_models(tracking_dir) if name in (None, k["model"])]
    if not kept:
        return

    def published(k) -> str:
        try:
            ref, best = published_best(registry, k["model"], k["sweep"])
        except PipelineError:  # online: W&B could not be asked
            return "-"
        return ref if best is not None and best.number == k["trial"] else "-"

    print(f"\nsweep models: {_size(sum(k['bytes'] for k in kept))}, the best trial's model of sweeps that have not "
          "published it (interrupted, or running now); continue one with `sweep --resume SWEEP_ID` (or its command "
          "again with --resume auto), or delete its folder to free the space (one already PUBLISHED is a copy)")

    def best(k) -> str:
        said = "-" if k["trial"] is None else f"{k['trial']} ({k['value']:.4g})" if k["value"] is not None else str(k["trial"])
        return f"{said}; running now ({describe(k['running'])})" if k["running"] is not None else said

    _table([("SWEEP", "MODEL", "SIZE", "BEST TRIAL", "PUBLISHED", "WRITTEN", "FOLDER")] + [
        (k["sweep"], k["model"] or "-", _size(k["bytes"]), best(k), published(k) if k["model"] else "-",
         k["modified"][:19], k["path"]) for k in kept], indent="  ")


def _deleted_line(result) -> str:
    parts = [f"deleted {result.version.ref}"]
    if result.bytes_freed:
        parts.append(f"freed {_size(result.bytes_freed)}")
    if result.aliases_removed:
        parts.append(f"aliases removed: {', '.join(result.aliases_removed)}")
    if result.copies_removed:
        parts.append(f"local copies removed: {', '.join(result.copies_removed)}")
    parts.append(f"latest is {result.latest_now}" if result.latest_now else f"no version of {result.version.name} is left")
    return "; ".join(parts)


def _alias(registry, args: argparse.Namespace) -> int:
    """Move an alias by hand (a rollback of production), with the move recorded in the version's metadata."""
    from pipeline.errors import RefError
    from pipeline.registry.base import settable_alias

    settable_alias(args.alias)  # before anything is read: `latest` is refused, not found "already" in place
    version = registry.resolve(args.ref)
    try:
        before = registry.resolve(version.tagged(args.alias)).ref
    except RefError:  # no version holds it yet
        before = None
    moved = before != version.ref
    if moved:
        # compare-and-set: an evaluation that promoted another version meanwhile is not overwritten unseen
        registry.set_alias(version.ref, args.alias, expected=before)
        _record_move(registry, version, {"alias": args.alias, "from": before}, args.reason)
    if args.json:
        print(json.dumps({"ref": version.ref, "alias": args.alias, "from": before, "moved": moved}, indent=2))
    elif moved:
        print(f"{args.alias}: {before or 'on no version'} -> {version.ref}")
    else:
        print(f"{version.ref} already holds {args.alias}; nothing moved")
    return 0


def _unalias(registry, args: argparse.Namespace) -> int:
    """Take an alias off its version by hand, recorded in that version's metadata."""
    from pipeline.refs import parse_ref

    alias = parse_ref(args.ref).tag
    version = registry.remove_alias(args.ref)  # NAME:vN and latest: refused before anything is read
    _record_move(registry, version, {"alias": alias, "removed": True}, args.reason)
    if args.json:
        print(json.dumps({"ref": version.ref, "alias": alias, "removed": True}, indent=2))
    else:
        print(f"{alias}: taken off {version.ref}; no version of {version.name} holds it now")
    return 0


def _record_move(registry, version, move: dict, reason: str | None) -> None:
    """Add a move made by hand to the version's metadata (``alias_moves``), with when, by whom and why."""
    from datetime import datetime, timezone

    from pipeline.registry.base import append_record

    append_record(registry, version.ref, "alias_moves",
                  {**move, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": _who(), "reason": reason})


def _who() -> str:
    """``user@host``, for the record of a move made by hand (no secret: the account and machine names)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no USER
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _prune(registry, tracking_dir, args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError, RegistryError

    if args.keep < 1:
        raise ConfigError(f"--keep {args.keep}: keep at least 1 version (delete a version by name to go below)")
    versions = sorted(registry.list_versions(name=args.name), key=lambda v: v.version, reverse=True)
    if not versions:
        registry.resolve(args.name)  # the RefError that lists the names there are
    old = versions[args.keep:]
    needed = _needed(tracking_dir) if old and not args.force else {}  # once, for every version below
    deleted, kept = [], []
    for v in reversed(old):  # oldest first
        held = list(v.aliases)  # `latest` too: on an old version when its content was published again
        if held and not args.delete_aliases:
            kept.append({"ref": v.ref, "reason": f"holds {', '.join(held)}"})
            continue
        try:
            result = _delete(registry, tracking_dir, v.ref, args, dry_run=args.dry_run, needed=needed)
        except RegistryError as e:  # live versions were made from it, or an alias arrived since the listing
            kept.append({"ref": v.ref, "reason": str(e)})
            continue
        deleted.append({"ref": v.ref, "size": v.size, "bytes_freed": result.bytes_freed})
    if args.json:
        print(json.dumps({"name": args.name, "kept_newest": [v.ref for v in versions[:args.keep]], "dry_run": args.dry_run,
                          "deleted": deleted, "kept": kept}, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for d in deleted:
        freed = f"  (freed {_size(d['bytes_freed'])})" if d["bytes_freed"] and not args.dry_run else ""
        print(f"{verb} {d['ref']}{freed}")
    for k in kept:
        print(f"kept {k['ref']}: {k['reason']}")
    print(f"{len(deleted)} {verb}, {len(kept)} kept besides the newest {min(args.keep, len(versions))}")
    return 0
