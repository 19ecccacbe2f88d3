"""Danger recognised from what the caller describes, not from urgent words (RUBRIC.md, high).

Each kind is a set of regular expressions over the normalised transcript (simplified
Chinese, Arabic digits). A hit preceded closely by a negation (没有燃气味) or a hypothetical
(万一着火) does not count.
The hits are features of the urgency model and reasons on the ticket; on their own they
decide nothing. Common ASR homophones are written into the patterns (人气/然气 for 燃气).

The ASR also writes a described danger as other characters of the same sound (煤气味 ->
没气味, 食物中毒 -> 食物重毒). Words of three or more characters (HEARD_WORDS: the plain
words of the patterns, and the gas words with 味/泄漏) are therefore also found by sound:
every syllable must sound alike (analysis/phonetic.py), none may differ (天然气味 is not
天然气要). Two-character words are not: too many of them sound like something harmless
(打架 / 大家, 家暴 / 家宝, 拿刀 / 拿到).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from analysis.evidence import Evidence
from analysis.phonetic import PhoneticIndex

NEGATIONS = ("没有", "没", "不是", "并非", "不存在", "无", "不会", "别")
# A danger the caller only imagines (堆满了纸箱，万一着火了咋跑: a blocked escape, not a fire) is
# ruled out as a negated one is; the hazard that is there has cues of its own.
HYPOTHETICALS = ("万一", "要是", "如果", "真要", "真的要")
RULED_OUT = NEGATIONS + HYPOTHETICALS
NEGATION_WINDOW_CHARS = 2
# Everyday phrases that contain a danger word: a stove that will not light (打不着火), anger,
# a headache, uproar, disgust, a smoke detector, a card (社保卡在). A danger cue inside one does
# not count, here and in the urgency cues (analysis/urgency.py), and the model's views cut them.
FALSE_DANGER = re.compile(r"[不没]着火|气炸了|头都?要?炸了|炸了锅|[想要]吐了|烟雾报警器?|(?:社保|医保|银行|饭|公交|会员)卡在")

_GAS = "(?:燃气|煤气|天然气|液化气|瓦斯|人气|然气|沼气|煤汽|燃汽)"
_KIN = "(?:孩子|小孩|儿子|女儿|孙子|孙女|外孙|娃|闺女|老人|老伴|老头|老太太|父亲|母亲|我爸|我妈|爸爸|妈妈|奶奶|爷爷|外婆|姥姥|外公|姥爷|婆婆|公公)"

DANGER_PATTERNS: dict[str, tuple[str, ...]] = {
    "燃气": (
        rf"{_GAS}.{{0,4}}(?:味|泄漏|泄露|漏了|漏气|在漏|嘶嘶)",
        rf"(?:闻到|一股|有股|好大的?|很重的?|浓浓的?|刺鼻的?).{{0,6}}{_GAS}",
        r"臭鸡蛋(?:味|的味道)",
        r"漏气|gas (?:smell|leak)",
    ),
    "火情": (
        r"着火|起火|失火|火灾|冒烟|浓烟|烟雾|黑烟滚滚|火苗|火光|烧起来|冒火|明火|火星子|爆炸|炸了|自燃|烧焦|糊味|fire|smoke",
    ),
    "被困": (
        r"困在|被困|关在里面|卡在|出不来|锁在(?:里面|屋里|家里|车里)|困住|trapped",
        r"电梯.{0,10}(?:停|卡|困|关)(?:住|在|了)",
    ),
    "走失": (
        rf"{_KIN}.{{0,20}}(?:不见了|走丢|走失|丢了|找不到|找不着|没回家|没回来|没到家|联系不上|失踪|没影了|不知道去哪)",
        r"走丢|走失|失踪|missing",
    ),
    "伤病": (
        r"摔倒|摔了一?跤|跌倒|跌低|(?:倒|摔|躺|趴|瘫)在地上|倒地|起不来|爬不起来|(?:叫|喊|拍|摇|推|人|老人|孩子|大爷|阿姨|奶奶|爷爷|(?:他|她)(?!们)).{0,6}没有?反应|叫不醒|没有?意识|昏迷|晕倒|晕过去|不省人事",
        r"受伤|流血|出血|骨折|头破|撞伤|砸伤|烫伤|咬伤|抽搐|休克|中毒|吐了|呕吐|上吐下泻|喘不上气|喘不过气|呼吸困难|胸口疼|心脏病|发高烧|injured",
    ),
    "医疗设备": (
        r"制氧机|氧气机|吸氧|透析|呼吸机|氧气瓶|输液泵|离不开电|靠电|ventilator|oxygen",
    ),
    "水淹": (
        r"(?:车|汽车|轿车|公交|人|司机|老人|孩子).{0,10}(?:淹|泡在水|困在水|被水冲|冲走|水里|车顶)",
        r"(?:水|积水|洪水).{0,10}(?:淹到|没过|漫过|齐腰|齐胸|到腰|到胸|到膝盖|车顶|车窗|进屋|进家|灌进|涌进|倒灌)",
        r"(?:下穿|地道|涵洞|桥洞|隧道|地下车库).{0,10}(?:水|淹)",
    ),
    "电线": (
        r"(?:地上|路上|地下|水里).{0,4}(?:一根|有根|有条|一条)(?:电)?线",
        r"(?:电线|电缆|高压线|线缆|电箱|配电箱).{0,10}(?:掉|垂|断|落|裸露|露在|打火|火花|冒烟|漏电|耷拉|拖在地|泡在水)",
        r"漏电|触电|电到人|麻手|冒火花|打火花|电打",
    ),
    "坍塌": (
        r"坍塌|倒塌|塌陷|塌了|塌咗|要塌|快塌|垮了|摇摇欲坠|要掉下来|掉下来|砸下来|砸到|大裂缝|裂开|开裂|松动.{0,4}(?:掉|砸)",
    ),
    "井坑": (
        r"井盖.{0,8}(?:没了|丢|不见|掉|缺|被偷|翻|开着|敞|碎|冇咗|唔见)",
        r"(?:下水道|窨井|雨水井|污水井|检查井)的?盖(?:子|板)?.{0,6}(?:撬|偷|没了|丢|不见|掉|缺|碎|翻|开着|敞)",
        r"(?:大坑|深坑|大洞|窟窿|塌了个|陷下去|陷咗)",
        r"(?:井口|井|窨井|沙井|下水道口).{0,6}(?:没盖|冇盖|无盖|没有盖|敞着|露着)",
        r"(?:好深|很深|深不见底|看不到底|睇唔到底)",
    ),
    "中毒": (
        r"甲醇|食物中毒|一氧化碳|(?:吃|食)(?:坏|完|了以后).{0,16}(?:吐|拉肚子|肚痛|医院|急诊)|(?:好几个|一群|很多|好多|全是|几个).{0,10}(?:吐|拉肚子|上吐下泻)",
    ),
    "轻生": (
        r"跳下去|跳楼|要跳(?![起过着舞绳远高])|轻生|想不开|自杀|不想活|寻死",
    ),
    "歪斜": (  # weaker than collapse: a sign or pole knocked askew is usually not high
        r"倾斜|歪了|撞歪|歪咗|松动|松咗|脱落|翘起|郁嚟郁去",
    ),
    "暴力": (
        r"打人|打架|殴打|砍人|拿刀|持刀|威胁|恐吓|家暴|报复|要杀|动手打|挨打",
    ),
    "寒冷": (
        r"(?:没有?|停了?|不)?(?:暖气|供暖|取暖).{0,20}(?:老人|病人|婴儿|宝宝|瘫痪).{0,12}(?:冻|冷)",
        r"(?:老人|老人家|阿爷|阿嫲|阿婆|爷爷|奶奶|八十|九十|婴儿|宝宝|瘫痪).{0,60}(?:暖气|供暖).{0,40}(?:冻|发烧|冷得)",
        r"(?:没有?|停了?|不)?(?:暖气|供暖).{0,40}(?:冻到|冻得|冻病|发烧)",
        r"(?:零下|结冰).{0,20}(?:没有?暖气|不供暖|停暖)",
    ),
}

_GAS_WORDS = ("燃气", "煤气", "天然气", "液化气", "瓦斯")
_HAN_WORD = re.compile(r"[\u4e00-\u9fff]{3,}")


def _plain_words(sources: tuple[str, ...]) -> set[str]:
    """Alternatives of the patterns that are plain words of 3+ characters (no regex syntax)."""
    words = set()
    for source in sources:
        for alternative in re.split(r"[|()]", source):
            if _HAN_WORD.fullmatch(alternative):
                words.add(alternative)
    return words


HEARD_WORDS: dict[str, tuple[str, ...]] = {
    kind: tuple(sorted(_plain_words(sources) | ({f"{gas}{tail}" for gas in _GAS_WORDS for tail in ("味", "泄漏", "漏气")} if kind == "燃气" else set())))
    for kind, sources in DANGER_PATTERNS.items()
}

# Call types that lower urgency (questions, praise, suggestions), and the matters of 其他
# (RUBRIC.md: missing people, public security, praise, wrong numbers, the hotline itself).
CALM_PATTERNS: dict[str, tuple[str, ...]] = {
    "咨询": (r"请问|想问|问一下|问下|咨询|怎么办理|如何|怎么(?:办|弄|申请|交|查|报名|收费|算)|点样|需要(?:什么|哪些)|在哪|多少钱|几多钱|什么时候|几点|能不能|可不可以|是否|有没有规定",),
    "表扬": (r"表扬|感谢|多谢|谢谢.{0,6}(?:师傅|工作人员|同志|你们|恁们)|点赞|锦旗|(?<!还)好人",),
    "建议": (r"建议|希望能|提个意见",),
    "治安": (r"打架|打交|打人|殴打|持刀|拿刀|钢管|威胁|恐吓|诈骗|骗子|骗了|呃咗|冒充|可疑|偷东西|小偷|被偷|抢劫|跳楼|轻生|想不开|栏杆外|流浪|醉酒|派出所|报警|110",),
    "走失": (r"走丢|走失|失踪|不见了|找不到(?:人|孩子|小孩|老人)|没回家|未返|冇返|联系不上|锁住咗|锁在车里",),
    "打错": (r"打错|外卖|订餐|叫个|查话费|查快递",),
    "过去": (r"上个?月|上礼拜|上个?星期|上周|去年|前几天|前些天|之前|上次|上回|当时",),
    "无恙": (r"还好(?:人)?没事|人没事|后来没事|没受伤|没伤着|冇伤|冇事|好彩|没大碍|无大碍",),
    "热线": (r"(?:热线|12345|你们这个电话).{0,8}(?:几点|上班|下班|打不通|怎么|态度)",),
}

@dataclass(frozen=True)
class DangerHit:
    kind: str
    evidence: Evidence


def _compile(table: dict[str, tuple[str, ...]]) -> tuple[tuple[str, tuple[re.Pattern, ...]], ...]:
    return tuple((kind, tuple(re.compile(source, re.IGNORECASE) for source in sources)) for kind, sources in table.items())


_DANGER = _compile(DANGER_PATTERNS)
_CALM = _compile(CALM_PATTERNS)
_HEARD_KIND = {word: kind for kind, words in HEARD_WORDS.items() for word in words}
_HEARD = PhoneticIndex(_HEARD_KIND, allow_one_differing=False)
DANGER_KINDS = tuple(DANGER_PATTERNS)
WEAK_DANGER_KINDS = ("歪斜",)   # a feature of its own, not counted in danger:any / danger:count
CALM_KINDS = tuple(CALM_PATTERNS)


def _negated(text: str, offset: int) -> bool:
    """Whether a negation or a hypothetical (RULED_OUT) closely precedes the cue at offset."""
    before = text[max(0, offset - NEGATION_WINDOW_CHARS - 2):offset]
    return any(word in before for word in RULED_OUT)


def false_danger_spans(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in FALSE_DANGER.finditer(text)]


def in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether [start, end) lies inside one of the spans."""
    return any(low <= start and end <= high for low, high in spans)


