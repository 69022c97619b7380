"""What one decode reads: pure planning over token lists, no llama.cpp (see
context.py for the branches and the KV cache it runs on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Branch


@dataclass
class Job:
    """One branch's part of a decode: the tokens it gains and the logits it needs.

    Rows are wanted at positions `first_output .. end - 1`; the row at position
    i predicts token i + 1.
    """

    branch: Branch
    """The branch that gains the tokens (the plan itself reads only the fields below)."""
    tokens: list[int]
    first_output: int
    logprobs: bool  # True: log p(tokens[i + 1]) per row; False: the raw rows
    start: int = 0  # first position to decode, set by the plan
    cached: int = 0  # tokens the branch's cache held when the plan began, set by the plan

    @property
    def end(self) -> int:
        """One past the last position decoded: the last whose row is wanted (a
        scored span's last token is only appended)."""
        return len(self.tokens) - 1 if self.logprobs else len(self.tokens)

    def wants_row(self, pos: int) -> bool:
        if self.logprobs:  # the last token predicts nothing that is scored
            return self.first_output <= pos < len(self.tokens) - 1
        return pos >= self.first_output


def plan_entries(jobs: list[Job]) -> list[tuple[int, list[int]]]:
    """What one operation decodes: (position, the jobs that decode it), in
    position order. Jobs that start at the same position and agree on every token
    up to and including this one decode it once, for all their sequences (llama.cpp
    tags the cell with each, as its own examples do for a shared system prompt):
    the K children of a node re-reading its last token for their first row, or
    rebuilding the same evicted prefix, cost one child's tokens. The row is the
    same for each, since it depends only on those tokens. Position order keeps each
    sequence's positions in order across the pieces a long operation is split in."""
    ids: dict = {}  # a prefix (the tokens before `start`, then one token at a time) -> an id
    entry_at: dict[int, tuple[int, list[int]]] = {}
    entries = []
    for j, job in enumerate(jobs):
        prefix = ids.setdefault(("before", tuple(job.tokens[: job.start])), len(ids))
        for pos in range(job.start, job.end):
            prefix = ids.setdefault((prefix, job.tokens[pos]), len(ids))
            if prefix in entry_at:
                entry_at[prefix][1].append(j)
            else:
                entry_at[prefix] = (pos, [j])
                entries.append(entry_at[prefix])
    entries.sort(key=lambda entry: entry[0])  # stable: jobs in order within a position
    return entries
