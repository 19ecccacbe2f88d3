"""Normalisation of ASR output and sound-alike place names (pure Python, fast)."""

from __future__ import annotations

import pytest

from analysis.phonetic import PhoneticIndex
from analysis.text import chinese_numeral_to_int, cjk_ratio, normalize, normalize_segments, split_sentences


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("幸福路十二號的路燈壞了", "幸福路12号的路灯坏了"),        # traditional -> simplified, numerals -> digits
        ("１８樓，報修三次了", "18楼,报修3次了"),                 # full-width digits and punctuation
        ("一下雨就积水", "一下雨就积水"),                         # 一 not before a measure word stays
        ("二十三栋一百零五室", "23栋105室"),
        ("幸福家園五東電梯", "幸福家园5栋电梯"),                   # 栋 misheard as 东 after a number
        ("东门路3号", "东门路3号"),                                # ... but not a real 东
        ("  多个   空格 ", "多个 空格"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize(("numeral", "value"), [("十", 10), ("十二", 12), ("二十", 20), ("一百零五", 105), ("两", 2), ("一二三", 123), ("几", None)])
def test_chinese_numerals(numeral, value):
    assert chinese_numeral_to_int(numeral) == value


def test_segments_keep_their_times():
    transcript = normalize_segments(
        [{"start_s": 0.0, "end_s": 2.5, "text": "我家路燈壞了"}, {"start_s": 2.5, "end_s": 6.0, "text": "已經兩週了"}], max_chars=1000
    )
    assert transcript.text == "我家路灯坏了,已经两周了"
    assert transcript.time_at(0) == 0.0
    assert transcript.time_at(transcript.text.index("已经")) == 2.5
    assert 0.0 < transcript.time_at(transcript.text.index("坏了")) < 2.5  # interpolated inside the segment


def test_long_text_is_truncated_with_a_flag():
    transcript = normalize_segments([{"start_s": 0, "end_s": 1, "text": "路灯坏了" * 100}], max_chars=120)
    assert len(transcript.text) == 120 and transcript.truncated


def test_sentences_and_cjk_ratio():
    assert [sentence for _, sentence in split_sentences("你好。路灯坏了,三天了!")] == ["你好", "路灯坏了", "三天了"]
    assert cjk_ratio("路灯坏了") == 1.0
    assert cjk_ratio("the streetlight is broken") == 0.0
    assert 0.3 < cjk_ratio("路灯 broken 了") < 0.8


def test_sound_alike_names_are_found_but_correct_ones_are_left_alone():
    index = PhoneticIndex(["滨湖区", "柳岸路", "高新区", "创新路", "幸福家园", "南湖大道", "南湖街道"])
    found = {match.heard: match.name for match in index.find("冰湖去流暗露那一段,我在高兴去闯新路,幸福家人")}
    assert found == {"冰湖去": "滨湖区", "流暗露": "柳岸路", "高兴去": "高新区", "闯新路": "创新路", "幸福家人": "幸福家园"}
    text = "南湖大道那个工地"
    protected = frozenset(range(0, 4))  # 南湖大道 is itself a known name
    assert index.find(text, protected) == []


def test_a_name_with_one_syllable_half_heard_is_found_only_where_allowed():
    names = ["望江苑", "码头路", "湖光小区", "建设路", "软件园"]
    index = PhoneticIndex(names, half_heard="路街道区")
    found = {match.heard: match.name for match in index.find("望江越门口,马桐路那边,无光小区又停水")}
    assert found == {"望江越": "望江苑", "马桐路": "码头路", "无光小区": "湖光小区"}  # yue/yuan, ton/tou, wu/hu
    assert index.find("这条路正在建设了") == []      # the generic 路 must be heard alike
    assert index.find("打车软件也叫不到车") == []    # a function word is itself, not a name's syllable
    assert index.find("望江门口") == []              # a whole syllable missing is no match
    assert PhoneticIndex(names).find("望江越门口,马桐路那边") == []  # off unless asked for
