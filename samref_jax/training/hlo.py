"""Where the cross-device collectives of a compiled program sit: inside loops or outside them.

A collective inside a ``while`` body runs once per iteration (per click round, per step of the
round's backward pass) and stalls every device on the slowest one each time; the training step
keeps its one all-reduce after the unroll (docs/design.md, 'Training step').
``tests/training/test_sharded_hlo.py`` checks it on the compiled sharded step.

Example:
  >>> hlo = compiled.as_text()                                                # doctest: +SKIP
  >>> report = loop_collectives(hlo)                                          # doctest: +SKIP
  >>> report.loops, report.inside, len(report.outside)                        # doctest: +SKIP
  (4, [], 1)
"""

from __future__ import annotations

import re
from typing import NamedTuple

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_HEADER = re.compile(r"(?:ENTRY )?(%[\w.\-]+) ")
_NAME = re.compile(r"%[\w.\-]+")
_LOOP = re.compile(r"(?:body|condition)=(%[\w.\-]+)")


class LoopCollectives(NamedTuple):
    """loops: number of ``while`` ops; inside: collective instruction lines in a loop body or
    condition or any computation they call (transitively); outside: every other collective."""

    loops: int
    inside: list[str]
    outside: list[str]


def computations(hlo_text: str) -> dict[str, list[str]]:
    """HLO module text (``Compiled.as_text()``) -> {computation name: its instruction lines}."""
    comps: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m and line.rstrip().endswith("{"):
            cur = comps.setdefault(m.group(1), [])
        elif line.strip() == "}":
            cur = None
        elif cur is not None:
            cur.append(line)
    return comps


def loop_collectives(hlo_text: str) -> LoopCollectives:
    """Collectives of a compiled HLO module, split by whether a ``while`` loop runs them.

    Every ``while`` op's body and condition are roots; each computation named in a root's
    instructions (``to_apply=``, ``calls=``, branches, nested loops, fusions) is followed.
    """
    comps = computations(hlo_text)
    calls = {
        c: {t for ln in lines for t in _NAME.findall(ln) if t in comps and t != c}
        for c, lines in comps.items()
    }
    loop_lines = [ln for lines in comps.values() for ln in lines if " while(" in ln]
    roots = [t for ln in loop_lines for t in _LOOP.findall(ln)]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        c = todo.pop()
        if c not in seen and c in comps:
            seen.add(c)
            todo.extend(calls[c])
    inside = [ln.strip() for c in seen for ln in comps[c] if _COLLECTIVE.search(ln)]
    outside = [
        ln.strip()
        for c, lines in comps.items()
        if c not in seen
        for ln in lines
        if _COLLECTIVE.search(ln)
    ]
    return LoopCollectives(len(loop_lines), inside, outside)
