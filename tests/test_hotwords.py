"""Hotword context graph: scores, cancellation, variants, extra ids, beam search, lists, limits.

Pure Python: a fake byte-level vocabulary stands in for Whisper's tokenizer (tokens that
are whole characters, single bytes that split characters, and two-character tokens), and
the fake stateful decoder of test_decoding runs the beam search. The last tests use the real
Whisper and GLM-ASR tokenizer.json files when the exported model directories exist.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence

import pytest

from gateway.asr.decoding import DecodingOptions, TokenScorer
from gateway.asr.hotwords import (
    MAX_PHRASE_CHARS,
    MAX_PHRASE_TOKENS,
    MAX_PHRASES,
    ByteLevelVocabulary,
    ContextGraph,
    Hotword,
    HotwordError,
    HotwordOptions,
    HotwordScorer,
    build_scorer,
    load_hotword_file,
    parse_hotword_text,
    parse_hotwords,
    scorer_wire,
)
from gateway.asr.hotword_lists import HotwordRegistry
from tests.conftest import glm_model_dir_path, model_dir_path
from tests.test_decoding import EOT, FakeSession, MarkovModel, run


class FakeVocabulary:
    """Byte-level vocabulary: ids 0..255 are single bytes; then whole words/characters; 999 is special."""

    SPECIAL = 999

    def __init__(self, words: Sequence[str] = ()) -> None:
        self.pieces: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        self.ids: dict[bytes, int] = {v: k for k, v in self.pieces.items()}
        for word in words:
            self.add(word)

    def add(self, word: str) -> int:
        data = word.encode("utf-8")
        if data not in self.ids:
            token = 256 + len(self.pieces) - 256
            token = max(self.pieces) + 1 if token in self.pieces else token
            if token == self.SPECIAL:
                token += 1
            self.pieces[token] = data
            self.ids[data] = token
        return self.ids[data]

    def token_bytes(self, token_id: int) -> bytes | None:
        return None if token_id == self.SPECIAL else self.pieces.get(token_id)

    def encode(self, text: str) -> list[int]:
        data, out, pos = text.encode("utf-8"), [], 0
        longest = max(len(p) for p in self.ids)
        while pos < len(data):
            for size in range(min(longest, len(data) - pos), 0, -1):
                token = self.ids.get(data[pos : pos + size])
                if token is not None:
                    out.append(token)
                    pos += size
                    break
        return out

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


CHARS = "我在朝阳区建国路潮杨曲见过陽區國市住委东西南北中和平里店"
VOCAB = FakeVocabulary(list(CHARS) + [" 朝", "建国", "区建"])
T = VOCAB.ids  # bytes -> id


def tok(text: str) -> int:
    return T[text.encode("utf-8")]


def walk(scorer: HotwordScorer, tokens: Sequence[int]) -> tuple[list[float], object]:
    state = scorer.initial_state()
    bonuses = []
    for t in tokens:
        bonus, state = scorer.advance(state, t)
        bonuses.append(bonus)
    return bonuses, state


def total(scorer: HotwordScorer, text_or_tokens) -> float:
    tokens = VOCAB.encode(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
    bonuses, state = walk(scorer, tokens)
    return sum(bonuses) + scorer.finish(state)


def scorer_for(hotwords, boost: float = 1.0, **kwargs) -> HotwordScorer:
    scorer = build_scorer(hotwords, VOCAB, HotwordOptions(boost=boost, **kwargs))
    assert scorer is not None
    return scorer


# --------------------------------------------------------------------------------------
# scores


def test_scorer_satisfies_protocol():
    assert isinstance(scorer_for({"朝阳区": 1.0}), TokenScorer)


def test_empty_list_has_no_effect():
    assert build_scorer({}, VOCAB) is None
    assert build_scorer(None, VOCAB) is None
    empty = HotwordScorer(ContextGraph((), VOCAB))
    assert empty.empty
    state = empty.initial_state()
    assert empty.extra_ids(state) == ()
    assert empty.advance(state, tok("朝")) == (0.0, state)
    assert empty.finish(state) == 0.0


def test_complete_phrase_keeps_boost_times_weight_per_character():
    scorer = scorer_for({"朝阳区": 2.0}, boost=1.5)
    bonuses, state = walk(scorer, VOCAB.encode("我在朝阳区"))
    assert bonuses[:2] == [0.0, 0.0]
    assert all(b > 0 for b in bonuses[2:])
    assert sum(bonuses) == pytest.approx(1.5 * 2.0 * 3)
    assert scorer.finish(state) == 0.0  # nothing pending after a complete match


def test_partial_match_is_taken_back_when_it_breaks():
    scorer = scorer_for({"朝阳区建国路": 1.0})
    bonuses, _ = walk(scorer, VOCAB.encode("朝阳曲"))
    assert bonuses[0] == pytest.approx(1.0) and bonuses[1] == pytest.approx(1.0)
    assert bonuses[2] == pytest.approx(-2.0)  # the break cancels what the partial match earned
    assert total(scorer, "朝阳曲见过") == pytest.approx(0.0)


def test_partial_match_is_taken_back_at_finish():
    scorer = scorer_for({"朝阳区建国路": 1.0})
    bonuses, state = walk(scorer, VOCAB.encode("我在朝阳区建"))
    assert sum(bonuses) == pytest.approx(4.0)
    assert scorer.finish(state) == pytest.approx(-4.0)


def test_failure_arcs_restart_inside_a_broken_match():
    # "朝阳朝阳区": the second 朝 breaks 朝阳→朝阳区 but starts a new match via the failure arc
    scorer = scorer_for({"朝阳区": 1.0})
    assert total(scorer, "朝阳朝阳区") == pytest.approx(3.0)
    # overlapping phrases: 区建 is a suffix state reached while matching 朝阳区建国路
    overlap = scorer_for({"阳区建": 1.0, "朝阳区建国路": 1.0})
    assert total(overlap, "朝阳区建国路") == pytest.approx(3.0 + 6.0)
    assert total(overlap, "朝阳区建东") == pytest.approx(3.0)  # the long one broke, the short one completed


def test_a_phrase_pays_once_per_hypothesis():
    scorer = scorer_for({"朝阳区": 1.0, "建国路": 1.0})
    assert total(scorer, "朝阳区朝阳区朝阳区") == pytest.approx(3.0)
    assert total(scorer, "朝阳区建国路朝阳区建国路") == pytest.approx(6.0)
    bonuses, _ = walk(scorer, VOCAB.encode("朝阳区朝阳区"))
    assert sum(bonuses[3:]) == pytest.approx(0.0)  # the repeat's partial bonus is taken back at completion


def test_rewarded_phrases_per_hypothesis_are_capped():
    from gateway.asr.hotwords import MAX_REWARDED_PHRASES

    names = [f"{a}{b}" for a in "东西南北中" for b in "和平里店"][: MAX_REWARDED_PHRASES + 3]
    scorer = scorer_for(dict.fromkeys(names, 1.0))
    assert total(scorer, "".join(names)) == pytest.approx(2.0 * MAX_REWARDED_PHRASES)


def test_repetition_loops_do_not_win_the_beam():
    loop = {None: {ZHAO: 0.6, CHAO: 0.3}, ZHAO: {YANG: 0.9}, YANG: {QU: 0.9}, QU: {ZHAO: 0.5, EOT: 0.45}, CHAO: {EOT: 0.9}}
    result = run(FakeSession(MarkovModel(loop)), DecodingOptions(beam_size=3, max_new_tokens=30), scorer=tiny_scorer({"朝阳区": 1.0}, boost=5.0))
    assert result.finished and result.tokens == [ZHAO, YANG, QU]


def test_nested_phrases_both_count_and_weights_differ():
    scorer = scorer_for({"朝阳区": 1.0, "朝阳区建国路": 2.0})
    assert total(scorer, "朝阳区") == pytest.approx(3.0)
    assert total(scorer, "朝阳区建国路") == pytest.approx(3.0 + 12.0)
    assert total(scorer, "朝阳区建国") == pytest.approx(3.0)


def test_shared_prefix_with_different_weights_is_exact():
    scorer = scorer_for({"朝阳区": 1.0, "朝阳路": 3.0})
    assert total(scorer, "朝阳区") == pytest.approx(3.0)
    assert total(scorer, "朝阳路") == pytest.approx(9.0)
    assert total(scorer, "朝阳") == pytest.approx(0.0)


def test_traditional_and_mixed_spellings_match():
    scorer = scorer_for({"朝阳区建国路": 1.0})
    for text in ("朝陽區建國路", "朝阳區建国路", "朝陽区建國路"):
        assert total(scorer, text) == pytest.approx(6.0), text
    traditional_list = scorer_for({"朝陽區": 1.0})  # a list written in traditional characters
    assert total(traditional_list, "朝阳区") == pytest.approx(3.0)


def test_split_characters_earn_their_share_and_the_same_total():
    scorer = scorer_for({"朝阳区": 1.0})
    bytes_of_yang = list("阳".encode("utf-8"))  # three single-byte tokens
    tokens = [tok("朝"), *bytes_of_yang, tok("区")]
    bonuses, state = walk(scorer, tokens)
    assert bonuses[1] == pytest.approx(1 / 3) and bonuses[2] == pytest.approx(1 / 3)
    assert sum(bonuses) == pytest.approx(3.0)
    # a split character that turns out to be another one takes its share back
    wrong = [tok("朝"), *"阳".encode("utf-8")[:2], "杨".encode("utf-8")[2]]
    assert total(scorer, wrong) == pytest.approx(0.0)


def test_tokens_spanning_phrase_boundaries_match():
    scorer = scorer_for({"区建国": 1.0})
    tokens = [tok("朝"), tok("阳"), tok("区建"), tok("国")]  # "区建" is one token
    assert total(scorer, tokens) == pytest.approx(3.0)
    assert total(scorer, [tok("建国")]) == pytest.approx(0.0)


def test_special_tokens_neither_extend_nor_break():
    scorer = scorer_for({"朝阳区": 1.0})
    tokens = [tok("朝"), FakeVocabulary.SPECIAL, tok("阳"), tok("区")]
    assert total(scorer, tokens) == pytest.approx(3.0)


def test_case_and_width_are_folded():
    scorer = scorer_for({"CBD": 1.0})
    vocab_total = sum(walk(scorer, VOCAB.encode("cbd"))[0])
    assert vocab_total == pytest.approx(3.0)
    assert sum(walk(scorer, VOCAB.encode("ＣＢＤ"))[0]) == pytest.approx(3.0)


def test_states_are_immutable_and_shareable():
    scorer = scorer_for({"朝阳区": 1.0})
    _, state = walk(scorer, [tok("朝")])
    hash(state)
    a = scorer.advance(state, tok("阳"))
    b = scorer.advance(state, tok("杨"))
    assert a[0] > 0 and b[0] < 0
    assert scorer.advance(state, tok("阳")) == a  # same result for the same (state, token)


# --------------------------------------------------------------------------------------
# extra ids


def test_extra_ids_name_the_continuations_and_openers():
    scorer = scorer_for({"朝阳区": 1.0, "市住建委": 1.0})
    root = scorer.extra_ids(scorer.initial_state())
    assert tok("朝") in root and tok("市") in root and tok(" 朝") in root
    _, state = walk(scorer, [tok("朝")])
    extra = scorer.extra_ids(state)
    assert extra[0] == tok("阳")  # the continuation comes first
    assert tok("陽") in extra  # and its traditional spelling
    split = scorer_for({"朝垡区": 1.0})  # 垡 is not in the fake vocabulary: three byte tokens
    fa = list("垡".encode("utf-8"))
    _, state = walk(split, [tok("朝"), fa[0]])
    assert split.extra_ids(state)[0] == fa[1]  # completes the split character


def test_extra_ids_follow_the_failure_chain_and_respect_the_limit():
    scorer = scorer_for({"阳区建": 1.0, "朝阳区东": 1.0})
    _, state = walk(scorer, VOCAB.encode("朝阳区"))
    extra = scorer.extra_ids(state)
    assert extra[:1] == (tok("东"),)
    assert tok("建") in extra or tok("建国") in extra  # from the failure target 阳区
    many = scorer_for({f"{a}{b}": 1.0 for a in "东西南北中" for b in "和平里店"}, max_extra_ids=3)
    assert len(many.extra_ids(many.initial_state())) == 3
    none = scorer_for({"朝阳区": 1.0}, max_extra_ids=0)
    assert none.extra_ids(none.initial_state()) == ()


# --------------------------------------------------------------------------------------
# inside beam search

ZHAO, CHAO, YANG, YANG2, QU, QU2 = 1, 2, 3, 4, 5, 6
TINY = FakeVocabulary()
for token_id, char in {ZHAO: "朝", CHAO: "潮", YANG: "阳", YANG2: "杨", QU: "区", QU2: "曲"}.items():
    TINY.pieces[token_id] = char.encode("utf-8")
    TINY.ids[char.encode("utf-8")] = token_id
for token_id in range(7, 16):
    TINY.pieces[token_id] = None  # prompt/EOT ids are special here
TINY.token_bytes = lambda token_id: TINY.pieces.get(token_id) if 1 <= token_id <= 6 else None  # type: ignore[method-assign]

HOMOPHONES = {  # the model prefers 潮杨曲 over 朝阳区 at every step
    None: {CHAO: 0.5, ZHAO: 0.2},
    CHAO: {YANG2: 0.6, YANG: 0.2},
    ZHAO: {YANG2: 0.6, YANG: 0.2},
    YANG2: {QU2: 0.6, QU: 0.2},
    YANG: {QU2: 0.6, QU: 0.2},
    QU: {EOT: 0.9},
    QU2: {EOT: 0.9},
}


def tiny_scorer(hotwords, boost=1.5, **kwargs):
    return HotwordScorer(ContextGraph(parse_hotwords(hotwords), TINY), HotwordOptions(boost=boost, **kwargs))


def test_beam_search_without_hotwords_writes_the_homophones():
    result = run(FakeSession(MarkovModel(HOMOPHONES)), DecodingOptions(beam_size=3))
    assert result.tokens == [CHAO, YANG2, QU2]


def test_hotword_turns_the_beam_to_the_listed_phrase():
    scorer = tiny_scorer({"朝阳区": 1.0})
    result = run(FakeSession(MarkovModel(HOMOPHONES)), DecodingOptions(beam_size=3), scorer=scorer)
    assert result.tokens == [ZHAO, YANG, QU]
    # reported log-probs stay the model's, bonuses only change the ranking
    assert result.sum_logprob == pytest.approx(math.log(0.2) * 3 + math.log(0.9))


def test_unrelated_hotwords_do_not_change_the_result():
    plain = run(FakeSession(MarkovModel(HOMOPHONES)), DecodingOptions(beam_size=3))
    scorer = tiny_scorer({"区朝区": 1.0})
    biased = run(FakeSession(MarkovModel(HOMOPHONES)), DecodingOptions(beam_size=3), scorer=scorer)
    assert biased.tokens == plain.tokens
    assert biased.sum_logprob == pytest.approx(plain.sum_logprob)


def test_extra_ids_bring_tokens_outside_the_top_k_into_the_search():
    table = {  # 阳 is never in the top-2 of any row: only extra_ids can offer it
        None: {ZHAO: 0.5, CHAO: 0.4},
        ZHAO: {YANG2: 0.5, QU2: 0.3, YANG: 0.1},
        CHAO: {YANG2: 0.5, QU2: 0.3, YANG: 0.1},
        YANG: {QU: 0.9},
        YANG2: {EOT: 0.9},
        QU: {EOT: 0.9},
        QU2: {EOT: 0.9},
    }
    session = FakeSession(MarkovModel(table))
    result = run(session, DecodingOptions(beam_size=1), scorer=tiny_scorer({"朝阳区": 1.0}, boost=2.5))
    assert result.tokens == [ZHAO, YANG, QU]
    assert any(call["extra_ids"] is not None and YANG in call["extra_ids"] for call in session.calls)
    off = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=1), scorer=tiny_scorer({"朝阳区": 1.0}, boost=2.5, max_extra_ids=0))
    assert off.tokens != [ZHAO, YANG, QU]


def test_unfinished_hotword_at_the_end_is_not_rewarded():
    table = {None: {CHAO: 0.5, ZHAO: 0.45}, ZHAO: {YANG: 0.5, EOT: 0.5}, CHAO: {EOT: 0.9}, YANG: {EOT: 0.9}}
    result = run(FakeSession(MarkovModel(table)), DecodingOptions(beam_size=3), scorer=tiny_scorer({"朝阳区": 1.0}, boost=3.0))
    # 朝阳 earns 2 x 3.0 while open, but finishing there takes it back: the model's best wins
    assert result.tokens == [CHAO]


# --------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    "hotwords,message",
    [
        ({"": 1.0}, "empty phrase"),
        ({"   ": 1.0}, "empty phrase"),
        ({"朝阳区": -1.0}, "weight"),
        ({"朝阳区": 10.5}, "weight"),
        ({"朝阳区": float("nan")}, "weight"),
        ({"朝阳区": float("inf")}, "weight"),
        ({"朝阳区": True}, "weight"),
        ({"朝阳区": "2"}, "weight"),
        ({"朝" * (MAX_PHRASE_CHARS + 1): 1.0}, "longer than"),
        ({b"\xff\xfe": 1.0}, "UTF-8"),
        ({"朝\udc80": 1.0}, "Unicode"),
        ({"朝\x00阳": 1.0}, "control"),
        ({42: 1.0}, "string"),
        ("朝阳区", "single string"),
    ],
)
def test_bad_hotwords_raise_hotword_error(hotwords, message):
    with pytest.raises(HotwordError, match=message):
        parse_hotwords(hotwords)


def test_hotword_error_is_a_value_error():
    assert issubclass(HotwordError, ValueError)


def test_weights_default_and_duplicates_keep_the_largest():
    parsed = parse_hotwords({"朝阳区": 0, " 海淀区 ": None, "丰台区": 2.5})
    assert parsed == (Hotword("朝阳区", 1.0), Hotword("海淀区", 1.0), Hotword("丰台区", 2.5))
    assert parse_hotwords([Hotword("朝阳区", 2.0), Hotword("朝阳区", 3.0), "朝阳区"]) == (Hotword("朝阳区", 3.0),)


def test_too_many_hotwords():
    parse_hotwords([f"地名{i}" for i in range(MAX_PHRASES)])
    with pytest.raises(HotwordError, match=f"more than {MAX_PHRASES}"):
        parse_hotwords([f"地名{i}" for i in range(MAX_PHRASES + 1)])


def test_phrase_longer_than_the_token_limit():
    rare = "𠀀"  # 4 UTF-8 bytes, not in the fake vocabulary: 4 tokens per character
    phrase = rare * (MAX_PHRASE_TOKENS // 4 + 1)
    assert len(phrase) <= MAX_PHRASE_CHARS
    with pytest.raises(HotwordError, match="tokens long"):
        ContextGraph(parse_hotwords([phrase]), VOCAB)


@pytest.mark.parametrize("kwargs", [{"boost": -1}, {"boost": 11}, {"boost": float("nan")}, {"max_extra_ids": -1}, {"max_extra_ids": 2.5}])
def test_bad_options(kwargs):
    with pytest.raises(HotwordError):
        HotwordOptions(**kwargs)


def test_ten_thousand_phrases_build_fast():
    import random

    rng = random.Random(1)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    phrases = set()
    while len(phrases) < MAX_PHRASES:
        phrases.add("".join(rng.choice(chars) for _ in range(rng.randint(2, 8))))
    hotwords = parse_hotwords(sorted(phrases))
    started = time.process_time()  # CPU time: other processes on a shared machine do not count
    graph = ContextGraph(hotwords, VOCAB)
    elapsed = time.process_time() - started
    assert len(graph) == MAX_PHRASES
    assert elapsed < 1.0, f"building the graph for 10,000 phrases took {elapsed:.2f} s"
    scorer = HotwordScorer(graph)
    assert len(scorer.extra_ids(scorer.initial_state())) <= HotwordOptions().max_extra_ids


# --------------------------------------------------------------------------------------
# list files and the registry


def test_parse_list_text():
    text = "# comment\n\n朝阳区\n市住建委 2\nChaoyang District 1.5\n十八里店\t3\n3号楼\n"
    assert parse_hotword_text(text) == (
        Hotword("朝阳区", 1.0),
        Hotword("市住建委", 2.0),
        Hotword("Chaoyang District", 1.5),
        Hotword("十八里店", 3.0),
        Hotword("3号楼", 1.0),
    )


def test_list_file_errors_name_file_and_line(tmp_path):
    bad_weight = tmp_path / "bad.txt"
    bad_weight.write_text("朝阳区\n海淀区 99\n", encoding="utf-8")
    with pytest.raises(HotwordError, match=r"bad\.txt:2"):
        load_hotword_file(bad_weight)
    not_utf8 = tmp_path / "gbk.txt"
    not_utf8.write_bytes("朝阳区\n海淀区\n".encode("gbk"))
    with pytest.raises(HotwordError, match=r"gbk\.txt:1: not valid UTF-8"):
        load_hotword_file(not_utf8)
    with pytest.raises(HotwordError, match="cannot read"):
        load_hotword_file(tmp_path / "missing.txt")


def test_example_lists_load():
    root = os.path.join(os.path.dirname(__file__), "..", "config", "hotwords.example")
    registry = HotwordRegistry(root, VOCAB)
    phrases = registry.phrases
    assert {"朝阳区", "建国路", "三里屯", "市住房和城乡建设委员会"} <= set(phrases)
    assert phrases["市住房和城乡建设委员会"] == 1.5


def test_default_server_lists_ship_empty():
    """Server lists bias every request, so a deployment opts in with its own names."""
    root = os.path.join(os.path.dirname(__file__), "..", "config", "hotwords")
    registry = HotwordRegistry(root, VOCAB)
    assert registry.phrases == {} and registry.scorer() is None


def test_registry_merges_reloads_and_keeps_old_lists_on_errors(tmp_path):
    (tmp_path / "districts.txt").write_text("朝阳区\n", encoding="utf-8")
    registry = HotwordRegistry(tmp_path, VOCAB, options=HotwordOptions(boost=1.0), check_interval_s=0.0)
    scorer = registry.scorer()
    assert total(scorer, "朝阳区") == pytest.approx(3.0)
    # per request: a new phrase, and a larger weight for a listed one (never added twice)
    scorer = registry.scorer({"建国路": 1.0, "朝阳区": 2.0})
    assert total(scorer, "朝阳区") == pytest.approx(6.0)
    assert total(scorer, "建国路") == pytest.approx(3.0)
    assert total(registry.scorer({"朝阳区": 0.5}), "朝阳区") == pytest.approx(3.0)
    assert total(registry.scorer({"建国路": 1.0}, use_server_lists=False), "朝阳区") == 0.0

    # a file changes: picked up on the next scorer() without a restart
    (tmp_path / "streets.txt").write_text("东西路 2\n", encoding="utf-8")
    assert total(registry.scorer(), "东西路") == pytest.approx(6.0)
    # a broken file: the previous lists stay, the error is recorded; reload() raises
    (tmp_path / "streets.txt").write_text("东西路 -2\n", encoding="utf-8")
    os.utime(tmp_path / "streets.txt", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert total(registry.scorer(), "东西路") == pytest.approx(6.0)
    assert registry.last_error and "streets.txt:1" in registry.last_error
    with pytest.raises(HotwordError):
        registry.reload()
    (tmp_path / "streets.txt").unlink()
    assert registry.reload() == 1
    assert set(registry.phrases) == {"朝阳区"}

    with pytest.raises(HotwordError):
        registry.scorer({"": 1.0})


def test_registry_without_lists_and_empty_request_gives_no_scorer(tmp_path):
    registry = HotwordRegistry(tmp_path, VOCAB)
    assert registry.scorer() is None
    assert registry.scorer({}) is None
    assert HotwordRegistry(None, VOCAB).scorer() is None
    with pytest.raises(HotwordError, match="does not exist"):
        HotwordRegistry(tmp_path / "missing", VOCAB)


def test_registry_is_thread_safe(tmp_path):
    (tmp_path / "a.txt").write_text("朝阳区\n", encoding="utf-8")
    registry = HotwordRegistry(tmp_path, VOCAB, options=HotwordOptions(boost=1.0), check_interval_s=0.0)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                scorer = registry.scorer({f"建国路{i % 3}": 1.0})
                assert total(scorer, "朝阳区") == pytest.approx(3.0)
                if j % 5 == 0:
                    registry.reload()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --------------------------------------------------------------------------------------
# the real Whisper tokenizer


@pytest.fixture(scope="module")
def whisper_vocabulary():
    path = model_dir_path()
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} has no tokenizer.json (make export)")
    from gateway.asr.hotwords import WhisperVocabulary
    from gateway.asr.tokenizer import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_model_dir(path)
    return tokenizer, WhisperVocabulary(tokenizer)


def test_whisper_tokenizations_match(whisper_vocabulary):
    tokenizer, vocabulary = whisper_vocabulary
    scorer = HotwordScorer(ContextGraph(parse_hotwords({"朝阳区建国路": 1.0, "市住建委": 1.0}), vocabulary), HotwordOptions(boost=1.0))
    for text in ("我在朝阳区建国路", "我在朝陽區建國路", " 朝阳区建国路", "打给市住建委"):
        ids = tokenizer.encode(text)
        bonuses, state = walk(scorer, ids)
        expected = 6.0 if "建" in text and "委" not in text else 4.0
        assert sum(bonuses) + scorer.finish(state) == pytest.approx(expected), text
    root = scorer.extra_ids(scorer.initial_state())
    assert tokenizer.encode("朝")[0] in root
    assert tokenizer.encode(" 朝阳区")[0] != tokenizer.encode("朝")[0] or True
    # every token of the phrase's own tokenization is offered at the point it is needed
    state = scorer.initial_state()
    for token in tokenizer.encode("朝阳区建国路"):
        assert token in scorer.extra_ids(state), tokenizer.decode_token(token)
        _, state = scorer.advance(state, token)
    # timestamps and other special tokens are neutral
    assert scorer.advance(scorer.initial_state(), tokenizer.timestamp_begin) == (0.0, scorer.initial_state())


def _server_scorers():
    """The search model's scorer builder over this module and the exported tokenizer.json (what
    render.py deploys as engine/hotwords.py and search/1/tokenizer.json)."""
    import gateway.asr.hotwords as hotword_module
    from model_repository.engine.search_hotwords import HotwordScorers

    return HotwordScorers(hotword_module, str(model_dir_path() / "tokenizer.json"))


def test_a_scorer_sent_to_the_server_search_is_rebuilt_alike(whisper_vocabulary):
    import json

    tokenizer, vocabulary = whisper_vocabulary
    graphs = [ContextGraph(parse_hotwords({"朝阳区建国路": 1.0, "市住建委": 2.0}), vocabulary),
              ContextGraph(parse_hotwords({"望京": 1.5}), vocabulary, variants=False)]
    sent = HotwordScorer(graphs, HotwordOptions(boost=2.5, max_extra_ids=8))
    wire = json.loads(json.dumps(scorer_wire(sent)))  # as it travels in the search request
    scorers = _server_scorers()
    rebuilt = scorers.scorer(wire)
    for text in ("我在朝陽區建國路", "打给市住建委", "去望京", "去望 京"):
        ids = tokenizer.encode(text)
        assert walk(rebuilt, ids)[0] == pytest.approx(walk(sent, ids)[0]), text
        state_sent, state_rebuilt = sent.initial_state(), rebuilt.initial_state()
        for token in ids:  # the same extra ids are asked for at every step
            assert rebuilt.extra_ids(state_rebuilt) == sent.extra_ids(state_sent)
            _, state_sent = sent.advance(state_sent, token)
            _, state_rebuilt = rebuilt.advance(state_rebuilt, token)
        assert rebuilt.finish(state_rebuilt) == pytest.approx(sent.finish(state_sent))
    assert sum(walk(rebuilt, tokenizer.encode("去望京"))[0]) == pytest.approx(2.5 * 1.5 * 2)  # not all zeros
    assert rebuilt.advance(rebuilt.initial_state(), tokenizer.timestamp_begin) == (0.0, rebuilt.initial_state())
    # the graphs are kept: a server-side list arrives with every window
    again = scorers.scorer(wire)
    assert again.graphs[0] is rebuilt.graphs[0] and scorers.graphs_built == 2
    # a scorer over another vocabulary stays with the gateway
    assert scorer_wire(scorer_for({"朝阳区": 1.0})) is None and scorer_wire(None) is None


@pytest.mark.parametrize("change, message", [
    ({"boost": 50.0}, "boost"),
    ({"graphs": []}, "graphs"),
    ({"graphs": [{"phrases": [["朝阳区", 99.0]]}]}, "weight"),
    ({"graphs": [{"phrases": "朝阳区"}]}, "phrases"),
    ({"graphs": [{"phrases": [["朝阳区"]]}]}, "graph #1"),
    ({"vocabulary": {"size": 10 ** 9, "ignore_ids": []}}, "does not fit"),
    ({"vocabulary": None}, "vocabulary"),
])
def test_bad_hotwords_in_a_search_request_are_refused_with_the_reason(whisper_vocabulary, change, message):
    from model_repository.engine.errors import INVALID_ARG
    from model_repository.engine.search_hotwords import HotwordSpecError

    _, vocabulary = whisper_vocabulary
    wire = {**scorer_wire(build_scorer({"朝阳区": 1.0}, vocabulary)), **change}
    with pytest.raises(HotwordSpecError, match=message) as raised:
        _server_scorers().scorer(wire)
    assert raised.value.code == INVALID_ARG


# --------------------------------------------------------------------------------------
# the GLM-ASR tokenizer (byte-level BPE too; the tiny export's splits every CJK character into bytes)


@pytest.fixture(scope="module")
def glm_family():
    path = glm_model_dir_path()
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} has no tokenizer.json (make export MODEL=glm-asr-tiny)")
    from gateway.asr.families import GlmAsrFamily, load_family

    family = load_family(path)
    assert isinstance(family, GlmAsrFamily)
    return family


@pytest.mark.parametrize("text", ["请问朝阳区建国路怎么走？", "Please transcribe this audio", "我在 Chaoyang District 123号, OK!",
                                  " 朝陽區 mixed 繁體 and ASCII\n"])
def test_glm_vocabulary_maps_tokens_to_their_bytes(glm_family, text):
    vocabulary = glm_family.hotword_vocabulary()
    assert isinstance(vocabulary, ByteLevelVocabulary) and glm_family.hotword_vocabulary() is vocabulary
    ids = glm_family.tokenizer.encode(text, add_special_tokens=False).ids
    assert vocabulary.encode_batch([text]) == [ids]
    pieces = [vocabulary.token_bytes(i) for i in ids]
    assert all(p for p in pieces)
    assert b"".join(pieces).decode("utf-8") == glm_family.tokenizer.decode(ids) == text


def test_glm_special_tokens_have_no_bytes(glm_family):
    vocabulary = glm_family.hotword_vocabulary()
    added = glm_family.tokenizer.get_added_tokens_decoder()
    assert added and all(vocabulary.token_bytes(i) is None for i in added)
    for token_id in (*glm_family.eos_ids, glm_family.audio_token_id, *glm_family.prefix_ids, *glm_family.suffix_ids):
        if token_id in added:
            assert vocabulary.token_bytes(token_id) is None
    assert vocabulary.token_bytes(-1) is None and vocabulary.token_bytes(glm_family.model_info["vocab_size"]) is None


def test_glm_tokenizations_match(glm_family):
    vocabulary = glm_family.hotword_vocabulary()
    encode = lambda text: glm_family.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    scorer = HotwordScorer(ContextGraph(parse_hotwords({"朝阳区": 1.0}), vocabulary), HotwordOptions(boost=1.0))
    for text in ("我在朝阳区", "我在朝陽區", "去 朝阳区 吧"):
        bonuses, state = walk(scorer, encode(text))
        assert sum(bonuses) + scorer.finish(state) == pytest.approx(3.0), text
    state = scorer.initial_state()
    for token in encode("朝阳区"):  # every token of the phrase is offered when it is needed
        assert token in scorer.extra_ids(state)
        _, state = scorer.advance(state, token)
    assert scorer.advance(scorer.initial_state(), glm_family.eos_ids[0]) == (0.0, scorer.initial_state())


def test_loop_guard_spots_repetition_loops_and_spares_speech():
    from gateway.asr.window_decoder import looks_like_loop

    loops = [
        "12345市民服務熱線12345市民服務熱衷12345市民服務熱衷12345市民服務熱衷12345市民",
        "幸福家園市人力資源和社会保障局市市場監督管理局市場監督管理局市場監督管理局市場監督管理局",
        "the the the the the the the the the the the the the the the the the the",
    ]
    speech = [
        "我在江南區望江路的超市買的牛奶回家一看已經過期了,找超市他們不給退。",
        "對對對對", "喂喂喂，你好", "1-2-3-4-5-6-7-8-9-10", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
        "天地玄皇宇宙 洪荒日月影子陈苏列长", "",
    ]
    assert all(looks_like_loop(t) for t in loops)
    assert not any(looks_like_loop(t) for t in speech)
