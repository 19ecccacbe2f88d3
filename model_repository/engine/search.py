"""Beam search inside the server: a whole window in, its best hypothesis out (model `search`).

The gateway's stepwise path sends one Triton request per token: every step of every window
pays a gRPC round trip, the gateway's event loop and Triton's queue, and a step batch holds only
the windows whose requests happen to be there (2-3 of 8 in flight, bench/results/latest.json).
Here the same search runs next to the DecoderEngine: the module given to BatchedSearch (the
gateway's gateway/asr/decoding.py, which render.py deploys as engine/beam_search.py; this
package imports nothing of the project): each window is a coroutine on one asyncio loop; a window's
``session.step()`` only queues its Step, and when every running window has queued its next
step the scheduler runs them all as ONE engine.execute (one decoder_step call per (K, T) group).
A window that arrives joins at the next step; one that finishes leaves at once (continuous
batching). A hotword-biased window brings its scorer (engine/search_hotwords.py builds it from
the request), which the search calls between steps as the gateway's stepwise search does.
"""
import asyncio
import collections
import itertools
import threading
import time

import numpy as np

from .errors import CANCELLED, INTERNAL, UNAVAILABLE, RequestError
from .heap import release_free_heap
from .state import Step

# ids of server-side sequences: far from the random 63-bit ids clients send the decoder model
_SEQUENCE_IDS = itertools.count(1 << 62)
YIELDS_PER_ROUND = 3  # event-loop turns a round waits for windows still between two steps
# Triton's is_cancelled is an IPC to the server: about 80 us on an idle machine, but a wait for
# the server's thread when both cores are busy (py-spy of the search loop on the 10-minute
# recording: 7.7% of its samples in it, asked before each of a window's steps, about every 30 ms).
# Asked at most this often per window, a window whose client hung up runs this much longer.
CANCEL_POLL_S = 0.2


class SearchRequestError(RequestError):
    """A window request the search cannot run (bad options)."""


class WindowCancelledError(RequestError):
    """The window's request was cancelled (its client hung up) before the search ended."""


def _never() -> bool:
    return False


def polled(check, interval_s: float = CANCEL_POLL_S, clock=time.monotonic):
    """``check()`` (True once something happened for good, e.g. a request cancelled) asked at most
    once per ``interval_s``; between two asks the last answer stands, and True stays True."""
    state = {"next": float("-inf"), "seen": False}

    def ask() -> bool:
        if not state["seen"]:
            now = clock()
            if now >= state["next"]:
                state["next"] = now + interval_s
                state["seen"] = bool(check())
        return state["seen"]

    return ask


class WindowJob:
    """One window: encoder output [1, S, d] plus the search options (a dict: docs/INTERFACES.md,
    model `search`), validated here."""

    __slots__ = ("encoder_output", "prompt", "options", "eot_ids", "max_length", "suppress_ids",
                 "begin_suppress_ids", "timestamp_rules", "done", "cancelled", "scorer")

    def __init__(self, encoder_output: np.ndarray, spec: dict, done, search_module, cancelled=None, scorer=None):
        """``search_module``: where DecodingOptions, StepOutput and beam_search come from;
        ``cancelled()``: True once the request is cancelled (checked before every step);
        ``scorer``: the window's hotword scorer (a TokenScorer of the search module) or None."""
        DecodingOptions = search_module.DecodingOptions
        self.cancelled = cancelled or _never
        self.scorer = scorer
        self.encoder_output = encoder_output
        self.done = done  # done(result: DecodingResult | None, error: Exception | None), loop thread
        biased = spec.get("max_biased_logprob", DecodingOptions.max_biased_logprob)  # (None: uncapped)
        try:
            self.prompt = [int(t) for t in spec["prompt"]]
            self.eot_ids = [int(t) for t in spec["eot_ids"]]
            self.max_length = int(spec["max_length"])
            self.options = DecodingOptions(
                beam_size=int(spec.get("beam_size", 5)), patience=float(spec.get("patience", 1.0)),
                length_penalty=None if spec.get("length_penalty") is None else float(spec["length_penalty"]),
                max_new_tokens=None if spec.get("max_new_tokens") is None else int(spec["max_new_tokens"]),
                max_biased_logprob=None if biased is None else float(biased))
            self.suppress_ids = [int(t) for t in spec.get("suppress_ids") or ()]
            self.begin_suppress_ids = [int(t) for t in spec.get("begin_suppress_ids") or ()]
            rules = spec.get("timestamp_rules")
            self.timestamp_rules = None if rules is None else [int(t) for t in rules]
        except KeyError as error:
            raise SearchRequestError(f"search options lack {error.args[0]!r} (prompt, eot_ids and max_length "
                                     "are required)") from error
        except (TypeError, ValueError) as error:  # DecodingOptionsError is a ValueError
            raise SearchRequestError(f"search options: {error}") from error
        if encoder_output.ndim != 3 or encoder_output.shape[0] != 1:
            raise SearchRequestError(f"encoder_output must be [1, S, d], got {list(encoder_output.shape)}")


