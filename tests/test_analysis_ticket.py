"""analyze_ticket over text: category, urgency, place, department, summary, bad input."""

from __future__ import annotations

import json
import time

import pytest

from analysis import Ticket, analyze_ticket, default_analyzer

WHEN = "2026-11-16T09:30:00"


@pytest.fixture(scope="module")
def analyzer():
    return default_analyzer()


def analyse(analyzer, text, **metadata):
    return analyze_ticket(text, {"received_at": WHEN, **metadata}, analyzer=analyzer)


def test_gas_leak_is_high_urgency_for_the_gas_company(analyzer):
    ticket = analyse(analyzer, "我在阳光花园3栋，楼道里一股很重的煤气味，好像是哪家燃气漏了，你们快派人来")
    assert ticket.category == "供水供电供气"
    assert ticket.urgency == "high"
    assert any(reason.startswith("安全风险") for reason in ticket.urgency_reasons)
    assert ticket.department == "滨江燃气集团"
    assert ticket.place["district"] == "江南区" and ticket.place["address"] == "阳光花园3栋"
    assert {item["text"] for item in ticket.category_evidence} >= {"煤气", "燃气"}


def test_streetlight_from_traditional_asr_output(analyzer):
    ticket = analyse(analyzer, "你好，我是老城區幸福路十二號的，樓下路燈壞了三天了，麻煩儘快來修")
    assert ticket.category == "市政设施维修"
    assert ticket.urgency == "medium"
    assert ticket.place["address"] == "幸福路12号"
    assert ticket.department == "老城区住房和城乡建设局"
    assert "路灯" in ticket.summary and ticket.summary.startswith("老城区幸福路12号")
    assert ticket.machine_generated is True


@pytest.mark.parametrize(
    ("text", "category", "department"),
    [
        ("解放路那个工地半夜十二点还在打桩，吵得睡不着", "噪音扰民", "江南区住房和城乡建设局"),
        ("鼓楼广场跳广场舞的音响太大声了", "噪音扰民", "滨江市公安局老城区分局"),
        ("公司三个月没发工资了，老板人也找不到，我在高新区上班", "劳动保障", "高新区人力资源和社会保障局"),
        ("在江北区建设路的超市买的牛奶过期了，超市不给退", "市场监管", "江北区市场监督管理局"),
        ("碧水湾小区停电五个小时了", "供水供电供气", "国网滨江供电公司"),
        ("我想问一下你们热线几点上班", "其他", "滨江市12345热线办公室"),
    ],
)
def test_category_and_responsibility_matrix(analyzer, text, category, department):
    ticket = analyse(analyzer, text)
    assert (ticket.category, ticket.department) == (category, department)


def test_district_override_in_the_matrix(analyzer):
    ticket = analyse(analyzer, "云谷小区门口的路灯坏了一个礼拜了")
    assert ticket.place["district"] == "高新区" and ticket.place["district_source"] == "gazetteer"
    assert ticket.department == "高新区建设管理局"


def test_negated_safety_cue_does_not_count(analyzer):
    ticket = analyse(analyzer, "我检查过了，家里没有燃气味，就是燃气费不知道怎么交")
    assert ticket.urgency != "high"


def test_a_water_heater_that_will_not_light_is_a_repair_not_a_fire(analyzer):
    ticket = analyse(analyzer, "我家燃气热水器打不着火，想找师傅来修一下")
    assert ticket.urgency != "high", (ticket.urgency_probabilities, ticket.urgency_reasons)
    assert not any("着火" in reason for reason in ticket.urgency_reasons)


def test_a_fire_the_caller_only_imagines_is_not_a_fire(analyzer):
    ticket = analyse(analyzer, "我们楼下的消防通道被私家车堵死了，万一着火消防车根本进不来")
    assert ticket.urgency != "high", (ticket.urgency_probabilities, ticket.urgency_reasons)
    assert not any("着火" in reason for reason in ticket.urgency_reasons)


def test_repeat_report_cues(analyzer):
    ticket = analyse(analyzer, "这个井盖松动我已经报修三次了，两周了还没人管，再不修我就投诉")
    assert ticket.urgency in ("medium", "high")
    reasons = " ".join(ticket.urgency_reasons)
    assert "反复报修" in reasons and "投诉升级" in reasons


def test_empty_transcript(analyzer):
    ticket = analyse(analyzer, "")
    assert ticket.category == "其他" and ticket.urgency == "low" and ticket.summary == ""
    assert "empty_transcript" in ticket.flags
    assert ticket.embedding_model is None


def test_english_and_mixed_text(analyzer):
    english = analyse(analyzer, "The streetlight in front of my apartment has been broken for a week, please fix it")
    assert "not_chinese" in english.flags
    # Another language: 其他 for a person to read; the model's guess is in the review reasons.
    assert english.category == "其他" and english.needs_review
    assert any("市政设施维修" in reason for reason in english.review_reasons)
    mixed = analyse(analyzer, "我想反映一下那个bus 36路，司机老是不按站停车，passengers都很有意见")
    assert "mixed_language" in mixed.flags
    assert mixed.category == "交通出行"


def test_unknown_district_goes_to_city_level(analyzer):
    ticket = analyse(analyzer, "我是朝阳区的，我们小区门口的井盖松了，车一压就哐当响")
    assert ticket.place["district"] is None and ticket.place["district_unknown"] == "朝阳区"
    assert "district_unknown" in ticket.flags
    assert ticket.department == "滨江市住房和城乡建设局"
    assert "区县不明" in ticket.department_reason


def test_100_kb_of_text_is_truncated_quickly(analyzer):
    text = "楼下工地天天晚上施工打桩，吵得睡不着。" * 6000  # about 100 KB of UTF-8
    started = time.perf_counter()
    ticket = analyse(analyzer, text)
    assert time.perf_counter() - started < 5.0
    assert "truncated" in ticket.flags
    assert len(ticket.text) == analyzer.config.defaults.text.max_chars
    assert ticket.category == "噪音扰民"
    assert len(ticket.summary) <= analyzer.config.defaults.text.summary_max_chars


def test_segments_give_key_phrase_times(analyzer):
    ticket = analyze_ticket(
        None,
        {"received_at": WHEN, "file": "call.flac"},
        segments=[
            {"start_s": 0.0, "end_s": 3.0, "text": "你好，我是江北区幸福家园的"},
            {"start_s": 3.0, "end_s": 7.5, "text": "我们小区从昨天晚上就停水了"},
            {"start_s": 7.5, "end_s": 10.0, "text": "请马上派人来看看"},
        ],
        analyzer=analyzer,
    )
    times = {item["text"]: item["start_s"] for item in ticket.key_phrases()}
    assert 3.0 <= times["停水"] < 7.5 and 7.5 <= times["马上"] < 10.0  # interpolated within the segment
    assert ticket.metadata == {"file": "call.flac"}


def test_ticket_round_trips_through_json(analyzer):
    ticket = analyse(analyzer, "幸福家园5栋的电梯坏了，有人被困在里面", caller="138****0000")
    data = json.loads(json.dumps(ticket.to_dict(), ensure_ascii=False))
    assert data["machine_generated"] is True and data["metadata"]["caller"] == "138****0000"
    assert Ticket.from_dict(data).to_dict() == ticket.to_dict()


def test_bad_received_at_is_a_clear_error(analyzer):
    from analysis.ticket import TicketMetadataError

    with pytest.raises(TicketMetadataError, match="received_at"):
        analyze_ticket("路灯坏了", {"received_at": "yesterday"}, analyzer=analyzer)
