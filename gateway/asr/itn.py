"""Inverse text normalization (ITN) for Chinese transcripts, in hotline-ledger formats.

    from gateway.asr.itn import ItnOptions, normalize
    normalize("二零二五年三月十二号下午三点半打的电话")   # -> "2025年3月12日15:30打的电话"

WeTextProcessing's Chinese ITN (prebuilt tagger FST shipped in the ``wetextprocessing``
wheel, loaded once, about 0.5 s) tags numbers, dates, phone numbers, fractions, license
plates and its whitelist of idioms; this module verbalizes the tags itself (its own
verbalizer writes ``2025/03/12``, ``¥123.5``, ``50km`` and drops interjections) and adds
rules the FST lacks, applied first:

- protected spans stay as spoken: idioms and place names with numerals (一心一意, 三里屯,
  五道口, 十八里店, ...) plus ``ItnOptions.protected_terms`` (e.g. the hotword lists);
- percentages ``百分之三点五`` -> ``3.5%``; times ``下午三点半`` -> ``15:30`` (or
  ``下午3点半`` with ``time_format="chinese"``); money ``一百二十三块五`` -> ``123.5元``;
  ranges ``三到五天`` -> ``3到5天`` (connector kept unless ``range_separator`` is set);
  numbers with measure and address units ``五公里`` -> ``5公里``, ``三号楼二单元`` ->
  ``3号楼2单元``; months ``三月份`` -> ``3月份``;
- dates ``2025年3月12日``; multi-digit numbers and digit strings (phone numbers) become
  digits; single-digit counts with ordinary classifiers stay Chinese (两个人, 第三次),
  as in GB/T 15835; text in Latin script (English numbers) is left as the model wrote it.

``normalize`` is thread-safe (FST lookups hold a lock; about 1 ms per short sentence).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

log = logging.getLogger(__name__)

TIME_FORMATS = ("24h", "chinese")
MAX_TEXT_CHARS = 100_000


class ItnError(ValueError):
    """Invalid ITN options or input."""


class ItnUnavailableError(RuntimeError):
    """WeTextProcessing (pynini) is not installed or its FSTs cannot be loaded."""


@dataclass(frozen=True)
class ItnOptions:
    enabled: bool = True
    time_format: str = "24h"  # "24h": 15:30; "chinese": 下午3点30分
    range_separator: str | None = None  # None keeps the spoken 到/至; e.g. "-" or "~"
    protected_terms: frozenset[str] = field(default_factory=frozenset)  # left untouched (place names)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ItnError(f"enabled must be a bool, got {self.enabled!r}")
        if self.time_format not in TIME_FORMATS:
            raise ItnError(f"time_format must be one of {TIME_FORMATS}, got {self.time_format!r}")
        if self.range_separator is not None and (not isinstance(self.range_separator, str) or len(self.range_separator) > 3):
            raise ItnError(f"range_separator must be None or a string of at most 3 characters, got {self.range_separator!r}")
        if not isinstance(self.protected_terms, frozenset):
            object.__setattr__(self, "protected_terms", frozenset(self.protected_terms))
        for term in self.protected_terms:
            if not isinstance(term, str) or not term.strip():
                raise ItnError(f"protected_terms must be non-empty strings, got {term!r}")


# ---------------------------------------------------------------------------------------
# Chinese numerals

_DIGIT = {"零": 0, "〇": 0, "○": 0, "洞": 0, "一": 1, "幺": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_SMALL_UNIT = {"十": 10, "百": 100, "千": 1000}
_BIG_UNIT = {"万": 10_000, "亿": 100_000_000}
D = "零〇○一二两三四五六七八九"
NUM_RUN = f"[{D}十百千万亿]+"
NUMBER = f"{NUM_RUN}(?:点[{D}]+[万亿]?)?"  # 三点五 is a decimal wherever a number is expected


def parse_integer(text: str) -> int | None:
    """一百二十三 -> 123, 两千五 -> 2500, 一万零五百 -> 10500, 十二 -> 12; None if not a numeral."""
    if not text or any(c not in _DIGIT and c not in _SMALL_UNIT and c not in _BIG_UNIT for c in text):
        return None
    if all(c in _DIGIT for c in text):
        if len(text) == 1:
            return _DIGIT[text]
        return int("".join(str(_DIGIT[c]) for c in text))  # digit by digit: 一五零一
    total = section = digit = 0
    last_unit = 0
    pending_digit = False
    for c in text:
        if c in _DIGIT:
            digit = _DIGIT[c]
            pending_digit = True
        elif c in _SMALL_UNIT:
            unit = _SMALL_UNIT[c]
            if not pending_digit and c != "十":
                return None
            section += (digit if pending_digit else 1) * unit
            digit, pending_digit, last_unit = 0, False, unit
        else:
            unit = _BIG_UNIT[c]
            section += digit if pending_digit else 0
            if section == 0 and total == 0:
                return None
            total = (total + section) * unit if unit > 10_000 and total and total < unit else total + section * unit
            section, digit, pending_digit, last_unit = 0, 0, False, unit
    if pending_digit:
        prev = text[-2] if len(text) >= 2 else ""
        if prev in _SMALL_UNIT or prev in _BIG_UNIT:
            section += digit * (last_unit // 10 if last_unit >= 100 and prev != "零" else 1)  # 两千五 = 2500
        else:
            section += digit
    return total + section


def parse_number(text: str) -> str | None:
    """Digits of a Chinese numeral with an optional 点 decimal part: 三点五 -> 3.5.

    A number ending in 万/亿 keeps it: 三万 -> 3万, 三点五亿 -> 3.5亿 (三万五千 -> 35000)."""
    if len(text) > 1 and text[-1] in _BIG_UNIT and not any(c in _BIG_UNIT for c in text[:-1]):
        head = parse_number(text[:-1])
        return None if head is None else head + text[-1]
    whole, dot, frac = text.partition("点")
    value = parse_integer(whole)
    if value is None:
        return None
    if whole and all(c in _DIGIT for c in whole) and len(whole) > 1:
        digits = "".join(str(_DIGIT[c]) for c in whole)  # keep leading zeros of digit strings
    else:
        digits = str(value)
    if dot:
        if not frac or any(c not in _DIGIT for c in frac):
            return None
        digits += "." + "".join(str(_DIGIT[c]) for c in frac)
    return digits


# ---------------------------------------------------------------------------------------
# protected spans

DEFAULT_PROTECTED = (
    # idioms and fixed phrases
    "一心一意 三心二意 一五一十 十全十美 一模一样 乱七八糟 七上八下 四面八方 五花八门 一清二楚 独一无二 "
    "九牛一毛 千方百计 万无一失 半斤八两 一干二净 三番五次 三天两头 一举两得 一石二鸟 五颜六色 七嘴八舌 "
    "一日三餐 接二连三 一年四季 四分五裂 三言两语 一五一十 丢三落四 说一不二 一成不变 十万火急 一丝不苟 "
    "一路平安 一帆风顺 一事无成 一言为定 一针见血 一目了然 百分百 十字路口 一把手 二手房 二手车 三轮车 "
    "四合院 五金店 一块儿 一会儿 一点儿 一点点 一下子 一下 一些 一起 一直 一定 一样 一般 一切 一旦 一共 "
    "统一 唯一 万一 第一时间 一线 十分 一大早 一口气 一辈子 一部分 三好学生 五星级 "
    "星期一 星期二 星期三 星期四 星期五 星期六 星期日 星期天 礼拜一 礼拜二 礼拜三 礼拜四 礼拜五 礼拜六 "
    "周一 周二 周三 周四 周五 周六 周日 十一国庆 十一长假 十一假期 十一黄金周 五一假期 五一长假 "
    # place names with numerals (Beijing deployment; add yours via protected_terms)
    "三里屯 五道口 八宝山 十三陵 五棵松 六里桥 八角 七里庄 十里河 十八里店 三元桥 四惠 四季青 五里店 "
    "九龙山 二里沟 三里河 百万庄 六铺炕 王四营 八里庄 二环 三环 四环 五环 六环 三间房 五路居 四道口 "
    "双井 九仙桥 十里堡 六里屯 三家店 二七剧场 八大处 十渡 百子湾 万寿路 万泉河 千禧 一亩园 "
    "四川 三亚 九寨沟 五台山 六盘水 九江 三明 十堰 七台河"
).split()


@lru_cache(maxsize=64)
def _protected_pattern(extra: frozenset[str]) -> re.Pattern | None:
    numeral = re.compile(f"[{D}十百千万亿幺]")
    terms = {t for t in DEFAULT_PROTECTED} | {t.strip() for t in extra if numeral.search(t)}
    if not terms:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)))


# ---------------------------------------------------------------------------------------
# rules applied before the FST (each turns matches into fixed text)

_PERIOD = "凌晨|清晨|早晨|早上|上午|中午|午后|下午|傍晚|晚上|夜里|夜间|半夜|深夜"
_HOUR = f"二十[一二三四]?|十[一二三四五六七八九]?|[零〇{D[3:]}]"
_MIN = f"[一二三四五]十[一二三四五六七八九]?|十[一二三四五六七八九]?|零?[一二三四五六七八九]"
_TIME = re.compile(
    rf"(?P<period>{_PERIOD})?(?P<hour>{_HOUR})点(?P<zhong>钟)?"
    rf"(?:(?P<half>半)|(?P<whole>整)|(?P<quarter>一刻|三刻)|(?P<minute>{_MIN}|零)分(?:(?P<second>{_MIN})秒)?|(?P<bare>零[一二三四五六七八九]|{_MIN})(?![分秒点{D}十百千万]))?"
)
_TIME_BEFORE = re.compile(r"(今天|明天|后天|昨天|前天|今早|今晚|明早|明晚|号|日|每天|天天|周[一二三四五六日天]|星期[一二三四五六日天]|礼拜[一二三四五六日天]|到|至|从|约|大约|大概)$")
_TIME_AFTER = re.compile(r"^(到|至|前|后|以前|以后|之前|之后|左右|开始|结束|多|的时候|上班|下班|以内|那会|—|-|~)")

# vague quantities stay as spoken: 十几个 / 几十个 / 二十几岁 / 十来个 (10几个 or 几10个 are wrong)
_VAGUE = re.compile(rf"[{D}十百千万]*几[十百千万亿]*|[{D}十百千]+来(?=[个岁年天次人块元米斤位名家只条辆])")
_PERCENT = re.compile(rf"百分之(?P<num>{NUMBER}|百)")
_MONEY = re.compile(
    rf"(?P<yuan>{NUM_RUN}(?:点[{D}]+)?)(?:(?P<unit>块钱|块|元钱|元)(?P<jiao>[{D[3:]}])?(?:(?:毛|角)(?P<fen>[{D[3:]}])?分?)?|(?P<mao>毛钱|毛|角钱|角)(?P<fen2>[{D[3:]}])?(?:分)?)"
)
_MEASURE_UNITS = (
    "平方公里|平方千米|平方米|平米|立方米|公里|千米|厘米|毫米|米|公斤|千克|克|斤|吨|毫升|升|摄氏度|度|"
    "美元|欧元|港币|港元|英镑|日元|周岁|岁|千瓦时|千瓦|"
    "号楼|号院|号线|号门|号|栋|幢|单元|层|楼|室|户|床|路公交|路车|路"
)
_RANGE_TAIL = f"(?={_MEASURE_UNITS}|个|天|人|次|年|月|周|小时|分钟|秒|家|位|名|件|辆|台|套|倍|多|%)"
_RANGE = re.compile(rf"(?P<a>{NUMBER})(?P<sep>到|至|~|～)(?P<b>{NUMBER}){_RANGE_TAIL}")
_APPROXIMATE = re.compile(rf"(?<![{D}十百千万点])(?P<a>[一二三四五六七八九])(?P<b>[一二三四五六七八九])(?:十|百|千|万)?{_RANGE_TAIL}")


def _is_approximate(a: str, b: str) -> bool:
    """三五天, 七八个人: adjacent (or 三五) single digits are an approximation and stay Chinese."""
    return _DIGIT[b] - _DIGIT[a] == 1 or (a, b) == ("三", "五")


_MEASURE = re.compile(rf"(?P<num>{NUMBER})(?P<unit>{_MEASURE_UNITS})")
_TEMPERATURE = re.compile(rf"(?P<num>{NUM_RUN})度(?P<d>[{D[3:]}])(?![{D}十百千万点])")
_MONTH = re.compile(r"(?P<m>十[一二]|[一二三四五六七八九十])月(?P<tail>份|底|初|上旬|中旬|下旬|末|中)")
_NOT_ALONE_ONE = frozenset({"度", "层", "楼", "户", "床", "路", "米"})  # 一度, 一层灰, 一路, 一米阳光


_RANGE_PERIOD = re.compile(rf"(?P<period>{_PERIOD})[^，。,.；;]{{1,12}}(?:到|至)$")


def _format_time(m: re.Match, options: ItnOptions, before: str = "") -> str | None:
    period = m.group("period") or ""
    inherited = False
    if not period:
        # the end of a range takes the period of its start: 下午两点半到三点 -> 14:30到15:00
        earlier = _RANGE_PERIOD.search(before)
        if earlier:
            period, inherited = earlier.group("period"), True
    hour = parse_integer(m.group("hour"))
    if hour is None or hour > 24:
        return None
    minute = second = 0
    spoken_minute = ""
    if m.group("half"):
        minute, spoken_minute = 30, "半"
    elif m.group("quarter"):
        minute = 15 if m.group("quarter") == "一刻" else 45
        spoken_minute = f"{minute}分"
    elif m.group("minute"):
        minute = parse_integer(m.group("minute").lstrip("零") or "零") or 0
        spoken_minute = f"{minute}分"
        if m.group("second"):
            second = parse_integer(m.group("second")) or 0
    elif m.group("bare"):
        if not period:
            return None  # 三点五 without 分 or a period word is a decimal
        minute = parse_integer(m.group("bare").lstrip("零")) or 0
        spoken_minute = f"{minute}分"
    if minute >= 60 or second >= 60:
        return None
    if options.time_format == "chinese":
        text = f"{'' if inherited else period}{hour}点{'钟' if m.group('zhong') else ''}"
        if m.group("whole"):
            text += "整"
        text += spoken_minute
        if second:
            text += f"{second}秒"
        return text
    h24 = hour
    if period in ("下午", "午后", "傍晚") and hour < 12:
        h24 = hour + 12
    elif period in ("晚上", "夜里", "夜间", "深夜", "半夜"):
        h24 = hour + 12 if 6 <= hour < 12 else (0 if hour == 12 else hour)
    elif period == "中午" and hour <= 3:
        h24 = hour + 12
    elif period in ("凌晨",) and hour == 12:
        h24 = 0
    return f"{h24}:{minute:02d}" + (f":{second:02d}" if second else "")


def _is_time(m: re.Match, before: str, after: str) -> bool:
    if before and before[-1] in _DIGIT or before.endswith(("十", "百", "千", "万", "第")):
        return False  # part of a longer number (一百二十点五)
    if m.group("period") or m.group("half") or m.group("whole") or m.group("quarter") or m.group("minute") or m.group("zhong"):
        return True
    if m.group("bare"):
        return False
    if m.group("hour") == "一":  # 一点 is usually "a little"
        return False
    return bool(_TIME_BEFORE.search(before) or _TIME_AFTER.search(after))


def _money(m: re.Match) -> str | None:
    if m.group("mao"):
        jiao = parse_number(m.group("yuan"))
        if jiao is None or "." in jiao or int(jiao) > 9:
            return None
        fen = m.group("fen2")
        return f"0.{jiao}{_DIGIT[fen] if fen else ''}".rstrip("0").rstrip(".") + "元" if (jiao != "0" or fen) else None
    yuan = parse_number(m.group("yuan"))
    if yuan is None or (m.group("jiao") and not yuan.isdigit()):
        return None
    unit = m.group("unit")
    jiao, fen = m.group("jiao"), m.group("fen")
    if unit == "块" and not jiao and yuan.isdigit() and len(yuan) == 1:
        return None  # 三块 (pieces) stays; 三块钱 / 三块五 / 十五块 are money
    if jiao:
        yuan += f".{_DIGIT[jiao]}{_DIGIT[fen] if fen else ''}"
    return f"{yuan}元"


# ---------------------------------------------------------------------------------------
# WeTextProcessing


_TOKEN = re.compile(r'(\w+) \{((?:\s*\w+: "(?:[^"\\]|\\.)*")*)\s*\}')
_FIELD = re.compile(r'(\w+): "((?:[^"\\]|\\.)*)"')
_SYMBOL_UNITS = {"km": "公里", "kg": "公斤", "m²": "平方米", "m³": "立方米", "cm": "厘米", "mm": "毫米", "m": "米", "g": "克",
                 "min": "分钟", "h": "小时", "s": "秒", "°": "度", "º": "度", "°C": "摄氏度", "ml": "毫升", "km²": "平方公里",
                 "kw": "千瓦", "kwh": "千瓦时", "km/h": "公里每小时"}
_CURRENCY = {"¥": "元", "$": "美元", "£": "英镑", "€": "欧元", "HK$": "港元"}


class _WeText:
    """The prebuilt zh ITN tagger FST of wetextprocessing, loaded once."""

    def __init__(self) -> None:
        started = time.perf_counter()
        try:
            import logging as _logging

            from itn.chinese.inverse_normalizer import InverseNormalizer

            _logging.getLogger("wetext").setLevel(_logging.WARNING)
            self._normalizer = InverseNormalizer()  # reads itn/zh_itn_tagger.fst shipped in the wheel
        except ImportError as exc:
            raise ItnUnavailableError(f"wetextprocessing is not installed: {exc}") from exc
        except Exception as exc:  # pynini raises its own errors on unreadable FSTs
            raise ItnUnavailableError(f"cannot load the WeTextProcessing FSTs: {exc}") from exc
        self._lock = threading.Lock()
        self.load_s = time.perf_counter() - started
        log.info("ITN: WeTextProcessing zh FSTs loaded in %.2f s", self.load_s)

    def tag(self, text: str) -> list[tuple[str, dict[str, str]]]:
        with self._lock:
            tagged = self._normalizer.tag(text)
        tokens = []
        for name, body in _TOKEN.findall(tagged):
            fields = {k: re.sub(r"\\(.)", r"\1", v) for k, v in _FIELD.findall(body)}
            tokens.append((name, fields))
        return tokens


_engine: _WeText | None = None
_engine_lock = threading.Lock()


def load() -> float:
    """Load the FSTs now (e.g. at server start); returns the load time in seconds."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _WeText()
        return _engine.load_s


