"""The decode plan alone (engine/plan.py): which positions one llama_decode reads
and for which jobs, from token lists only; no model is loaded."""

from __future__ import annotations

from w2s_langchain.engine.plan import Job, plan_entries


def job(tokens, start, first_output=None, logprobs=False) -> Job:
    j = Job(branch=None, tokens=list(tokens), first_output=len(tokens) - 1 if first_output is None else first_output, logprobs=logprobs)
    j.start = start
    return j


def test_siblings_read_their_shared_tokens_once():
    # Three children of one node re-read its last token (position 3) for their
    # first rows, then part ways: position 3 once for all, then each its own.
    siblings = [job([1, 2, 3, 4, 5], start=3), job([1, 2, 3, 4, 6], start=3), job([1, 2, 3, 4, 5], start=3)]
    assert plan_entries(siblings) == [(3, [0, 1, 2]), (4, [0, 2]), (4, [1])]


def test_the_same_tokens_after_different_starts_are_not_shared():
    # A token is shared only by jobs that agree on everything before it, the
    # cached part included: different starts mean different prefixes.
    jobs = [job([1, 2, 3], start=1), job([9, 2, 3], start=1), job([1, 2, 3], start=0)]
    assert plan_entries(jobs) == [(0, [2]), (1, [0]), (1, [1]), (1, [2]), (2, [0]), (2, [1]), (2, [2])]


def test_entries_come_in_position_order_and_a_scored_spans_last_token_is_left_out():
    jobs = [job([1, 2, 3, 4], start=0, first_output=1, logprobs=True), job([5, 6], start=0)]
    entries = plan_entries(jobs)
    assert [pos for pos, _ in entries] == sorted(pos for pos, _ in entries)
    # The scored job decodes positions 0..2 (its last token predicts nothing scored).
    assert [pos for pos, js in entries if 0 in js] == [0, 1, 2]
    assert [pos for pos, js in entries if 1 in js] == [0, 1]
    assert jobs[0].wants_row(2) and not jobs[0].wants_row(0) and jobs[1].wants_row(1)
