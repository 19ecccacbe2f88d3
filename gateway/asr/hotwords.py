"""Hotword biasing: an Aho-Corasick context graph applied inside beam search.

A :class:`HotwordScorer` implements :class:`gateway.asr.decoding.TokenScorer`. It runs an
Aho-Corasick automaton (goto + failure arcs) over the *characters* the hypothesis
spells, so every tokenization of a phrase matches, including tokens that split a
character's UTF-8 bytes or merge a character of the phrase with its neighbour:

- characters are compared after simplified-Chinese conversion and case folding, so
  ``朝陽區``, ``朝阳区`` and the mixed ``朝阳區`` Whisper sometimes writes all match;
- every matched character of a phrase earns ``boost * weight`` (natural-log units, the
  same scale as the model's log-probs); a byte prefix of the next character earns its
  share, so the token that starts a split character is pulled up too;
- when a partial match breaks (or the hypothesis ends) the bonus it earned is taken
  back; a completed phrase keeps ``boost * weight * len(phrase)``, the first time it
  completes in a hypothesis (a repeat earns nothing: biasing must not reward loops such
  as 麦子店麦子店麦子店). Formally the bonus of a hypothesis is ``distinct completed
  phrases + partial(current node)``, and each step adds the difference, so cancellation
  is exact;
- these are *nominal* bonuses: beam search grants at most what lifts a token to log-prob 0,
  none where the model wants to end the text, and takes back exactly what it granted
  (``gateway.asr.decoding``, ``DecodingOptions.max_biased_logprob``);
- :meth:`HotwordScorer.extra_ids` names the tokens that continue the match (from the
  tokenizations of the phrase, its traditional/simplified variants, with and without a
  leading space) so the decoder returns their log-probs even outside its top-k.

Hotwords come from server-side lists (:class:`gateway.asr.hotword_lists.HotwordRegistry`:
``phrase [weight]`` lines in ``*.txt`` files of a directory, reloaded when a file changes)
and per request (``{phrase: weight}``); the registry's ``scorer()`` merges both. Invalid input raises
:class:`HotwordError` (a ``ValueError``; the server maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import codecs
import functools
import logging
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zhconv

log = logging.getLogger(__name__)

MAX_PHRASES = 10_000  # per request and per server-side list directory
MAX_PHRASE_CHARS = 64
MAX_PHRASE_TOKENS = 64  # longest tokenization of any variant
MIN_WEIGHT = 0.0  # exclusive
MAX_WEIGHT = 10.0
DEFAULT_WEIGHT = 1.0
DEFAULT_BOOST = 3.5  # measured best recall without false insertions (bench/hotwords.py)
MAX_BOOST = 10.0
DEFAULT_MAX_EXTRA_IDS = 16
MAX_FILE_BYTES = 4 << 20
MAX_REWARDED_PHRASES = 8  # distinct phrases that pay per hypothesis (one 30 s window)

_MEMO_LIMIT = 200_000  # (state, token) transitions cached per scorer


class HotwordError(ValueError):
    """A hotword, a hotword list file or a hotword option is invalid."""


# ---------------------------------------------------------------------------------------
# options and input validation


@dataclass(frozen=True)
class HotwordOptions:
    boost: float = DEFAULT_BOOST  # bonus per matched character of a weight-1 phrase
    max_extra_ids: int = DEFAULT_MAX_EXTRA_IDS  # extra token ids asked for per beam and step
    variants: bool = True  # also match/propose the traditional (or simplified) spelling

    def __post_init__(self) -> None:
        if isinstance(self.boost, bool) or not isinstance(self.boost, (int, float)) or not (
            math.isfinite(self.boost) and 0.0 <= self.boost <= MAX_BOOST
        ):
            raise HotwordError(f"hotword boost must be a number in [0, {MAX_BOOST}], got {self.boost!r}")
        if isinstance(self.max_extra_ids, bool) or not isinstance(self.max_extra_ids, int) or not (
            0 <= self.max_extra_ids <= 1024
        ):
            raise HotwordError(f"max_extra_ids must be an int in 0..1024, got {self.max_extra_ids!r}")


@dataclass(frozen=True)
class Hotword:
    phrase: str
    weight: float = DEFAULT_WEIGHT


def _check_weight(weight: object, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise HotwordError(f"{where}: weight must be a number, got {weight!r}")
    weight = float(weight)
    if not (math.isfinite(weight) and MIN_WEIGHT < weight <= MAX_WEIGHT):
        raise HotwordError(f"{where}: weight must be in ({MIN_WEIGHT:g}, {MAX_WEIGHT:g}], got {weight!r}")
    return weight


def _check_phrase(phrase: object, where: str) -> str:
    if isinstance(phrase, bytes):
        try:
            phrase = phrase.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HotwordError(f"{where}: phrase is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(phrase, str):
        raise HotwordError(f"{where}: phrase must be a string, got {type(phrase).__name__}")
    phrase = unicodedata.normalize("NFC", phrase.strip())
    if not phrase:
        raise HotwordError(f"{where}: empty phrase")
    try:
        phrase.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: text that was not UTF-8 to begin with
        raise HotwordError(f"{where}: phrase {phrase!r} is not valid Unicode text") from None
    bad = next((c for c in phrase if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")), None)
    if bad is not None:
        raise HotwordError(f"{where}: phrase {phrase!r} contains control or unassigned character U+{ord(bad):04X}")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise HotwordError(f"{where}: phrase of {len(phrase)} characters is longer than {MAX_PHRASE_CHARS}")
    return phrase


def parse_hotwords(hotwords: Mapping[str, float] | Iterable[Hotword | str] | None, *, source: str = "request") -> tuple[Hotword, ...]:
    """Validated hotwords from ``{phrase: weight}`` (weight None/0 -> default) or Hotword/str items.

    A phrase given twice keeps its largest weight. Raises HotwordError on anything invalid.
    """
    if hotwords is None:
        return ()
    if isinstance(hotwords, (str, bytes)):
        raise HotwordError(f"{source}: hotwords must be a mapping or a list of phrases, not a single string")
    if isinstance(hotwords, Mapping):
        items: Iterable = hotwords.items()
    else:
        items = ((h.phrase, h.weight) if isinstance(h, Hotword) else (h, None) for h in hotwords)
    merged: dict[str, float] = {}
    for i, (phrase, weight) in enumerate(items):
        where = f"{source} hotword #{i + 1}"
        phrase = _check_phrase(phrase, where)
        weight = DEFAULT_WEIGHT if weight is None or (not isinstance(weight, bool) and weight == 0) else _check_weight(weight, f"{where} {phrase!r}")
        merged[phrase] = max(weight, merged.get(phrase, 0.0))
        if len(merged) > MAX_PHRASES:
            raise HotwordError(f"{source}: more than {MAX_PHRASES} hotwords")
    return tuple(Hotword(p, w) for p, w in merged.items())


def parse_hotword_text(text: str | bytes, *, source: str = "<text>") -> tuple[Hotword, ...]:
    """``phrase [weight]`` lines; ``#`` starts a comment line; blank lines are skipped.

    The weight is the last whitespace-separated field when it parses as a number, so
    phrases may contain spaces (``Chaoyang District 2``).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise HotwordError(f"{source}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    entries: list[Hotword] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        phrase, weight = line, None
        parts = line.rsplit(None, 1)
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                pass
            else:
                phrase = parts[0]
                weight = _check_weight(weight, f"{source}:{lineno}")
        entries.append(Hotword(_check_phrase(phrase, f"{source}:{lineno}"), DEFAULT_WEIGHT if weight is None else weight))
    return parse_hotwords(entries, source=source)


def load_hotword_file(path: Path | str) -> tuple[Hotword, ...]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise HotwordError(f"{path}: {size} bytes is larger than {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise HotwordError(f"cannot read hotword list {path}: {exc.strerror or exc}") from None
    return parse_hotword_text(data, source=str(path))


# ---------------------------------------------------------------------------------------
# token bytes


class TokenVocabulary(Protocol):
    """What the graph needs from a tokenizer."""

    def token_bytes(self, token_id: int) -> bytes | None:
        """UTF-8 bytes a token adds to the text; None for special tokens (ignored by the graph)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE token strings -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class ByteLevelVocabulary:
    """Token bytes and batch encoding for a byte-level BPE ``tokenizers.Tokenizer`` (Whisper's,
    GLM-ASR's): ids ``>= vocab_size``, those in ``ignore_ids`` (special/added tokens) and ids
    whose string is not GPT-2 byte-level map to None."""

    def __init__(self, tokenizer, ignore_ids: Iterable[int], vocab_size: int) -> None:
        self._tokenizer = tokenizer
        decoder = _byte_decoder()
        ignore = frozenset(int(i) for i in ignore_ids)
        self.ignore_ids, self.size = tuple(sorted(ignore)), int(vocab_size)  # (scorer_wire)
        table: list[bytes | None] = []
        for token_id in range(int(vocab_size)):
            piece = tokenizer.id_to_token(token_id)
            if not piece or token_id in ignore or any(c not in decoder for c in piece):
                table.append(None)
            else:
                table.append(bytes(decoder[c] for c in piece))
        self._table = table

    def token_bytes(self, token_id: int) -> bytes | None:
        return self._table[token_id] if 0 <= token_id < len(self._table) else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class WhisperVocabulary(ByteLevelVocabulary):
    """The vocabulary of a :class:`gateway.asr.tokenizer.WhisperTokenizer` (control and timestamp tokens ignored)."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer.backend, tokenizer.special_ids, tokenizer.timestamp_begin)


# ---------------------------------------------------------------------------------------
# the context graph


@functools.lru_cache(maxsize=65536)
def normalize_char(ch: str) -> str:
    """What the automaton compares: simplified Chinese, case-folded, NFKC (full-width -> ASCII)."""
    folded = unicodedata.normalize("NFKC", ch).casefold()
    if len(folded) != 1:
        folded = ch.casefold() if len(ch.casefold()) == 1 else ch
    if "\u3400" <= folded <= "\u9fff" or "\uf900" <= folded <= "\ufaff":
        simplified = zhconv.convert(folded, "zh-cn")
        if len(simplified) == 1:
            return simplified
    return folded


def _surface_variants(phrase: str, with_variants: bool) -> list[str]:
    forms = [phrase]
    if with_variants and any("\u3400" <= c <= "\u9fff" for c in phrase):
        for locale in ("zh-cn", "zh-hant"):
            form = zhconv.convert(phrase, locale)
            if len(form) == len(phrase) and form not in forms:
                forms.append(form)
    return forms


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Complete characters of ``data`` and the trailing bytes of an unfinished one."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=False)
    rest, _ = decoder.getstate()
    return text, bytes(rest)


GraphState = tuple  # (node, pending bytes of an unfinished character, frozenset of completed phrases)
INITIAL_STATE: GraphState = (0, b"", frozenset())


class ContextGraph:
    """Aho-Corasick automaton over normalized characters of weighted phrases.

    Node 0 is the root. Per node: ``partial`` = bonus earned by the unfinished match that
    ends here (taken back if it breaks), ``outputs`` = the phrases that end here (this
    node's phrase and, via failure arcs, its suffixes) with their scores. A phrase pays
    its score the first time it completes in a hypothesis only: repeating it earns nothing
    (its partial bonus is taken back at completion), so biasing cannot reward loops.
    Scores are unscaled (weight per character); the scorer multiplies by the boost.
    """

    def __init__(self, hotwords: Sequence[Hotword], vocabulary: TokenVocabulary, *, variants: bool = True) -> None:
        self.hotwords = tuple(hotwords)
        if len(self.hotwords) > MAX_PHRASES:
            raise HotwordError(f"{len(self.hotwords)} hotwords; at most {MAX_PHRASES}")
        self.vocabulary = vocabulary
        self.variants = variants
        children: list[dict[str, int]] = [{}]
        own: list[float] = [0.0]  # score of the phrase ending exactly here
        surfaces: list[dict[str, None]] = [{}]  # surface characters of the edge into the node (given one first)
        edge_weight: list[float] = [0.0]  # largest weight of the phrases through the edge into the node
        paths: list[tuple[list[int], list[str]]] = []  # (node per depth, surface forms)
        for hw in self.hotwords:
            forms = _surface_variants(hw.phrase, variants)
            node = 0
            nodes = [0]
            for i, ch in enumerate(hw.phrase):
                key = normalize_char(ch)
                nxt = children[node].get(key)
                if nxt is None:
                    nxt = len(children)
                    children[node][key] = nxt
                    children.append({})
                    own.append(0.0)
                    surfaces.append({})
                    edge_weight.append(0.0)
                edge_weight[nxt] = max(edge_weight[nxt], hw.weight)
                surfaces[nxt].update(dict.fromkeys(f[i] for f in forms))
                node = nxt
                nodes.append(node)
            own[node] = max(own[node], hw.weight * len(hw.phrase))
            paths.append((nodes, forms))

        n_nodes = len(children)
        fail = [0] * n_nodes
        partial = [0.0] * n_nodes
        outputs: list[tuple[tuple[int, float], ...]] = [()] * n_nodes  # (end node, score) along the output chain
        queue = list(children[0].values())
        for child in queue:
            partial[child] = 0.0 if own[child] else edge_weight[child]
        head = 0
        while head < len(queue):  # BFS: parents and failure targets are finished first
            node = queue[head]
            head += 1
            outputs[node] = (((node, own[node]),) if own[node] else ()) + outputs[fail[node]]
            for ch, child in children[node].items():
                f = fail[node]
                while f and ch not in children[f]:
                    f = fail[f]
                target = children[f].get(ch, 0)
                fail[child] = target if target != child else 0
                partial[child] = 0.0 if own[child] else partial[node] + edge_weight[child]
                queue.append(child)
        self._children = children
        self._fail = fail
        self._partial = partial
        self._outputs = outputs
        self._edge_weight = edge_weight
        self._surfaces = surfaces
        self.n_nodes = n_nodes

        # a byte-level BPE token holds at least one byte: only long phrases can exceed the token limit
        long_forms = list(dict.fromkeys(f for _, forms in paths for f in forms if len(f.encode("utf-8")) + 1 > MAX_PHRASE_TOKENS))
        if long_forms:
            encoded = vocabulary.encode_batch(long_forms + [" " + f for f in long_forms])
            for i, ids in enumerate(encoded):
                if len(ids) > MAX_PHRASE_TOKENS:
                    form = long_forms[i % len(long_forms)]
                    raise HotwordError(f"hotword {form!r} is {len(ids)} tokens long; at most {MAX_PHRASE_TOKENS}")

        # phrase openers in priority order (heaviest first, then list order) for the root's extra ids
        self._openers = sorted(range(len(paths)), key=lambda i: -self.hotwords[i].weight)
        self._paths = paths
        self._next_memo: dict[tuple[int, bytes], tuple[int, ...]] = {}
        self._root_memo: dict[int, tuple[int, ...]] = {}
        self._tentative_memo: dict[tuple[int, bytes], float] = {}
        self._transition_memo: dict[tuple[int, bytes, bytes], tuple] = {}

    # next tokens ------------------------------------------------------------------------
    def _continuations(self, texts: Iterable[str], pending: bytes) -> dict[int, None]:
        """Per text (a phrase continuation, maybe after a leading space): the token of its
        tokenization that starts right after the character bytes ``pending`` already written,
        or with no pending bytes the first token that covers phrase bytes (a leading space
        may ride along)."""
        texts = list(dict.fromkeys(texts))
        found: dict[int, None] = {}
        for text, ids in zip(texts, self.vocabulary.encode_batch(texts) if texts else []):
            data = text.encode("utf-8")
            start = 1 if text.startswith(" ") else 0
            if data[start : start + len(pending)] != pending:
                continue
            target = start + len(pending)
            pos = 0
            for token in ids:
                piece = self.vocabulary.token_bytes(int(token))
                if piece is None:
                    break
                end = pos + len(piece)
                if (pos == target) if pending else (end > target):
                    found[int(token)] = None
                    break
                if pos > target:
                    break
                pos = end
        return found

    def _edge_texts(self, node: int, pending: bytes = b"", spaced: bool = False) -> list[str]:
        """Surface text of each child character (that starts with ``pending``), alone and
        followed by each of the first grandchild characters (tokens may span two characters)."""
        texts = []
        for child in self._children[node].values():
            for surface in self._surfaces[child]:
                if pending and not surface.encode("utf-8").startswith(pending):
                    continue
                lead = " " + surface if spaced else surface
                texts.append(lead)
                for grandchild in list(self._children[child].values())[:4]:
                    texts.extend(lead + g for g in self._surfaces[grandchild])
        return texts

    def continuation_tokens(self, node: int, pending: bytes = b"") -> tuple[int, ...]:
        """Tokens that extend the match at ``node`` (after the first bytes ``pending`` of a character)."""
        key = (node, pending)
        cached = self._next_memo.get(key)
        if cached is None:
            if not self._children[node]:
                cached = ()
            else:
                found = self._continuations(self._edge_texts(node, pending), pending)
                cached = tuple(found)
            self._next_memo[key] = cached
        return cached

    def opener_tokens(self, limit: int) -> tuple[int, ...]:
        """Tokens that open the heaviest phrases (with and without a leading space), at most ``limit``."""
        cached = self._root_memo.get(limit)
        if cached is None:
            found: dict[int, None] = {}
            for i in self._openers:
                if len(found) >= limit:
                    break
                nodes, forms = self._paths[i]
                texts = [f[:2] for f in forms] + [" " + f[:2] for f in forms]
                found.update(self._continuations(texts, b""))
            cached = tuple(found)[:limit]
            self._root_memo[limit] = cached
        return cached

    def __len__(self) -> int:
        return len(self.hotwords)

    # automaton --------------------------------------------------------------------------
    def goto(self, node: int, ch: str) -> int:
        children, fail = self._children, self._fail
        while node and ch not in children[node]:
            node = fail[node]
        return children[node].get(ch, 0)

    def tentative(self, node: int, pending: bytes) -> float:
        """Share of the next character's bonus earned by its first bytes ``pending``."""
        if not pending:
            return 0.0
        key = (node, pending)
        value = self._tentative_memo.get(key)
        if value is None:
            value = 0.0
            for child in self._children[node].values():
                for surface in self._surfaces[child]:
                    encoded = surface.encode("utf-8")
                    if encoded.startswith(pending) and len(encoded) > len(pending):
                        value = max(value, self._edge_weight[child] * len(pending) / len(encoded))
            self._tentative_memo[key] = value
        return value

    def _transition(self, node: int, pending: bytes, data: bytes) -> tuple[float, int, bytes, tuple]:
        """State-independent part of a step (memoized, shared by all hypotheses): bonus
        without phrase scores, the node and pending bytes after ``data``, and the phrases
        completed on the way."""
        key = (node, pending, data)
        hit = self._transition_memo.get(key)
        if hit is not None:
            return hit
        start = node
        if not pending:
            try:
                text, rest = data.decode("utf-8"), b""
            except UnicodeDecodeError:
                text, rest = _split_utf8(data)
        else:
            text, rest = _split_utf8(pending + data)
        bonus = -self.tentative(node, pending)
        completed: tuple = ()
        for ch in text:
            node = self.goto(node, normalize_char(ch))
            if self._outputs[node]:
                completed += self._outputs[node]
        bonus += self._partial[node] - self._partial[start] + self.tentative(node, rest)
        result = (bonus, node, rest, completed)
        if len(self._transition_memo) >= _MEMO_LIMIT:
            self._transition_memo.clear()
        self._transition_memo[key] = result
        return result

    def advance(self, state: GraphState, data: bytes) -> tuple[float, GraphState]:
        """Unscaled bonus for appending ``data`` (token bytes) and the state after it."""
        node, pending, done = state
        bonus, node, rest, completed = self._transition(node, pending, data)
        for phrase, score in completed:
            # each phrase pays once per hypothesis, and at most MAX_REWARDED_PHRASES do: biasing
            # must not make a loop of listed names outscore what was said
            if phrase not in done and len(done) < MAX_REWARDED_PHRASES:
                bonus += score
                done = done | {phrase}
        return bonus, (node, rest, done)

    def pending_bonus(self, state: GraphState) -> float:
        """Unscaled bonus earned by the unfinished match of ``state`` (what finish takes back)."""
        node, pending, _ = state
        return self._partial[node] + self.tentative(node, pending)

    def next_tokens(self, state: GraphState, limit: int) -> Iterable[int]:
        """Tokens that continue the match of ``state``: its node, then the failure chain."""
        node, pending, _ = state
        if not node:
            if pending:
                yield from self.continuation_tokens(0, pending)
            return
        yield from self.continuation_tokens(node, pending)
        if not pending:
            f = self._fail[node]
            while f:
                yield from self.continuation_tokens(f)
                f = self._fail[f]


# ---------------------------------------------------------------------------------------
# the scorer


State = tuple  # one GraphState per graph


class HotwordScorer:
    """:class:`gateway.asr.decoding.TokenScorer` over one or more context graphs (bonuses add up).

    Stateless apart from caches (the graphs memoize transitions): one instance may serve
    one request or many, from any thread.
    """

    def __init__(self, graphs: ContextGraph | Sequence[ContextGraph], options: HotwordOptions = HotwordOptions()) -> None:
        if isinstance(graphs, ContextGraph):
            graphs = (graphs,)
        self.graphs = tuple(g for g in graphs if len(g))
        self.options = options
        self._vocabulary = self.graphs[0].vocabulary if self.graphs else None
        self._extra_memo: dict[tuple, tuple[int, ...]] = {}
        self._initial: State = tuple(INITIAL_STATE for _ in self.graphs)

    @property
    def empty(self) -> bool:
        return not self.graphs

    def initial_state(self) -> State:
        return self._initial

    def extra_ids(self, state: State) -> tuple[int, ...]:
        limit = self.options.max_extra_ids
        if not self.graphs or limit == 0:
            return ()
        key = tuple(sub[:2] for sub in state)  # (node, pending) per graph: completed phrases do not matter
        cached = self._extra_memo.get(key)
        if cached is None:
            found: dict[int, None] = {}
            # unfinished matches first (what a beam must be able to complete), then phrase openers
            for graph, sub in zip(self.graphs, state):
                for token in graph.next_tokens(sub, limit):
                    if len(found) >= limit:
                        break
                    found[token] = None
            for graph in self.graphs:
                for token in graph.opener_tokens(limit):
                    if len(found) >= limit:
                        break
                    found[token] = None
            cached = tuple(found)
            if len(self._extra_memo) < _MEMO_LIMIT:
                self._extra_memo[key] = cached
        return cached

    def advance(self, state: State, token_id: int) -> tuple[float, State]:
        if not self.graphs:
            return 0.0, state
        data = self._vocabulary.token_bytes(int(token_id))
        if data is None:  # special/timestamp token: neither extends nor breaks a match
            return 0.0, state
        if len(self.graphs) == 1:
            bonus, sub = self.graphs[0].advance(state[0], data)
            return bonus * self.options.boost, (sub,)
        bonus = 0.0
        new_state = []
        for graph, sub in zip(self.graphs, state):
            b, s = graph.advance(sub, data)
            bonus += b
            new_state.append(s)
        return bonus * self.options.boost, tuple(new_state)

    def finish(self, state: State) -> float:
        if not self.graphs:
            return 0.0
        return -self.options.boost * sum(g.pending_bonus(s) for g, s in zip(self.graphs, state))


def build_scorer(
    hotwords: Mapping[str, float] | Iterable[Hotword | str] | None,
    vocabulary: TokenVocabulary,
    options: HotwordOptions = HotwordOptions(),
) -> HotwordScorer | None:
    """A scorer for one list of hotwords; None when the list is empty (decode without a scorer)."""
    parsed = parse_hotwords(hotwords)
    if not parsed:
        return None
    return HotwordScorer(ContextGraph(parsed, vocabulary, variants=options.variants), options)


def scorer_wire(scorer: object) -> dict | None:
    """A HotwordScorer as JSON data, for a server that runs the beam search itself (Triton
    model ``search``; model_repository/engine/search_hotwords.py builds the same scorer from it
    with this module and the same tokenizer.json). None for any other scorer (it stays with
    the gateway's stepwise search) and for a vocabulary other than byte-level BPE."""
    if not isinstance(scorer, HotwordScorer) or scorer.empty:
        return None
    vocabulary = scorer.graphs[0].vocabulary
    if not isinstance(vocabulary, ByteLevelVocabulary) or any(g.vocabulary is not vocabulary for g in scorer.graphs):
        return None
    options = scorer.options
    return {
        "boost": options.boost,
        "max_extra_ids": options.max_extra_ids,
        "vocabulary": {"ignore_ids": list(vocabulary.ignore_ids), "size": vocabulary.size},
        "graphs": [{"variants": g.variants, "phrases": [[h.phrase, h.weight] for h in g.hotwords]} for g in scorer.graphs],
    }