def _tagger() -> _WeText:
    if _engine is None:
        load()
    return _engine


def _verbalize(name: str, fields: dict[str, str], options: ItnOptions) -> str:
    value = fields.get("value", "")
    if name == "date":
        out = ""
        if "year" in fields:
            year = fields["year"]
            out += year if year.endswith("年") else f"{year}年"
        if "month" in fields:
            out += f"{int(fields['month'])}月"
        if "day" in fields:
            out += f"{int(fields['day'])}日"
        return out
    if name == "time":
        hour = int(fields.get("hour", "0"))
        minute = int(fields.get("minute", "0"))
        noon = fields.get("noon", "")
        if options.time_format == "chinese":
            period = {"a.m.": "上午", "p.m.": "下午"}.get(noon, "")
            return f"{period}{hour}点{minute}分" if minute else f"{period}{hour}点"
        if noon == "p.m." and hour < 12:
            hour += 12
        return f"{hour}:{minute:02d}" + (f":{int(fields['second']):02d}" if fields.get("second") else "")
    if name == "money":
        currency = fields.get("currency", "")
        return f"{value}{_CURRENCY.get(currency, currency)}"
    if name == "measure":
        m = re.fullmatch(r"(-?[\d.]+)(?:~(-?[\d.]+))?(.*)", value)
        if m:
            unit = _SYMBOL_UNITS.get(m.group(3), m.group(3))
            if m.group(2):
                sep = options.range_separator or "到"
                return f"{m.group(1)}{unit}{sep}{m.group(2)}{unit}" if unit == "%" else f"{m.group(1)}{sep}{m.group(2)}{unit}"
            return f"{m.group(1)}{unit}"
        return value
    if name == "fraction":
        return f"{fields.get('sign', '')}{fields.get('numerator', '')}/{fields.get('denominator', '')}"
    if name == "math" and re.fullmatch(r"-?[\d.]+~-?[\d.]+", value):
        a, b = value.split("~")
        return f"{a}{options.range_separator or '到'}{b}"
    return value


