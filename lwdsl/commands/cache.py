"""`lwdsl cache`: list or clear the converted-model cache (`lwdsl.models.cache`)."""
from __future__ import annotations

import argparse
import json

from lwdsl.errors import ExitCode

HELP = "List (default) or clear the converted-model cache ($LWDSL_CACHE/models)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    parser.add_argument("keys", nargs="*", help="clear only these entries (their keys, as listed)")
    parser.add_argument("--stale", action="store_true",
                        help="clear only entries that are never read again (older format, unfinished)")
    parser.add_argument("--json", action="store_true", help="print the entries as JSON")


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def run(args: argparse.Namespace) -> int:
    from lwdsl.models.cache import list_entries, models_root, remove_entry

    entries = list_entries()
    if args.action == "list":
        if args.keys or args.stale:
            print("error: keys and --stale go with `clear`")
            return ExitCode.BAD_INPUT
        if args.json:
            print(json.dumps({"schema_version": "lwdsl.cache/1", "root": str(models_root()),
                              "total_bytes": sum(e.bytes for e in entries),
                              "entries": [e.model_dump() for e in entries]}, indent=2))
            return ExitCode.OK
        print(f"{models_root()}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
              f"{_size(sum(e.bytes for e in entries))}")
        for e in entries:
            print(f"  {e.key}  {_size(e.bytes):>10}  {e.state:<7}  {e.source or '?'}")
        return ExitCode.OK
    known = {e.key for e in entries}
    unknown = [k for k in args.keys if k not in known]
    if unknown:
        print(f"error: no cache entry {', '.join(unknown)} (see `lwdsl cache list`)")
        return ExitCode.BAD_INPUT
    chosen = [e for e in entries if (not args.keys or e.key in args.keys) and (not args.stale or e.state != "ok")]
    freed = 0
    for e in chosen:
        if remove_entry(e.key):
            freed += e.bytes
            print(f"removed {e.key} ({_size(e.bytes)})")
    print(f"freed {_size(freed)}")
    return ExitCode.OK
