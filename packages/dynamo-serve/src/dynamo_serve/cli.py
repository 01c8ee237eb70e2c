"""The `dynamo` command: a thin dispatcher, one module per subcommand, imported when chosen.

`dynamo --help` imports nothing but argparse (no circus, no pydantic, no component module), so it
answers at once; `dynamo serve ...` hands its whole argument list to `dynamo_serve.serve.main`,
which owns its own parser (its `--<component>.<arg>` overrides are not argparse flags).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

#: subcommand -> (module with a `main(argv) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dynamo_serve.serve", "Run an inference graph on this machine, under circus."),
    "deploy": ("dynamo_serve.deploy", "Render Kubernetes manifests for an inference graph."),
}


def _usage() -> str:
    lines = [
        "usage: dynamo <command> [args]",
        "",
        "Dynamo: distributed LLM inference.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `dynamo <command> --help` for a command's own flags."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from dynamo_serve._version import __version__

        sys.stdout.write(f"dynamo {__version__}\n")
        return 0
    command = SUBCOMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"dynamo: unknown command '{args[0]}'\n\n" + _usage())
        return 2
    module = importlib.import_module(command[0])
    return int(module.main(args[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
