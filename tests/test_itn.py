"""ITN: the written case table (tests/data/itn_cases.tsv), options, errors, threads."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("itn.chinese.inverse_normalizer", reason="wetextprocessing is not installed")

from gateway.asr.itn import ItnError, ItnOptions, load, normalize, parse_integer, parse_number  # noqa: E402

CASES_FILE = Path(__file__).parent / "data" / "itn_cases.tsv"


@dataclass(frozen=True)
class Case:
    line: int
    category: str
    text: str
    expected: str
    options: ItnOptions

    def __str__(self) -> str:
        return f"{self.category}:{self.line}:{self.text}"


def _options(spec: str) -> ItnOptions:
    kwargs: dict = {}
    for item in filter(None, spec.split(";")):
        key, _, value = item.partition("=")
        if key == "enabled":
            kwargs[key] = value.lower() == "true"
        elif key == "protected_terms":
            kwargs[key] = frozenset(value.split(","))
        else:
            kwargs[key] = value
    return ItnOptions(**kwargs)


def load_cases() -> list[Case]:
    cases = []
    for number, raw in enumerate(CASES_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() and raw.count("\t") < 2 or raw.startswith("#"):
            continue
        fields = raw.split("\t") + [""] * 3
        cases.append(Case(number, fields[0], fields[1], fields[2], _options(fields[3])))
    return cases


CASES = load_cases()


def test_case_table_is_large_and_covers_every_category():
    assert len(CASES) >= 100
    categories = {c.category for c in CASES}
    assert {"date", "time", "money", "percent", "phone", "address", "ordinal", "range", "keep", "english"} <= categories


@pytest.mark.parametrize("case", CASES, ids=str)
def test_itn_case(case: Case):
    assert normalize(case.text, case.options) == case.expected


def test_load_once_and_time_it():
    seconds = load()
    assert seconds < 30
    started = time.perf_counter()
    assert load() == seconds  # second call: already loaded
    assert time.perf_counter() - started < 0.1


def test_threads_share_one_normalizer():
    texts = [c.text for c in CASES if c.options == ItnOptions()] * 3
    expected = [normalize(t) for t in texts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(normalize, texts)) == expected


def test_long_transcript_is_chunked_and_fast():
    sentence = "我二零二五年三月十二号下午三点半打过电话，说好三到五个工作日处理，电话是一三八零零一三八零零零。"
    started = time.perf_counter()
    out = normalize(sentence * 50)
    assert out == "我2025年3月12日15:30打过电话，说好3到5个工作日处理，电话是13800138000。" * 50
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "kwargs",
    [{"time_format": "12h"}, {"enabled": "yes"}, {"range_separator": "----"}, {"protected_terms": frozenset({""})}],
)
def test_invalid_options(kwargs):
    with pytest.raises(ItnError):
        ItnOptions(**kwargs)


def test_invalid_text():
    with pytest.raises(ItnError):
        normalize(b"\xe4\xb8\x80")  # bytes, not text
    with pytest.raises(ItnError):
        normalize("一" * 100_001)


def test_options_are_hashable_and_frozen():
    options = ItnOptions(protected_terms={"二十里铺"})
    assert isinstance(options.protected_terms, frozenset)
    hash(options)
    with pytest.raises(AttributeError):
        options.time_format = "chinese"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text,value",
    [("一百二十三", 123), ("两千五", 2500), ("一万零五百", 10500), ("十二", 12), ("一五零一", 1501), ("三万五千", 35000),
     ("一亿两千万", 120_000_000), ("百", None), ("", None), ("abc", None)],
)
def test_parse_integer(text, value):
    assert parse_integer(text) == value


def test_parse_number():
    assert parse_number("三点五") == "3.5"
    assert parse_number("零一零") == "010"
    assert parse_number("三点五亿") == "3.5亿"
    assert parse_number("三点") is None
