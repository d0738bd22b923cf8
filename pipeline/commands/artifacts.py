"""``pipeline artifacts list | show REF | verify``."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="every artifact version with its type, size and aliases")
    ls.add_argument("--type", help="only artifacts of this type (dataset, model)")
    ls.add_argument("--name", help="only versions of this artifact")
    show = sub.add_parser("show", help="one version: metadata, files, producing and consuming runs")
    show.add_argument("ref", metavar="REF", help="name, name:vN or name:ALIAS")
    verify = sub.add_parser("verify", help="re-hash every stored object; exit 1 on any corruption")
    for q in (ls, show, verify):
        add_config_arguments(q, required=False)
        q.add_argument("--json", action="store_true", help="print JSON instead of text")


def _open(args: argparse.Namespace):
    from pipeline.config import Config, load_tracking
    from pipeline.tracking import open_registry

    cfg = load_tracking(args.config, args.overrides)
    if isinstance(cfg, Config):
        return open_registry(cfg.tracking, project=cfg.project, entity=cfg.entity)
    return open_registry(cfg)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main(args: argparse.Namespace) -> int:
    registry = _open(args)
    if args.action == "list":
        versions = registry.list_versions(name=args.name, type=args.type)
        if args.json:
            print(json.dumps([v.to_dict() for v in versions], indent=2))
            return 0
        if not versions:
            print("no artifact versions")
            return 0
        rows = [("REF", "TYPE", "SIZE", "ALIASES", "CREATED", "PRODUCED BY")]
        rows += [
            (v.ref, v.type, _size(v.size), ",".join(sorted(v.aliases)) or "-", v.created_at[:19], v.produced_by or "-")
            for v in versions
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0

    if args.action == "show":
        v = registry.resolve(args.ref)
        if args.json:
            print(json.dumps(v.to_dict(), indent=2))
            return 0
        print(f"{v.ref}  ({v.type}, {_size(v.size)}, {len(v.files)} files)")
        print(f"  digest:      {v.digest}")
        print(f"  aliases:     {', '.join(sorted(v.aliases)) or '-'}")
        print(f"  created:     {v.created_at}")
        print(f"  produced by: {v.produced_by or '-'}")
        print(f"  used by:     {', '.join(v.used_by) or '-'}")
        print("  metadata:")
        for line in json.dumps(v.metadata, indent=2, sort_keys=True).splitlines():
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
    return 0 if report.ok else 1