def without_false_danger(text: str) -> str:
    """The text without the danger the caller ruled out (a negated cue, its negation with it:
    我检查过了，家里没有燃气味 -> 我检查过了，家里) and without FALSE_DANGER phrases. The model's
    character, sound and embedding views read this: there, 燃气味 is the same n-gram whether or not
    没有 precedes it, and 想吐了 shares 吐了 with a poisoned family, so calm callers were called high."""
    cuts = false_danger_spans(text)
    for _, patterns in _DANGER:
        for pattern in patterns:
            for match in pattern.finditer(text):
                if _negated(text, match.start()):
                    window = text[max(0, match.start() - NEGATION_WINDOW_CHARS - 2):match.start()]
                    start = min(match.start() - len(window) + window.find(word) for word in RULED_OUT if word in window)
                    cuts.append((start, match.end()))
    if not cuts:
        return text
    kept, end = [], 0
    for start, stop in sorted(cuts):
        if start > end:
            kept.append(text[end:start])
        end = max(end, stop)
    return "".join(kept) + text[end:]


def _find(table, text: str, false: list[tuple[int, int]]) -> list[DangerHit]:
    hits = []
    for kind, patterns in table:
        for pattern in patterns:
            match = next((m for m in pattern.finditer(text) if not _negated(text, m.start()) and not in_spans(*m.span(), false)), None)
            if match:
                hits.append(DangerHit(kind, Evidence(match.group(0), "cue", match.start())))
                break
    return hits


def _heard(text: str, found: set[str], false: list[tuple[int, int]]) -> list[DangerHit]:
    hits = []
    for match in _HEARD.find(text):
        kind = _HEARD_KIND[match.name]
        if kind not in found and not _negated(text, match.offset) and not in_spans(match.offset, match.offset + len(match.heard), false):
            found.add(kind)
            hits.append(DangerHit(kind, Evidence(match.heard, "sound", match.offset)))
    return hits


def find_danger(text: str) -> list[DangerHit]:
    """At most one hit per danger kind, the first not negated; written before heard."""
    false = false_danger_spans(text)
    hits = _find(_DANGER, text, false)
    return hits + _heard(text, {hit.kind for hit in hits}, false)


def find_calm(text: str) -> list[DangerHit]:
    return _find(_CALM, text, [])

