"""How one (K, T) group of steps becomes decoder_step calls.

On CPU the cost that matters is copying the cross-attention K/V, not arithmetic. Sequences whose
cross rows are consecutive are fed as views of the store (no copy); a few missing rows are
filled with dummy rows (computed and dropped); a group split into a few runs of consecutive rows
runs as that many calls; a more fragmented group copies its rows together.
"""
from typing import Callable, List, Tuple


def plan(members: list, row: Callable, *, views: bool, max_runs: int,
         max_dummy_fraction: float) -> List[Tuple[list, bool]]:
    """Split `members` (sorted by cross row, row(m) gives it) into calls: [(slots, view)].

    view=True: the slots are consecutive cross rows, fed as views; a slot may be None (a row
    whose sequence is not in this group: a dummy with an empty past, dropped after the run).
    views=False (the graph takes stacked cross K/V, or the family has none): one call."""
    if not members:
        return []
    if not views:
        return [(members, False)]
    lo, hi = row(members[0]), row(members[-1])
    holes = hi - lo + 1 - len(members)
    if holes <= max(1, int(max_dummy_fraction * len(members))):
        slots = [None] * (hi - lo + 1)
        for m in members:
            slots[row(m) - lo] = m
        return [(slots, True)]
    runs = []
    for m in members:
        if runs and row(runs[-1][-1]) + 1 == row(m):
            runs[-1].append(m)
        else:
            runs.append([m])
    if len(runs) <= max_runs:
        return [(run, True) for run in runs]
    return [(members, False)]
