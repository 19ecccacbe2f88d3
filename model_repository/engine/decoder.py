"""DecoderEngine: the stateful decoder of docs/INTERFACES.md without Triton.

One Step is one decoding step of one sequence (all its K beams); execute() takes the steps of
several sequences at once (what Triton's `oldest` sequence batcher hands the model). Each step
reorders its sequence's cache by parent_beams; the steps are grouped by (K, T) and each group
runs as few decoder_step calls as the planner allows (past padded to the group's longest,
past_length masks the rest); the new K/V are appended and each step gets top-k log-probs
(log_softmax after suppression and timestamp rules) plus the log-probs of its extra ids. END
frees the sequence; sequences idle longer than sequence_idle_timeout_s are evicted; at most
max_sequences are held.

What differs between model families is in runners/ (one runner per family).
"""
import threading
import time
import traceback

import numpy as np

from .config import DecoderSettings, param
from .errors import INTERNAL, RequestError
from .heap import configure_heap, release_free_heap
from .kv_cache import gather, release
from .planner import plan
from .profile import profiler
from .pool import BufferPool
from .runners import runner_class
from .scoring import empty_output, score
from .sequences import SequenceTable
from .step_input import parse_step

MAX_LOGGED_EVICTIONS = 20
JANITOR_PERIOD_S = (1.0, 30.0)  # bounds of the janitor's period (half the idle timeout)