class _EngineSession:
    """DecoderSession (gateway/asr/decoding.py) of one window: its steps go to the scheduler."""

    def __init__(self, search: "BatchedSearch", job: WindowJob):
        self.search, self.job = search, job
        self.cid = next(_SEQUENCE_IDS)
        self.started = False
        self.round_steps = 0  # steps of all windows in the rounds this window's steps ran in
        self.steps = 0

    async def step(self, input_ids, parent_beams, top_k, extra_ids):
        # the client went away: no more steps, the END frees the cache (the search model polls
        # Triton's is_cancelled at most every CANCEL_POLL_S)
        if self.job.cancelled():
            raise WindowCancelledError("search: the request was cancelled", CANCELLED)
        inputs = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)[np.newaxis],
                  "top_k": np.array([[top_k]], dtype=np.int32)}
        start = not self.started
        if start:
            job = self.job
            inputs["encoder_output"] = np.ascontiguousarray(job.encoder_output, dtype=np.float32)
            if job.suppress_ids:
                inputs["suppress_ids"] = np.array([job.suppress_ids], dtype=np.int32)
            if job.begin_suppress_ids:
                inputs["begin_suppress_ids"] = np.array([job.begin_suppress_ids], dtype=np.int32)
            if job.timestamp_rules is not None:
                inputs["timestamp_rules"] = np.array([job.timestamp_rules], dtype=np.int32)
        elif parent_beams is not None:
            inputs["parent_beams"] = np.ascontiguousarray(parent_beams, dtype=np.int32)[np.newaxis]
        if extra_ids is not None and extra_ids.size:
            inputs["extra_ids"] = np.ascontiguousarray(extra_ids, dtype=np.int32)[np.newaxis]
        self.started = True
        step = Step(0, self.cid, start=start)
        self.search.engine.parse(step, inputs)
        done = asyncio.get_running_loop().create_future()
        self.search.queue_step(step, done)
        step, round_size = await done
        self.round_steps += round_size
        self.steps += 1
        if step.error is not None:
            raise RequestError(step.error, step.code)
        out = step.output
        return self.search.module.StepOutput(
            topk_logprobs=out.topk_logprobs[0], topk_ids=out.topk_ids[0].astype(np.int64),
            extra_logprobs=out.extra_logprobs[0])

    async def close(self):
        if self.started:  # an END with zero beams frees the sequence with the next round
            step = Step(0, self.cid, end=True)
            self.search.engine.parse(step, {"input_ids": np.zeros((1, 0, 1), np.int64)})
            self.search.queue_step(step, None)


