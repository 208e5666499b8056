"""`python -m pipeline COMMAND …`: a command's options are declared in `commands` (light: no torch), and the
module that runs it is imported only when it runs (so `--help` answers at once, `prepare` does not pay for
torch, nor `plan` for Ray)."""
from __future__ import annotations

import importlib
import sys

from .commands import COMMANDS, parser_of
from .config import ConfigError

USAGE = "usage: python -m pipeline COMMAND [options]   (python -m pipeline COMMAND --help: its options)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = argv[:1] in (["-h"], ["--help"])
        width = max(map(len, COMMANDS)) + 2
        lines = [f"  {name:<{width}}{command.help}" for name, command in COMMANDS.items()]
        print(f"{USAGE}\n\ncommands:\n" + "\n".join(lines), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    args = parser_of(argv[0]).parse_args(argv[1:])
    try:
        return importlib.import_module(COMMANDS[argv[0]].module).run(args) or 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