class DecoderEngine:
    def __init__(self, version_dir: str, config: dict, logger, settings: DecoderSettings = None,
                 role: str = "decoder"):
        self.logger = logger
        self.settings = settings or DecoderSettings.from_config(config)
        # before the sessions start their threads (each would get its own malloc arena)
        heap = configure_heap(self.settings.heap_mmap_threshold_bytes, self.settings.heap_arena_max)
        family = self.settings.family
        self.runner = runner_class(family)(version_dir, config, logger)
        if self.runner.family != family:
            logger.log_warn(f"unknown decoder family {family!r}: running it as {self.runner.family}")
        self.vocab = self.settings.vocab or self.runner.graph_vocab()
        self.pool = BufferPool(self.settings.buffer_pool_bytes)
        self.table = SequenceTable(self.settings, self.pool)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.profile = profiler(role)  # None unless ASR_ENGINE_PROFILE_DIR is set
        s = self.settings
        logger.log_info(
            f"decoder ready: family={param(config, 'family', '?')} model={param(config, 'model_name', '?')} "
            f"precision={param(config, 'precision', '?')} vocab={self.vocab} max_positions={s.max_positions} "
            f"max_sequences={s.max_sequences} idle_timeout={s.idle_timeout_s}s "
            f"per-layer inputs={sorted(self.runner.split) or 'none'} heap: {', '.join(heap) or 'glibc defaults'}")
        if s.warmup:
            self.runner.warmup()
        release_free_heap()  # the warm-up's activations and cross K/V

    # ------------------------------------------------------------------ steps in, outputs out
    def parse(self, step, inputs: dict) -> None:
        """Fill `step` from its input arrays; a bad step gets its error (never raises)."""
        try:
            parse_step(step, inputs, self.vocab, self.settings.default_top_k)
        except Exception as error:  # noqa: BLE001 - reported to that request only
            self.fail(step, error)

    def execute(self, steps, now: float = None) -> None:
        """Run the steps (parsed; those with an error are only reported); sets each step's
        `output` or `error` + `code`."""
        with self._lock:
            started = time.perf_counter()
            self._execute(steps, time.monotonic() if now is None else now)
            if self.profile is not None:
                self.profile.add("execute", time.perf_counter() - started)
                self.profile.count("requests", len(steps))

    def _execute(self, steps, now: float) -> None:
        started = time.perf_counter()
        self._log_evictions(now)
        self.table.last_active = now
        stats = []
        # steps of one sequence must run one after another: split duplicates into rounds
        pending = [s for s in steps if s.error is None]
        while pending:
            seen, this, rest = set(), [], []
            for step in pending:
                (rest if step.cid in seen else this).append(step)
                seen.add(step.cid)
            self._process_round(this, now, stats)
            for step in this:
                if step.end and step.cid is not None:
                    self.table.drop(step.cid)
            pending = rest
        for step in steps:
            if step.error is not None and step.end and step.cid not in (None, 0, ""):
                self.table.drop(step.cid)
        self.logger.log_verbose(
            f"decoder execute: {len(steps)} requests ({sum(s.start for s in steps)} start, "
            f"{sum(s.end for s in steps)} end, {sum(s.error is not None for s in steps)} errors), "
            f"groups [{'; '.join(stats)}], {len(self.table)} live sequences, "
            f"{1e3 * (time.perf_counter() - started):.1f} ms")

    def _log_evictions(self, now: float) -> None:
        self.table.evict_idle(now)
        evicted = self.table.evicted
        if evicted:  # (logged here: the janitor thread does not log)
            self.logger.log_info(f"decoder: evicted idle sequences {', '.join(evicted[:MAX_LOGGED_EVICTIONS])}"
                                 f"{' ...' if len(evicted) > MAX_LOGGED_EVICTIONS else ''}")
            evicted.clear()

    def _process_round(self, steps, now: float, stats: list) -> None:
        """Steps of distinct sequences: bind each, then run them by (K, T) group."""
        groups = {}
        self.table.pending_starts = 0
        for step in steps:
            try:
                self.table.bind(step, now)
            except RequestError as error:
                step.error, step.code = str(error), error.code
                continue
            if step.K == 0:
                step.output = empty_output(step.top_k)
                if step.seq is not None:
                    step.seq.last_used = now
                continue
            groups.setdefault((step.K, step.T), []).append(step)
        for (K, T), members in groups.items():
            t0 = time.perf_counter()
            detail = self._step_group(members, K, T, now)
            stats.append(f"N={len(members)} K={K} T={T} {1e3 * (time.perf_counter() - t0):.1f}ms ({detail})")

    # ------------------------------------------------------------------ one (K, T) group
    def _step_group(self, members, K: int, T: int, now: float) -> str:
        """Run one (K, T) group; sets output / error per member; returns timings for the log."""
        notes = []
        starts = [q for q in members if q.start]
        if starts:
            t0 = time.perf_counter()
            try:
                cross = self.runner.start(starts, self.fail)
                if cross is not None:
                    self.table.cross.add([q.seq for q in starts], cross)
            except Exception as error:  # noqa: BLE001 - fails these START requests only
                for q in starts:
                    self.fail(q, error)
                members = [q for q in members if not q.start]
            notes.append(f"init {1e3 * (time.perf_counter() - t0):.1f}")
            if self.profile is not None:
                self.profile.add("init", time.perf_counter() - t0, len(starts))
        members.sort(key=lambda q: -1 if q.seq.row is None else q.seq.row)
        calls = plan(members, lambda q: q.seq.row, views=self.runner.cross_views,
                     max_runs=self.settings.max_runs, max_dummy_fraction=self.settings.max_dummy_fraction)
        for slots, view in calls:
            notes.append(self._run_or_retry(slots, K, T, now, view))
        for q in starts:  # a START that failed leaves nothing behind
            if q.error is not None:
                self.table.discard(q.seq)
        return "; ".join(n for n in notes if n)

    def _run_or_retry(self, slots, K: int, T: int, now: float, view: bool) -> str:
        """One call; when a call of several sequences fails, each runs again alone (one bad step
        must not fail the others)."""
        try:
            return self._run(slots, K, T, now, view)
        except Exception as error:  # noqa: BLE001
            run = [q for q in slots if q is not None]
            if len(run) == 1:
                self.fail(run[0], error)
                return ""
            self.logger.log_warn(f"decoder run of {len(run)} sequences (K={K}, T={T}) failed: "
                                 f"{self.describe(error)}; retrying one by one")
            for q in run:
                q.error = q.output = None
                try:
                    self._run([q], K, T, now, self.runner.cross_views)
                except Exception as single:  # noqa: BLE001
                    self.fail(q, single)
            return ""

    def _run(self, slots, K: int, T: int, now: float, contiguous: bool) -> str:
        """One decoder_step call for the slots: consecutive cross rows fed as views when
        ``contiguous`` (None slots are dummies), else the members' rows copied together."""
        run = [q for q in slots if q is not None]
        N = len(slots)
        t0 = time.perf_counter()
        cross = None
        if self.runner.has_cross:
            cross = self.table.cross.rows([q.seq if q is not None else None for q in slots] if contiguous
                                          else [q.seq for q in run], contiguous, self.pool)
        kv, kv_new = None, False
        try:
            tg = time.perf_counter()
            kv, kv_new = gather(slots, K, T, self.runner.kv_dims, self.table.cross.dims, self.runner.kv_dtype,
                                self.pool, self.settings.reorder_in_place)
            tg = time.perf_counter() - tg
            dummy = np.zeros((1, K, T), np.int64)
            ids = run[0].ids if N == 1 else np.concatenate([q.ids if q is not None else dummy for q in slots], axis=0)
            lengths = np.array([q.seq.length if q is not None else 0 for q in slots], dtype=np.int64)
            feeds = self.runner.feeds(slots, ids, lengths, kv, cross, self.fail)
            t1 = time.perf_counter()
            logits, new_k, new_v = self.runner.run(feeds)
            t2 = time.perf_counter()
            logits = self._real_rows(slots, logits, new_k, K, T)
            score(run, logits)
            t3 = time.perf_counter()
            self._commit(slots, kv, kv_new, new_k, new_v, K, T, now)
            if self.profile is not None:
                t4, p = time.perf_counter(), self.profile
                p.add("ort", t2 - t1)
                p.add("kv", tg + (t4 - t3))
                p.add("score", t3 - t2)
                p.add("prep", t1 - t0 - tg)
                p.count("rows", len(run))
        finally:
            if kv_new and kv.live == 0:  # nobody took the new slab (errors): back to the pool
                kv.live = 1
                release(kv, self.pool)
            if not contiguous and cross is not None:
                for array in cross.values():
                    self.pool.put(array)
        return (f"N={len(run)}{f'+{N - len(run)} dummy' if N > len(run) else ''} prep {1e3 * (t1 - t0):.1f}"
                f"{'' if contiguous else '+cross copy'}{'+gather' if kv_new else ''} "
                f"ort {1e3 * (t2 - t1):.1f} post {1e3 * (t3 - t2):.1f} commit {1e3 * (time.perf_counter() - t3):.1f}")

    def _real_rows(self, slots, logits: np.ndarray, new_k: np.ndarray, K: int, T: int) -> np.ndarray:
        """The logits of the real (not dummy) slots, writeable (the rules write into them)."""
        N = len(slots)
        if logits.shape[:2] != (N, K) or new_k.shape[4] != T:
            raise RuntimeError(f"decoder_step returned logits {list(logits.shape)}, new_k {list(new_k.shape)} "
                               f"for N={N}, K={K}, T={T}")
        if self.vocab is None:
            self.vocab = int(logits.shape[-1])
        real = [n for n, q in enumerate(slots) if q is not None]
        if len(real) < N:
            return logits[real]  # (a copy)
        return logits if logits.flags.writeable else logits.copy()

    def _commit(self, slots, kv, kv_new: bool, new_k, new_v, K: int, T: int, now: float) -> None:
        """Append the new K/V and point the sequences at the (possibly new) cache slab."""
        for n, q in enumerate(slots):
            if q is None or q.error is not None:
                continue
            seq = q.seq
            p = seq.length
            kv.k[:, n, :, :, p:p + T] = new_k[:, n]
            kv.v[:, n, :, :, p:p + T] = new_v[:, n]
            if kv_new:
                old, seq.kv, seq.kv_idx = seq.kv, kv, n
                kv.live += 1
                release(old, self.pool)
            seq.length = p + T
            seq.beams = K
            seq.steps += 1
            seq.last_used = now
            if q.start:
                self.table.seqs[q.cid] = seq

    # ------------------------------------------------------------------ errors
    def fail(self, step, error: Exception) -> None:
        """Report `error` to `step` (RequestError: its message and code; anything else: INTERNAL)."""
        step.error = self.describe(error)
        step.code = error.code if isinstance(error, RequestError) else INTERNAL

    def describe(self, error: Exception) -> str:
        if isinstance(error, RequestError):
            return str(error)
        self.logger.log_error(f"decoder step failed: {error!r}\n{traceback.format_exc()}")
        text = str(error).strip().splitlines()
        return f"decoder inference failed: {type(error).__name__}: {text[-1][:500] if text else ''}"

    # ------------------------------------------------------------------ lifetime
    def start_janitor(self) -> None:
        """Evict idle sequences and free idle memory even when no request comes."""
        period = max(JANITOR_PERIOD_S[0], min(JANITOR_PERIOD_S[1], self.settings.idle_timeout_s / 2))

        def sweep():
            while not self._stop.wait(period):
                with self._lock:
                    self.table.evict_idle(time.monotonic())

        threading.Thread(target=sweep, name="decoder-janitor", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self.table.drop_all()
        self.runner.close()
        if self.profile is not None:
            self.profile.close()
