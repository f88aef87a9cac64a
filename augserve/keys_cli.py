"""``augserve keys``: the argparse side of :mod:`augserve.security`'s keyring. ``add_parser(subcommands)``
registers the command on the ``augserve`` command's subparsers; errors are ValueErrors, which
``augserve.cli.main`` prints as one line ``augserve: error: ...`` with exit status 2.

    augserve keys [show] [--json]                          where the keys are, public keys, allowed keys
    augserve keys create [--force]                         make the key pairs (--force: new ones)
    augserve keys export --role worker|client [--out F]    a bundle for another host (holds a secret key)
    augserve keys import FILE                              take a bundle in ("-": standard input)
    augserve keys allow --role worker|client --name NAME PUBLIC_KEY
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .security import PAIRS, ROLES, Keyring, default_keys_dir, z85_key

EXAMPLES = """examples:
  augserve keys create                                    # once per user; workers and trainers of this user need nothing else
  augserve keys export --role worker --out worker.keys    # on the daemon's host; copy the file securely
  augserve keys import worker.keys                        # on the worker's host; then delete the file
  augserve keys allow --role worker --name gpu-box 'PUBLIC_KEY'   # admit a key made on another host"""


def _directory(args) -> Path:
    return Path(args.keys_dir).expanduser() if args.keys_dir else default_keys_dir()


def _describe(keyring: Keyring) -> dict:
    return {
        "directory": str(keyring.directory),
        "public_keys": {name: keyring.pair(name).public.decode() for name in PAIRS},
        "secret_keys": {name: keyring.pair(name).secret is not None for name in PAIRS},
        "allowed": {role: {name: key.decode() for name, key in keyring.allowed_named(role).items()} for role in ROLES},
    }


def _emit(args, result: dict, text: str) -> None:
    print(json.dumps(result) if args.json else text)


def cmd_show(args) -> int:
    keyring = Keyring.load(_directory(args), create=False)
    result = _describe(keyring)
    lines = [f"keys in {result['directory']}"]
    for name in PAIRS:
        note = "" if result["secret_keys"][name] else "  (public only: imported)"
        lines.append(f"  {name:<7} {result['public_keys'][name]}{note}")
    for role in ROLES:
        allowed = result["allowed"][role]
        lines.append(f"allowed {role}s besides this keyring's own: " + ("none" if not allowed else ""))
        lines += [f"  {name:<20} {key}" for name, key in sorted(allowed.items())]
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_create(args) -> int:
    keyring, written = Keyring.create(_directory(args), force=args.force)
    result = {**_describe(keyring), "created": list(written)}
    if not written:
        text = f"keys in {keyring.directory} exist already; nothing written (--force replaces them)"
    else:
        text = f"created the {', '.join(written)} key pair(s) in {keyring.directory}"
        if args.force:
            text += "\nnote: bundles exported before no longer work; export and import them again on the other hosts"
    _emit(args, result, text)
    return 0


def cmd_export(args) -> int:
    keyring = Keyring.load(_directory(args), create=False)
    bundle = keyring.export_bundle(args.role)
    if not args.out:
        sys.stdout.write(bundle)
        return 0
    out = Path(args.out)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its mode through O_TRUNC: narrow it
            handle.write(bundle)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: {exc.strerror}") from None
    result = {"out": str(out), "role": args.role, "directory": str(keyring.directory)}
    _emit(args, result, f"wrote {out} (mode 0600): the daemon's public key and the {args.role} key pair, SECRET included; copy it securely, import it with `augserve keys import {out.name}`, then delete it")
    return 0


def cmd_import(args) -> int:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.file).read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{args.file} is not an augserve key bundle (not ASCII text)") from None
        except OSError as exc:
            raise ValueError(f"cannot read {args.file}: {exc.strerror}") from None
    keyring = Keyring.import_bundle(text, _directory(args))
    result = _describe(keyring)
    _emit(args, result, f"imported into {keyring.directory}: daemon {result['public_keys']['daemon']}, worker {result['public_keys']['worker']}, client {result['public_keys']['client']}")
    return 0


def cmd_allow(args) -> int:
    keyring = Keyring.load(_directory(args), create=False)
    path = keyring.allow(args.role, args.public_key, args.name)
    result = {"role": args.role, "name": args.name, "public_key": args.public_key.strip(), "file": str(path)}
    _emit(args, result, f"allowed {args.role} {args.name}: wrote {path} (running daemons read it when they start)")
    return 0


class _ActionParser(argparse.ArgumentParser):
    """The parser of one ``keys`` action. A Z85 public key can start with '-' (one in 85 does), which
    argparse would take for an option: such a token, when it is a valid key and no option of ours, is
    moved behind a ``--`` so that ``keys allow ... PUBLIC_KEY`` works whatever the key looks like."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and "--" not in args:
            keys = [token for token in args if self._is_dashed_key(token)]
            if keys:
                args = [token for token in args if token not in keys] + ["--", *keys]
        return super().parse_known_args(args, namespace)

    def _is_dashed_key(self, token: str) -> bool:
        if not token.startswith("-") or token.split("=", 1)[0] in self._option_string_actions:
            return False
        try:
            z85_key(token)
        except ValueError:
            return False
        return True


def add_parser(subcommands) -> argparse.ArgumentParser:
    """Register ``keys`` on ``subcommands`` (an ``add_subparsers()`` result); returns its parser."""
    def common(parser, default):
        parser.add_argument("--keys-dir", default=default, metavar="DIR", help="key directory (default: $AUGSERVE_KEYS_DIR, else ~/.config/augserve/keys)")
        parser.add_argument("--json", action="store_true", default=default, help="print the result as one JSON object")
        return parser

    keys = subcommands.add_parser(
        "keys",
        help="CurveZMQ keys: show, create, export/import for other hosts, allow other hosts' keys",
        description="The CurveZMQ keys that authenticate workers and trainers to a daemon. One user's processes on one host share them with no set-up; other hosts get them with export/import.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(keys, None)
    keys.set_defaults(func=cmd_show)
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_ActionParser)
    # On the actions the flags default to SUPPRESS, so that `keys --keys-dir D show` keeps D.
    suppress = argparse.SUPPRESS

    show = actions.add_parser("show", help="the key directory, public keys and allowed keys (default)")
    common(show, suppress)
    show.set_defaults(func=cmd_show)

    create = actions.add_parser("create", help="create the key pairs (existing ones are kept)")
    create.add_argument("--force", action="store_true", help="replace all three key pairs (exported bundles stop working)")
    common(create, suppress)
    create.set_defaults(func=cmd_create)

    export = actions.add_parser("export", help="print or write a bundle for another host (contains a SECRET key)")
    export.add_argument("--role", required=True, choices=ROLES)
    export.add_argument("--out", metavar="FILE", help="write the bundle to FILE, mode 0600 (default: standard output)")
    common(export, suppress)
    export.set_defaults(func=cmd_export)

    take = actions.add_parser("import", help="take in a bundle made by `augserve keys export`")
    take.add_argument("file", metavar="FILE", help="the bundle ('-': standard input)")
    common(take, suppress)
    take.set_defaults(func=cmd_import)

    allow = actions.add_parser("allow", help="admit another host's public key as a worker or a client")
    allow.add_argument("--role", required=True, choices=ROLES)
    allow.add_argument("--name", required=True, help="a name for the key (letters, digits, '_', '.', '-')")
    allow.add_argument("public_key", metavar="PUBLIC_KEY", help="the Z85 public key (40 characters; quote it: Z85 has shell characters)")
    common(allow, suppress)
    allow.set_defaults(func=cmd_allow)
    return keys
