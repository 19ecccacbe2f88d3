"""Server-side hotword lists: every ``*.txt`` of a directory (``phrase [weight]`` lines),
merged and reloaded when a file changes; per-request phrases are merged in by ``scorer()``."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

from gateway.asr.hotwords import (
    MAX_PHRASES,
    ContextGraph,
    Hotword,
    HotwordError,
    HotwordOptions,
    HotwordScorer,
    TokenVocabulary,
    load_hotword_file,
    parse_hotwords,
)

log = logging.getLogger(__name__)



class HotwordRegistry:
    """Server-side hotword lists: every ``*.txt`` in a directory, merged.

    ``reload()`` re-reads them now (raises HotwordError and keeps the previous lists on a
    bad file); ``scorer()`` first checks, at most every ``check_interval_s``, whether a
    file was added, removed or modified (mtime/size) and reloads then (logging errors and
    keeping the previous lists). Thread-safe.
    """

    def __init__(
        self,
        directory: Path | str | None,
        vocabulary: TokenVocabulary,
        *,
        options: HotwordOptions = HotwordOptions(),
        check_interval_s: float = 2.0,
        request_cache_size: int = 32,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.vocabulary = vocabulary
        self.options = options
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._graph = ContextGraph((), vocabulary, variants=options.variants)
        self._weights: dict[str, float] = {}
        self._terms: frozenset[str] = frozenset()
        self._signature: tuple = ()
        self._last_check = 0.0
        self._request_graphs: OrderedDict[tuple, ContextGraph] = OrderedDict()
        self._request_cache_size = request_cache_size
        self.last_error: str | None = None
        self.loaded_at: float | None = None
        if self.directory is not None:
            self.reload()

    # loading ----------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if self.directory is None:
            return []
        if not self.directory.is_dir():
            raise HotwordError(f"hotword directory {self.directory} does not exist")
        return sorted(p for p in self.directory.glob("*.txt") if p.is_file())

    def _current_signature(self) -> tuple:
        sig = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                continue
            sig.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def reload(self) -> int:
        """Re-read every list now; returns the number of phrases. HotwordError keeps the old lists."""
        with self._lock:
            signature = self._current_signature()
            merged: dict[str, float] = {}
            for path in self._files():
                for hw in load_hotword_file(path):
                    merged[hw.phrase] = max(hw.weight, merged.get(hw.phrase, 0.0))
            if len(merged) > MAX_PHRASES:
                raise HotwordError(f"{self.directory}: {len(merged)} hotwords in all lists; at most {MAX_PHRASES}")
            started = time.perf_counter()
            graph = ContextGraph(tuple(Hotword(p, w) for p, w in merged.items()), self.vocabulary, variants=self.options.variants)
            self._graph, self._weights, self._signature = graph, merged, signature
            self._terms = frozenset(merged)
            self._request_graphs.clear()
            self._last_check = time.monotonic()
            self.loaded_at = time.time()
            self.last_error = None
            log.info("hotwords: %d phrases from %s (graph built in %.0f ms)", len(merged), self.directory, 1000 * (time.perf_counter() - started))
            return len(merged)

    def maybe_reload(self) -> bool:
        """Reload when a list changed (checked at most every check_interval_s). True if reloaded."""
        if self.directory is None or time.monotonic() - self._last_check < self.check_interval_s:
            return False
        self._last_check = time.monotonic()
        try:
            if self._current_signature() == self._signature:
                return False
            self.reload()
            return True
        except HotwordError as exc:
            if str(exc) != self.last_error:
                log.error("hotword lists not reloaded, keeping the previous ones: %s", exc)
            self.last_error = str(exc)
            return False

    @property
    def phrases(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def terms(self) -> frozenset[str]:
        """The listed phrases (same object until the next reload): e.g. ``ItnOptions(protected_terms=...)``."""
        return self._terms

    # scorers ----------------------------------------------------------------------------
    def _request_graph(self, hotwords: tuple[Hotword, ...]) -> ContextGraph:
        key = tuple(sorted((h.phrase, h.weight) for h in hotwords))
        with self._lock:
            graph = self._request_graphs.get(key)
            if graph is not None:
                self._request_graphs.move_to_end(key)
                return graph
        graph = ContextGraph(hotwords, self.vocabulary, variants=self.options.variants)
        with self._lock:
            self._request_graphs[key] = graph
            while len(self._request_graphs) > self._request_cache_size:
                self._request_graphs.popitem(last=False)
        return graph

    def scorer(
        self,
        request_hotwords: Mapping[str, float] | Iterable[Hotword | str] | None = None,
        *,
        use_server_lists: bool = True,
        boost: float | None = None,
    ) -> HotwordScorer | None:
        """Scorer for server lists + per-request hotwords; None when both are empty.

        A phrase in both gets the larger weight. Raises HotwordError on invalid request input.
        """
        options = self.options if boost is None else HotwordOptions(boost, self.options.max_extra_ids, self.options.variants)
        parsed = parse_hotwords(request_hotwords)
        self.maybe_reload()
        server = self._graph if use_server_lists else None
        weights = self._weights if use_server_lists else {}
        extra = []
        for hw in parsed:
            delta = hw.weight - weights.get(hw.phrase, 0.0)
            if delta > 1e-9:
                extra.append(Hotword(hw.phrase, delta))
        graphs = [g for g in (server, self._request_graph(tuple(extra)) if extra else None) if g is not None and len(g)]
        if not graphs:
            return None
        return HotwordScorer(graphs, options)


def default_hotword_dir() -> Path:
    return Path(os.environ.get("ASR_HOTWORD_DIR", Path(__file__).resolve().parents[2] / "config" / "hotwords"))
