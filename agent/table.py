"""Terminal tables whose columns are as wide as their widest cell (`tcpmesh flows`, `workload list`).

``render`` measures every cell of a finished table; ``Follower`` prints rows as they come (`flows
--follow`) and widens a column when a longer cell arrives, so a long process name never shifts the
columns after it out of their header. Cells are measured in characters (what the CLI prints is
ASCII plus a few arrows, each one column wide). Pure; imports nothing of the agent.
"""

from __future__ import annotations

from typing import Sequence

GAP = "  "


def _line(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> str:
    parts = [cell.rjust(width) if r else cell.ljust(width) for cell, width, r in zip(cells, widths, right)]
    return GAP.join(parts).rstrip()


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] = ()) -> list[str]:
    """The header line and one line per row, every column as wide as its widest cell."""
    right = tuple(right) or (False,) * len(headers)
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    return [_line(headers, widths, right)] + [_line(row, widths, right) for row in rows]


class Follower:
    """Lines for rows that arrive one by one; columns only ever grow (from ``min_widths``)."""

    def __init__(self, headers: Sequence[str], min_widths: Sequence[int], right: Sequence[bool] = ()) -> None:
        self.headers = tuple(headers)
        self.right = tuple(right) or (False,) * len(headers)
        self.widths = [max(len(h), w) for h, w in zip(headers, min_widths)]

    def header(self) -> str:
        return _line(self.headers, self.widths, self.right)

    def line(self, row: Sequence[str]) -> str:
        self.widths = [max(w, len(cell)) for w, cell in zip(self.widths, row)]
        return _line(row, self.widths, self.right)