class BatchedSearch:
    """Runs windows' beam searches on one background event loop, their steps batched together.

    ``submit(job)`` may be called from any thread; ``job.done(result, error)`` is called on the
    loop's thread, the result (a DecodingResult) with ``mean_round_steps`` set: the windows'
    steps per decoder round this window's steps ran in (1.0: it ran alone).
    At most ``max_windows`` windows search at once (the others wait, in order), at most
    ``max_waiting`` wait (beyond: refused at once)."""

    def __init__(self, engine, search_module, max_windows: int = 16, max_waiting: int = 256, logger=None,
                 heap_trim_s: float = 0.0):
        if max_windows < 1 or max_waiting < 0:
            raise ValueError("max_windows must be >= 1 and max_waiting >= 0")
        self.engine, self.module, self.logger = engine, search_module, logger
        self.max_windows, self.max_waiting = max_windows, max_waiting
        self.heap_trim_s = heap_trim_s  # > 0: the C heap's free pages go back at most this often
        self.loop = asyncio.new_event_loop()
        self._pending = []  # (Step, future or None) queued for the next round
        self._waiting = collections.deque()  # jobs not started yet
        self._running = 0
        self._wake = None
        self.rounds = 0  # engine.execute calls (tests)
        self._thread = threading.Thread(target=self._run_loop, name="search-loop", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()

    # ------------------------------------------------------------------ any thread
    def job(self, encoder_output: np.ndarray, spec: dict, done, cancelled=None, scorer=None) -> WindowJob:
        """A window for submit(); raises SearchRequestError on bad options."""
        return WindowJob(encoder_output, spec, done, self.module, cancelled, scorer)

    def submit(self, job: WindowJob) -> None:
        self.loop.call_soon_threadsafe(self._admit, job)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the loop once the sequences of finished windows are freed (windows still
        searching are dropped: their sequences go with the engine)."""
        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout_s)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)

    # ------------------------------------------------------------------ loop thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._wake = asyncio.Event()
        self._scheduler_task = self.loop.create_task(self._scheduler())
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def _admit(self, job: WindowJob) -> None:
        if len(self._waiting) >= self.max_waiting and self._running >= self.max_windows:
            job.done(None, RequestError(f"search: {self.max_waiting} windows already waiting; try again later",
                                        UNAVAILABLE))
            return
        self._waiting.append(job)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and self._running < self.max_windows:
            self._running += 1
            self.loop.create_task(self._window(self._waiting.popleft()))

    async def _window(self, job: WindowJob) -> None:
        session = _EngineSession(self, job)
        try:
            if job.cancelled():  # cancelled while it waited for a slot: nothing to search
                raise WindowCancelledError("search: the request was cancelled", CANCELLED)
            result = await self.module.beam_search(session, job.prompt, job.options, eot_id=job.eot_ids,
                                                   max_length=job.max_length, scorer=job.scorer)
        except WindowCancelledError as error:
            outcome = (None, error)
            if self.logger is not None:
                self.logger.log_info(f"search: window cancelled by its client after {session.steps} steps")
        except Exception as error:  # noqa: BLE001 - reported to that window only
            outcome = (None, error)
        else:
            result.mean_round_steps = session.round_steps / max(1, result.n_steps)
            outcome = (result, None)
        finally:
            await session.close()
            self._running -= 1
            self._start_waiting()
        try:
            job.done(*outcome)
        except Exception as error:  # noqa: BLE001 - a failed reply must not stop the loop
            if self.logger is not None:
                self.logger.log_error(f"search: reply failed: {error!r}")

    async def _shutdown(self) -> None:
        self._scheduler_task.cancel()
        ends = [step for step, done in self._pending if done is None]
        self._pending = [(step, done) for step, done in self._pending if done is not None]
        if ends:
            self.engine.execute(ends)

    def queue_step(self, step: Step, done) -> None:
        self._pending.append((step, done))
        self._wake.set()

    async def _scheduler(self) -> None:
        profile = self.engine.profile  # None unless profiling is on
        last_round_end = None
        last_trim = time.perf_counter()
        while True:
            await self._wake.wait()
            self._wake.clear()
            # the other running windows are a few event-loop turns from their next step: wait for
            # them (a round of all windows costs one decoder call, a round of one costs the same)
            for _ in range(YIELDS_PER_ROUND):
                if self._waiting_for_steps() == 0:
                    break
                await asyncio.sleep(0)
            batch, self._pending = self._pending, []
            if not batch:
                continue
            steps = [step for step, _ in batch]
            for index, step in enumerate(steps):
                step.index = index
            if profile is not None and last_round_end is not None and self._running:
                # the search's own Python between two rounds (candidates, bookkeeping, scheduling)
                profile.add("search_python", time.perf_counter() - last_round_end)
            try:
                self.engine.execute(steps)
            except Exception as error:  # noqa: BLE001 - the engine reports per step; this is a bug
                for step in steps:
                    if step.output is None and step.error is None:
                        step.error, step.code = f"search round failed: {error!r}", INTERNAL
            self.rounds += 1
            searching = sum(1 for _, done in batch if done is not None)  # (ENDs ride along)
            for step, done in batch:
                if done is not None and not done.done():
                    done.set_result((step, searching))
            last_round_end = time.perf_counter()
            if self.heap_trim_s > 0 and last_round_end - last_trim >= self.heap_trim_s:
                # what the rounds freed (logits, slabs of groups that changed, cross K/V of ended
                # windows) goes back: glibc's heap otherwise keeps its high-water mark
                release_free_heap()
                last_trim = time.perf_counter()
                if profile is not None:
                    profile.add("heap_trim", last_trim - last_round_end)
                last_round_end = last_trim

    def _waiting_for_steps(self) -> int:
        """Running windows that have not queued their next step yet."""
        queued = sum(1 for step, done in self._pending if done is not None)
        return max(0, self._running - queued)