# ---------------------------------------------------------------------------------------
# pipeline

Segment = tuple[bool, str]  # (fixed: no further rules, text)


def _apply(segments: list[Segment], pattern: re.Pattern, convert) -> list[Segment]:
    """Replace matches in the not-yet-fixed segments by ``convert(match, before, after)`` (None: leave)."""
    out: list[Segment] = []
    for fixed, text in segments:
        if fixed:
            out.append((fixed, text))
            continue
        pos = 0
        for m in pattern.finditer(text):
            replacement = convert(m, text[: m.start()], text[m.end() :])
            if replacement is None:
                continue
            if m.start() > pos:
                out.append((False, text[pos : m.start()]))
            out.append((True, replacement))
            pos = m.end()
        if pos < len(text):
            out.append((False, text[pos:]))
    return out


def _normalize_chunk(text: str, options: ItnOptions) -> str:
    segments: list[Segment] = [(False, text)]
    protected = _protected_pattern(options.protected_terms)
    if protected is not None:
        # a term right after a numeral is part of a number: 三十分 is not 十分 (very)
        segments = _apply(segments, protected, lambda m, b, a: None if b and (b[-1] in _DIGIT or b[-1] in "十百千万点") else m.group(0))
    segments = _apply(segments, re.compile(r"[A-Za-z][A-Za-z'\- ]*[A-Za-z]|[A-Za-z]"), lambda m, b, a: m.group(0))
    segments = _apply(segments, _VAGUE, lambda m, b, a: m.group(0))
    segments = _apply(segments, _PERCENT, lambda m, b, a: "100%" if m.group("num") == "百" else (lambda n: f"{n}%" if n else None)(parse_number(m.group("num"))))
    chinese_time = ItnOptions(time_format="chinese")
    segments = _apply(
        segments,
        _TIME,
        lambda m, b, a: (_format_time(m, chinese_time if a.startswith("多") else options, b) if _is_time(m, b, a) else None),
    )

    def _range(m, before, after):
        a, b = parse_number(m.group("a")), parse_number(m.group("b"))
        if a is None or b is None:
            return None
        return f"{a}{options.range_separator or m.group('sep')}{b}"

    segments = _apply(segments, _APPROXIMATE, lambda m, b, a: m.group(0) if _is_approximate(m.group("a"), m.group("b")) else None)
    segments = _apply(segments, _RANGE, _range)
    segments = _apply(segments, _MONEY, lambda m, b, a: _money(m))

    def _measure(m, before, after):
        unit = m.group("unit")
        if unit == "号" and re.search(f"月[{D}十]*$", before):
            return None  # 三月十二号: a date, left to the FST
        if unit == "路" and len(m.group("num")) == 1:
            return None  # 一路 / 三路 stay unless multi-digit bus routes
        if m.group("num") == "一" and unit in _NOT_ALONE_ONE:
            return None
        number = parse_number(m.group("num"))
        return None if number is None else f"{number}{unit}"

    segments = _apply(
        segments,
        _TEMPERATURE,
        lambda m, b, a: (lambda n: f"{n}.{_DIGIT[m.group('d')]}度" if n and "." not in n else None)(parse_number(m.group("num"))),
    )
    segments = _apply(segments, _MEASURE, _measure)
    segments = _apply(segments, _MONTH, lambda m, b, a: f"{parse_integer(m.group('m'))}月{m.group('tail')}")

    out = []
    engine = _tagger()
    for fixed, part in segments:
        if fixed or not re.search(f"[{D}十百千万亿幺]", part):
            out.append(part)
            continue
        part = part.replace("〇", "零").replace("○", "零")
        tokens = engine.tag(part)
        rendered = "".join(_verbalize(name, fields, options) for name, fields in tokens)
        out.append(rendered if tokens else part)
    return "".join(out)


_CHUNK = re.compile(r"([。！？；，、!?;\n]|,(?!\d)|\.(?!\d)|\s+)")


def normalize(text: str, options: ItnOptions | None = None) -> str:
    """ITN of one transcript (see the module docstring); the text unchanged when disabled."""
    options = options or ItnOptions()
    if not isinstance(text, str):
        raise ItnError(f"text must be a str, got {type(text).__name__}")
    if not options.enabled or not text:
        return text
    if len(text) > MAX_TEXT_CHARS:
        raise ItnError(f"text of {len(text)} characters is longer than {MAX_TEXT_CHARS}")
    parts = _CHUNK.split(text)
    return "".join(p if (i % 2 or not p) else _normalize_chunk(p, options) for i, p in enumerate(parts))


def normalize_many(texts: Iterable[str], options: ItnOptions | None = None) -> list[str]:
    return [normalize(t, options) for t in texts]
