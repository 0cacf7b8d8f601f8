"""Command-line parsing of the absl/ml_collections entry points (``samref train``,
``samref cache-embeddings``): ``--help``, and a bad flag as one line with exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["parse_flags"]

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "-?")


def _flags_help(fv) -> str:
    """The flags' help without absl's per-module headings."""
    lines = fv.get_help(include_special_flags=False).splitlines()
    return "\n".join(ln for ln in lines if ln.startswith(" "))


def parse_flags(
    fv, argv: Sequence[str], prog: str, usage: str, description: str, example: str
) -> int | None:
    """Parse ``argv`` into the absl ``FlagValues`` ``fv`` (``--config.a.b=v`` overrides included).

    Returns None when parsed, else the exit status: 0 after printing the help (``--help``),
    2 after printing one ``PROG: error: ...`` line (an unknown flag, a bad value, a config file
    that cannot be loaded)."""
    from absl import flags

    argv = list(argv)
    if any(a in HELP_FLAGS for a in argv[: argv.index("--") if "--" in argv else None]):
        print(
            f"usage: {prog} {usage}\n\n{description}\n\nexample:\n  {example}\n\n"
            f"flags:\n{_flags_help(fv)}"
        )
        return 0
    # ml_collections discovers the `--config.x=y` overrides in sys.argv: parse with it set.
    saved, sys.argv = sys.argv, [prog, *argv]
    try:
        fv(sys.argv)
        config = fv["config"].value if "config" in fv else None
        if config is not None:
            config.keys()  # a config file that failed to load raises its error here
    except (flags.Error, KeyError, AttributeError, OSError, SyntaxError, ImportError) as e:
        print(f"{prog}: error: {_one_line(e)} (see --help)", file=sys.stderr, flush=True)
        return 2
    finally:
        sys.argv = saved
    return None


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):  # an error inside the config file
        lines = [lines[0].split("Traceback")[0], lines[-1]]
    message = " ".join(" ".join(lines).split())
    if isinstance(e, (KeyError, AttributeError)):
        return f"unknown config field {message.strip(chr(34) + chr(39))!r}"
    return message or type(e).__name__
