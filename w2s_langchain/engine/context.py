"""A llama.cpp context holding many branches of one prompt in a unified KV cache.

A `Branch` is a token sequence the caller grows. While it is *resident* it owns
one llama.cpp sequence id, and the KV cache holds its first `n_cached` tokens.
Forking shares the parent's cells (`llama_memory_seq_cp` with a unified KV cache
only tags cells), so a prefix is stored and computed once however many branches
continue it.

Every operation is the same plan: for each branch, decode the tokens the cache
lacks up to the last one whose logits row is asked for, in one `llama_decode` for
all branches (split at `n_batch`), and read those rows; a token that several
branches decode with the same tokens before it is decoded once for all of them.
Tokens after the last row asked for are only appended (a scored span's last
token, a sampled one): the next operation that needs their row decodes them, so
a branch nobody continues never costs its last token. Because of that one plan,
a branch that was evicted to make room is rebuilt by the next operation that
touches it: it copies the longest prefix any resident branch still holds and
decodes the rest.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ..errors import ContextCreationError, ContextFullError, ContextOverflowError, DecodeError
from .model import Model, interrupts_deferred
from .plan import Job, plan_entries
from .sampling import log_softmax_at

_DECODE_NO_KV_SLOT = 1
# llama.cpp's hard limit on threads (GGML_MAX_N_THREADS).
MAX_THREADS = 512
# With an `interrupt` set, most tokens one llama_decode reads: a long prompt is
# decoded in pieces this size, so a timeout or cancel is seen within one piece
# instead of after the seconds a whole prompt takes on a small CPU.
_INTERRUPTIBLE_PIECE = 32


class Branch:
    """One token sequence in a `Context`. Create with `Context.new_branch` or
    `Context.fork`; grow with `extend` and `score`; end with `release`."""

    __slots__ = ("_tokens", "_seq", "_n_cached", "_last_used", "_released", "__weakref__")

    def __init__(self, tokens: list[int]):
        self._tokens = tokens
        self._seq: int | None = None
        self._n_cached = 0
        self._last_used = 0
        self._released = False

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def resident(self) -> bool:
        """Whether the branch holds a sequence id (its prefix sits in the KV cache)."""
        return self._seq is not None

    def __repr__(self) -> str:
        state = "released" if self._released else f"seq={self._seq}, cached={self._n_cached}"
        return f"Branch(len={len(self._tokens)}, {state})"


@dataclass
class ContextStats:
    """What a context has done so far."""

    decode_calls: int = 0
    """Calls to llama_decode (a retry after eviction counts again)."""
    tokens_decoded: int = 0
    """Tokens pushed through the model (one decoded for several branches counts once)."""
    tokens_reused: int = 0
    """Tokens an operation needed that were already in the KV cache."""
    tokens_refilled: int = 0
    """Of `tokens_decoded`, those below the first logits row an operation wanted,
    decoded only because the cache lacked them: a new branch's prefix, or what an
    evicted branch lost."""
    tokens_reread: int = 0
    """Of `tokens_decoded`, cached tokens decoded again because their logits row
    was wanted (llama.cpp keeps no rows of earlier decodes)."""
    evictions: int = 0
    """Branches evicted to free a sequence id or KV cells."""
    evictions_for_seqs: int = 0
    """Those evicted because every sequence id was taken: a sign that n_seq_max is too small."""
    evictions_for_cells: int = 0
    """Those evicted because the KV cache was full: a sign that n_ctx is too small."""
    decode_seconds: float = 0.0
    """Wall time spent inside llama_decode: the floor under anything built on it."""


def default_n_ctx(model: Model) -> int:
    """The KV cells a context gets when no n_ctx is given: the model's training
    context, at most 4096 (enough for a search's branches at these models' sizes)."""
    return min(model.n_ctx_train, 4096)


class Context:
    """Many branches of text over one loaded model, sharing a unified KV cache.

    Settings (llama.cpp's names): `n_ctx` KV cells for all branches together
    (default `default_n_ctx`; llama.cpp rounds it up to a multiple of 256), `n_batch` most tokens per llama_decode (default min(512, n_ctx)),
    `n_threads` (default half the CPUs), `n_seq_max` branches resident at once
    (more are evicted and rebuilt on use), `flash_attn`, and `seed` for `rng`,
    the generator the caller samples with.

    `reuse_prefixes=False` makes every operation decode each branch from its first
    token, as code without a KV cache would: same results, the cost of re-reading.
    It exists to check the cache and to measure what it saves.

    All methods are thread-safe: one lock per context serializes them.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        n_seq_max: int = 64,
        flash_attn: bool = False,
        reuse_prefixes: bool = True,
        seed: int | None = None,
    ):
        n_threads = n_threads if n_threads is not None else max(1, (os.cpu_count() or 2) // 2)
        n_ctx = n_ctx if n_ctx is not None else default_n_ctx(model)
        check_int_range("n_ctx", n_ctx, 16, model.n_ctx_train, "the model's training context")
        n_batch = n_batch if n_batch is not None else min(512, n_ctx)
        check_int_range("n_batch", n_batch, 1, n_ctx, "n_ctx")
        check_int_range("n_threads", n_threads, 1, MAX_THREADS, "llama.cpp's thread limit")
        check_int_range("n_seq_max", n_seq_max, 1, max_sequences(), "llama.cpp's sequence limit")

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        # llama.cpp reserves one output per sequence when it builds its graphs.
        params.n_outputs_max = max(n_batch, n_seq_max)
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # Unified KV: a prefix is stored once however many branches share it, and partial
        # copies work (with the split KV, n_ctx is divided among sequences and a partial
        # copy aborts the process).
        params.kv_unified = True
        # Off by default: on CPU, flash attention accumulates in F16, so the same
        # token scored in a batch of many branches and alone differs more
        # (measured: 0.007 vs 0 in log-prob on an F32 model), and is not faster here.
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        with interrupts_deferred():  # llama.cpp logs here: see interrupts_deferred
            handle = llama_cpp.llama_init_from_model(model.handle, params)
            if not handle:
                raise ContextCreationError(
                    f"llama.cpp could not create a context with n_ctx={n_ctx}, n_batch={n_batch}: "
                    "probably not enough memory; lower n_ctx or n_batch."
                )
            # Room for every sequence id on each token: see plan.plan_entries.
            batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)
            # The finalizer holds the model, so the model outlives the context even when the
            # garbage collector frees both in one pass (llama.cpp reads it in llama_free).
            self._finalizer = weakref.finalize(self, _free_context, handle, batch, model)

        self.model = model
        self.n_ctx = llama_cpp.llama_n_ctx(handle)
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.n_seq_max = n_seq_max
        self.reuse_prefixes = reuse_prefixes
        self.rng = np.random.default_rng(seed)
        self.stats = ContextStats()
        self._handle = handle
        self._memory = llama_cpp.llama_get_memory(handle)
        self._batch = batch
        self._batch_tokens = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._batch_pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._batch_wants_logits = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        self._batch_n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        self._batch_seq_slots = [batch.seq_id[i] for i in range(n_batch)]
        self._free_seqs = list(range(n_seq_max - 1, -1, -1))
        self._resident: dict[int, Branch] = {}
        self._clock = 0
        self._lock = threading.RLock()
        self.interrupt: Callable[[], None] | None = None
        """Called before each llama_decode, which then reads at most
        _INTERRUPTIBLE_PIECE tokens; raising stops the operation (its branches
        are left as they were). A search sets it to its timeout and cancel check."""

    def __repr__(self) -> str:
        return f"Context({self.model!r}, n_ctx={self.n_ctx}, resident={len(self._resident)}/{self.n_seq_max})"

    # --- branches -------------------------------------------------------------

    def new_branch(self, tokens: list[int]) -> Branch:
        """A branch holding `tokens` (decoded lazily, by the first operation on it)."""
        tokens = list(tokens)
        self._check_tokens(tokens, 0)
        return Branch(tokens)

    def fork(self, branch: Branch, n_tokens: int | None = None) -> Branch:
        """A new branch holding the first `n_tokens` of `branch` (all by default),
        sharing its cached cells."""
        with self._lock:
            self._check_live(branch)
            n = len(branch) if n_tokens is None else n_tokens
            if not 0 <= n <= len(branch):
                raise ValueError(f"cannot fork {n} tokens of a branch of {len(branch)}")
            child = Branch(branch._tokens[:n])
            shared = min(n, branch._n_cached) if branch.resident and self.reuse_prefixes else 0
            if shared:
                self._take_seq(child, protected=(branch,))
                self._copy_cells(branch, child, shared)
            return child

    def append(self, branch: Branch, tokens: list[int]) -> None:
        """Append tokens without decoding them: the next operation on the branch
        decodes them with whatever else it needs (a sampled token whose logits
        nobody wants yet costs nothing until then)."""
        with self._lock:
            self._check_live(branch)
            tokens = [int(t) for t in tokens]
            self._check_tokens(branch._tokens + tokens, len(branch))
            branch._tokens = branch._tokens + tokens

    def park(self, branch: Branch) -> None:
        """Give up the branch's sequence id but keep the branch: cells that other
        branches share stay, and the next operation on it rebuilds the rest from
        the longest prefix a resident branch holds. For a branch that will
        probably not be extended again (an expanded node, whose children hold its
        prefix), so that its sequence id goes to one that will."""
        with self._lock:
            self._check_live(branch)
            self._drop(branch)

    def release(self, branch: Branch) -> None:
        """Free the branch's sequence id; cells it shared with others stay theirs."""
        with self._lock:
            if not branch._released:
                self._drop(branch)
                branch._released = True

    # --- decoding -------------------------------------------------------------

    def extend(self, branches: list[Branch], tokens: list[int]) -> np.ndarray:
        """Append one token to each branch, decoding all of them in one batch.
        Returns each branch's next-token logits, shape (len(branches), n_vocab)."""
        if len(tokens) != len(branches):
            raise ValueError(f"extend got {len(branches)} branches but {len(tokens)} tokens")
        jobs = [Job(b, b._tokens + [int(t)], len(b), logprobs=False) for b, t in zip(branches, tokens)]
        return np.stack(self._run(jobs))

    def next_logits(self, branches: list[Branch]) -> np.ndarray:
        """Next-token logits at the end of each branch, shape (len(branches), n_vocab).
        Costs one re-decoded token per branch that is already cached."""
        for b in branches:
            if not len(b):
                raise ValueError("an empty branch has no next-token logits: start it with at least one token")
        jobs = [Job(b, b._tokens, len(b) - 1, logprobs=False) for b in branches]
        return np.stack(self._run(jobs))

    def score(self, branches: list[Branch], spans: list[list[int]]) -> list[np.ndarray]:
        """Append `spans[i]` to `branches[i]` and return the log-probability of each
        appended token given everything before it (plain softmax), all in one batch.
        Costs the branch's last token (decoded for its row: once for branches with
        the same tokens, such as siblings; again if it was cached) and the span but
        its last token, which is only appended: the next operation that needs its
        row (scoring a span after it, `next_logits`) decodes it."""
        if len(spans) != len(branches):
            raise ValueError(f"score got {len(branches)} branches but {len(spans)} spans")
        jobs = []
        for b, span in zip(branches, spans):
            if not len(b):
                raise ValueError("cannot score a span at the start of an empty branch: it needs a preceding token")
            jobs.append(Job(b, b._tokens + [int(t) for t in span], len(b) - 1, logprobs=True))
        return [np.asarray(lp, dtype=np.float64) for lp in self._run(jobs)]

    # --- inspection -----------------------------------------------------------

    def kv_cells_used(self) -> int:
        """KV cells in use, as llama.cpp counts them (shared cells count once)."""
        with self._lock:
            return _cells_in_state(self)

    @property
    def n_resident(self) -> int:
        """Branches that hold a sequence id right now."""
        return len(self._resident)

    # --- the plan -------------------------------------------------------------

    def _run(self, jobs: list[Job]) -> list:
        with self._lock:
            branches = [job.branch for job in jobs]
            if len({id(b) for b in branches}) < len(branches):
                raise ValueError("a branch may appear only once per operation")
            for job in jobs:
                self._check_live(job.branch)
                self._check_tokens(job.tokens, len(job.branch))
            return self._run_in_groups(jobs)

    def _run_in_groups(self, jobs: list[Job]) -> list:
        """Run the jobs together when they fit, else in smaller groups: more
        branches than sequence ids, or than the KV cache holds at once, still work."""
        limit = self.n_seq_max if self.reuse_prefixes else 1  # naive: one sequence at a time
        results: list = []
        for start in range(0, len(jobs), limit):  # a loop, not recursion: any number of jobs
            results += self._run_halving(jobs[start : start + limit])
        return results

    def _run_halving(self, jobs: list[Job]) -> list:
        """Run jobs together, in halves (and so on) when the KV cache cannot hold
        them all: recursion as deep as log2(n_seq_max)."""
        try:
            return self._run_together(jobs)
        except ContextFullError:
            if len(jobs) == 1:
                raise
            half = len(jobs) // 2
            return self._run_halving(jobs[:half]) + self._run_halving(jobs[half:])

    def _run_together(self, jobs: list[Job]) -> list:
        protected = tuple(job.branch for job in jobs)
        for job in jobs:
            self._prepare(job, protected)
        entries = plan_entries(jobs)
        for pos, js in entries:
            if any(pos < jobs[j].cached for j in js):
                self.stats.tokens_reread += 1
            elif pos < min(jobs[j].first_output for j in js):
                self.stats.tokens_refilled += 1
        results: list[list] = [[] for _ in jobs]
        piece = self.n_batch if self.interrupt is None else min(self.n_batch, _INTERRUPTIBLE_PIECE)
        try:
            for lo in range(0, len(entries), piece):
                if self.interrupt is not None:
                    self.interrupt()
                self._decode_chunk(jobs, entries[lo : lo + piece], results, protected)
        except BaseException:
            # Earlier chunks may have landed: cut every branch back to what
            # it held before, so its tokens and its cells agree again.
            for job in jobs:
                if job.branch.resident:
                    llama_cpp.llama_memory_seq_rm(self._memory, job.branch._seq, job.start, -1)
            raise
        for job in jobs:
            job.branch._tokens = job.tokens
            job.branch._n_cached = job.end
            if not self.reuse_prefixes:  # nothing is reused, so nothing is kept
                self._truncate(job.branch, 0)
        return [r[0] if not job.logprobs else r for r, job in zip(results, jobs)]

    def _prepare(self, job: Job, protected: tuple[Branch, ...]) -> None:
        """Make the branch resident and decide where its decode starts (at the
        first row wanted, or sooner when the cache lacks tokens before it)."""
        branch = job.branch
        if not self.reuse_prefixes:
            self._truncate(branch, 0)
        if not branch.resident:
            donor, shared = self._longest_cached_prefix(branch) if self.reuse_prefixes else (None, 0)
            # Make room without evicting the donor, unless only the donor can go.
            if donor is not None and not self._free_seqs:
                if self._evict_one(protected + (donor,)):
                    self.stats.evictions_for_seqs += 1
                else:
                    donor, shared = None, 0
            self._take_seq(branch, protected)
            if shared:
                self._copy_cells(donor, branch, shared)
        job.cached = min(branch._n_cached, len(job.tokens))
        job.start = min(branch._n_cached, job.first_output)
        self._truncate(branch, job.start)
        self.stats.tokens_reused += job.start

    def _decode_chunk(self, jobs, chunk, results, protected) -> None:
        for i, (pos, js) in enumerate(chunk):
            self._batch_tokens[i] = jobs[js[0]].tokens[pos]
            self._batch_pos[i] = pos
            self._batch_n_seq_id[i] = len(js)
            for k, j in enumerate(js):
                self._batch_seq_slots[i][k] = jobs[j].branch._seq
            self._batch_wants_logits[i] = any(jobs[j].wants_row(pos) for j in js)
        self._batch.n_tokens = len(chunk)
        while True:
            self.stats.decode_calls += 1
            started = time.perf_counter()
            status = llama_cpp.llama_decode(self._handle, self._batch)
            self.stats.decode_seconds += time.perf_counter() - started
            if status == 0:
                break
            if status == _DECODE_NO_KV_SLOT and self._evict_one(protected):
                self.stats.evictions_for_cells += 1
                continue
            if status == _DECODE_NO_KV_SLOT:
                raise ContextFullError(
                    f"the KV cache ({self.n_ctx} cells) is full with {len(protected)} branches in one "
                    "operation and nothing left to evict: raise n_ctx or work on fewer branches at once."
                )
            raise DecodeError(f"llama_decode failed with status {status}")
        self.stats.tokens_decoded += len(chunk)
        n_vocab = self.model.n_vocab
        for i, (pos, js) in enumerate(chunk):
            if not self._batch_wants_logits[i]:
                continue
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._handle, i), shape=(n_vocab,))
            for j in js:
                job = jobs[j]
                if job.wants_row(pos):
                    results[j].append(log_softmax_at(row, job.tokens[pos + 1]) if job.logprobs else row.copy())

    # --- sequence ids and cells -----------------------------------------------

    def _take_seq(self, branch: Branch, protected: tuple[Branch, ...]) -> None:
        if not self._free_seqs:
            if not self._evict_one(protected):
                raise ContextFullError(
                    f"all {self.n_seq_max} sequence ids are in use by branches of this operation: "
                    "raise n_seq_max or work on fewer branches at once."
                )
            self.stats.evictions_for_seqs += 1
        branch._seq = self._free_seqs.pop()
        branch._n_cached = 0
        self._resident[branch._seq] = branch
        self._touch(branch)

    def _drop(self, branch: Branch) -> None:
        if branch._seq is None:
            return
        llama_cpp.llama_memory_seq_rm(self._memory, branch._seq, -1, -1)
        del self._resident[branch._seq]
        self._free_seqs.append(branch._seq)
        branch._seq = None
        branch._n_cached = 0

    def _evict_one(self, protected: tuple[Branch, ...]) -> bool:
        """Evict the least recently used branch outside `protected`."""
        keep = {id(b) for b in protected}
        victims = [b for b in self._resident.values() if id(b) not in keep]
        if not victims:
            return False
        self._drop(min(victims, key=lambda b: b._last_used))
        self.stats.evictions += 1
        return True

    def _copy_cells(self, src: Branch, dst: Branch, n: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, dst._seq, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._memory, src._seq, dst._seq, 0, n)
        dst._n_cached = n
        self._touch(src)

    def _truncate(self, branch: Branch, n: int) -> None:
        if branch._seq is not None and n < branch._n_cached:
            llama_cpp.llama_memory_seq_rm(self._memory, branch._seq, n, -1)
            branch._n_cached = n
        self._touch(branch)

    def _longest_cached_prefix(self, branch: Branch) -> tuple[Branch | None, int]:
        """The resident branch whose cached tokens share the longest prefix with `branch`."""
        best, best_n = None, 0
        target = np.asarray(branch._tokens)
        for other in self._resident.values():
            n = min(other._n_cached, len(target))
            if other is branch or n <= best_n:
                continue
            diff = np.flatnonzero(np.asarray(other._tokens[:n]) != target[:n])
            shared = int(diff[0]) if diff.size else n
            if shared > best_n:
                best, best_n = other, shared
        return best, best_n

    def _touch(self, branch: Branch) -> None:
        self._clock += 1
        branch._last_used = self._clock

    # --- checks ---------------------------------------------------------------

    def _check_live(self, branch: Branch) -> None:
        if branch._released:
            raise ValueError("this branch was released; fork a live branch instead")

    def _check_tokens(self, tokens: list[int], n_old: int) -> None:
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"a sequence of {len(tokens)} tokens does not fit the context of {self.n_ctx}: "
                "raise n_ctx (up to the model's training context) or shorten the prompt."
            )
        new = np.asarray(tokens[n_old:], dtype=np.int64)
        if new.size and (new.min() < 0 or new.max() >= self.model.n_vocab):
            raise ValueError(f"token ids must be in 0..{self.model.n_vocab - 1}")


def max_sequences() -> int:
    """llama.cpp's limit on n_seq_max. Shared with the runtime settings."""
    return llama_cpp.llama_max_parallel_sequences()


def check_int_range(name: str, value, lo: int, hi: int, hi_name: str) -> None:
    """A ValueError naming the setting unless `value` is an int (not a bool) in lo..hi;
    `hi_name` says where the upper bound comes from. Shared with the runtime settings."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi} ({hi_name}), got {value!r}")


def _free_context(handle, batch, model: Model) -> None:
    """`model` is only held: while this finalizer lives, so does the model."""
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(handle)


def _cells_in_state(context: Context) -> int:
    """Used KV cells, read from the header of llama.cpp's serialized state of all
    sequences: (magic, seq_id = -1, n_stream, cell_count of stream 0, ...).
    A unified KV cache has one stream. Copies the whole cache: for tests and
    inspection, not for hot paths."""
    size = llama_cpp.llama_state_seq_get_size(context._handle, -1)
    buf = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(context._handle, buf, size, -1)
    _magic, _seq, n_stream, cell_count = np.frombuffer(bytes(buf[:16]), dtype=np.uint32)
    assert n_stream == 1, "a unified KV cache has a single stream"
    return int(cell_count)
