"""Hotword scorers for the server's beam search (model `search`), rebuilt from the gateway's wire form.

The gateway sends a hotword-biased window's scorer as data (gateway/asr/hotwords.py
``scorer_wire``: boost, extra ids per step, the tokenizer's ignored ids and size, and per
context graph its phrases with weights). This builds the same HotwordScorer with the module the
gateway uses (render.py deploys gateway/asr/hotwords.py as engine/hotwords.py and hands it in:
this package imports nothing of the project) over the deployed tokenizer.json, so a window
gives the same tokens here as in the gateway's stepwise search.

Graphs are kept (least recently used first out): a server-side hotword list arrives with every
window of every call, and its automaton, with the token transitions it has memoized, is built
once. Everything here runs on the thread that admits requests, never on the search loop.
"""
import collections
import json

from .errors import INVALID_ARG, RequestError

MAX_CACHED_GRAPHS = 32
MAX_CACHED_VOCABULARIES = 2


class HotwordSpecError(RequestError):
    """The hotwords of a search request cannot be used."""

    def __init__(self, message: str):
        super().__init__(f"hotwords: {message}", INVALID_ARG)


class HotwordScorers:
    """``scorer(spec)``: the hotword module's HotwordScorer for a wire spec, graphs cached."""

    def __init__(self, hotword_module, tokenizer_file: str, max_graphs: int = MAX_CACHED_GRAPHS):
        self.module = hotword_module
        self.tokenizer_file = tokenizer_file
        self.max_graphs = max_graphs
        self._tokenizer = None
        self._vocabularies = collections.OrderedDict()
        self._graphs = collections.OrderedDict()
        self.graphs_built = 0  # (tests, logs)

    def check(self) -> None:
        """Load the tokenizer now (at model load: a missing file or package fails the load)."""
        self._load_tokenizer()

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer  # (the stub's pylib: tools/setup_triton.py)

            self._tokenizer = Tokenizer.from_file(self.tokenizer_file)
        return self._tokenizer

    def scorer(self, spec):
        if not isinstance(spec, dict):
            raise HotwordSpecError("must be a JSON object")
        module = self.module
        try:
            options = module.HotwordOptions(boost=spec.get("boost", module.DEFAULT_BOOST),
                                            max_extra_ids=spec.get("max_extra_ids", module.DEFAULT_MAX_EXTRA_IDS))
        except ValueError as error:
            raise HotwordSpecError(str(error)) from error
        graphs = spec.get("graphs")
        if not isinstance(graphs, list) or not graphs:
            raise HotwordSpecError("'graphs' must be a non-empty list")
        vocabulary_key, vocabulary = self._vocabulary(spec.get("vocabulary"))
        built = [self._graph(graph, vocabulary_key, vocabulary, n) for n, graph in enumerate(graphs)]
        return module.HotwordScorer(built, options)

    def _vocabulary(self, spec):
        try:
            ignore = tuple(sorted(int(i) for i in spec["ignore_ids"]))
            size = int(spec["size"])
        except (KeyError, TypeError, ValueError) as error:
            raise HotwordSpecError("'vocabulary' needs ignore_ids (a list of ids) and size") from error
        key = (ignore, size)
        vocabulary = self._vocabularies.get(key)
        if vocabulary is None:
            tokenizer = self._load_tokenizer()
            tokens = tokenizer.get_vocab_size(with_added_tokens=True)
            if not 0 < size <= tokens:
                raise HotwordSpecError(f"vocabulary size {size} does not fit the deployed tokenizer ({tokens} tokens)")
            vocabulary = self.module.ByteLevelVocabulary(tokenizer, ignore, size)
            self._vocabularies[key] = vocabulary
            while len(self._vocabularies) > MAX_CACHED_VOCABULARIES:
                self._vocabularies.popitem(last=False)
        return key, vocabulary

    def _graph(self, spec, vocabulary_key, vocabulary, n: int):
        if not isinstance(spec, dict) or not isinstance(spec.get("phrases"), list):
            raise HotwordSpecError(f"graph #{n + 1} must be an object with a 'phrases' list")
        variants = bool(spec.get("variants", True))
        key = (json.dumps(spec["phrases"], ensure_ascii=False), variants, vocabulary_key)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        module = self.module
        try:
            pairs = [(phrase, weight) for phrase, weight in spec["phrases"]]
            hotwords = module.parse_hotwords([module.Hotword(p, w) for p, w in pairs], source=f"graph #{n + 1}")
            graph = module.ContextGraph(hotwords, vocabulary, variants=variants)
        except module.HotwordError as error:  # (its message names the graph)
            raise HotwordSpecError(str(error)) from error
        except (TypeError, ValueError) as error:
            raise HotwordSpecError(f"graph #{n + 1}: phrases must be [phrase, weight] pairs ({error})") from error
        self.graphs_built += 1
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph
