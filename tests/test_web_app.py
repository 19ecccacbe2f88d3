"""The workbench without a browser or an ASR: passwords, users file, upload sniffing, sessions,
CSRF, cookie flags, headers and the ticket list over a synthetic history (FastAPI's TestClient)."""

from __future__ import annotations

import re
import sqlite3

import pytest

from gateway.web.auth import UsersConfigError, authenticate, hash_password, load_users, verify_password
from gateway.web.audio import sniff


def test_passwords_are_scrypt_hashes():
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$") and "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong", stored)
    assert hash_password("correct horse") != stored  # salted
    assert not verify_password("x", "plain-text-password")


def test_users_file_is_checked(tmp_path):
    path = tmp_path / "users.yaml"
    path.write_text("users:\n  - name: a\n    role: boss\n    password_hash: \"scrypt$1$1$1$a$b\"\n", encoding="utf-8")
    with pytest.raises(UsersConfigError, match="role"):
        load_users(path)
    path.write_text("users:\n  - name: a\n    password_hash: secret\n", encoding="utf-8")
    with pytest.raises(UsersConfigError, match="scrypt"):
        load_users(path)
    path.write_text(f"users:\n  - name: a\n    password_hash: \"{hash_password('pw-123456')}\"\n", encoding="utf-8")
    users = load_users(path)
    assert users["a"].role == "operator"
    assert authenticate(users, "a", "pw-123456") is users["a"]
    assert authenticate(users, "a", "nope") is None and authenticate(users, "nobody", "pw-123456") is None


@pytest.mark.parametrize(
    "head,kind",
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "WAV"), (b"fLaC\x00\x00\x00\x22" + bytes(8), "FLAC"), (b"OggS" + bytes(12), "OGG"),
        (b"ID3\x04" + bytes(12), "MP3"), (b"\xff\xfb\x90\x64" + bytes(12), "MP3"), (b"#!AMR\n" + bytes(10), "AMR"),
        (b"\x00\x00\x00\x20ftypM4A " + bytes(4), "M4A"), (b"\x1a\x45\xdf\xa3" + bytes(12), "WebM"),
        (b"%PDF-1.7\n" + bytes(8), None), ("这不是录音".encode("utf-8") + bytes(4), None), (b"short", None),
    ],
)
def test_sniff_by_content(head, kind):
    found = sniff(head)
    assert (found.name if found else None) == kind


@pytest.fixture()
def client(tmp_path):
    from fastapi.testclient import TestClient

    from bench.web_list import make_history
    from gateway.web.app import WebConfig, create_app

    make_history(tmp_path / "history.sqlite", 300)
    users = tmp_path / "users.yaml"
    users.write_text(f"users:\n  - name: op\n    role: operator\n    password_hash: \"{hash_password('op-pass-123')}\"\n", encoding="utf-8")
    app = create_app(WebConfig(gateway="127.0.0.1:9", users_file=users, history_db=tmp_path / "history.sqlite", data_dir=tmp_path / "web", max_upload_bytes=4096))
    with TestClient(app) as test_client:
        test_client.tmp = tmp_path
        yield test_client


def _login(client, password="op-pass-123"):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": "op", "password": password, "csrf_token": token, "next": "/tickets"}, follow_redirects=False)


def test_login_sets_a_hardened_session_cookie(client):
    assert client.get("/tickets", follow_redirects=False).headers["location"] == "/login?next=/tickets"
    assert "用户名或密码错误" in client.get(_login(client, "bad").headers["location"]).text
    reply = _login(client)
    assert reply.status_code == 303 and reply.headers["location"] == "/tickets"
    cookie = reply.headers["set-cookie"]
    assert "wb_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    page = client.get("/tickets")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"


def test_login_form_needs_its_csrf_token(client):
    client.get("/login")
    reply = client.post("/login", data={"username": "op", "password": "op-pass-123", "csrf_token": "forged"}, follow_redirects=False)
    assert "/login" in reply.headers["location"] and "wb_session" not in reply.headers.get("set-cookie", "")


def test_api_needs_csrf_and_a_live_session(client):
    _login(client)
    csrf = re.search(r'data-csrf="([^"]+)"', client.get("/tickets").text).group(1)
    ticket_id = re.search(r'href="/tickets/(HL-[^"]+)"', client.get("/tickets").text).group(1)
    assert client.post(f"/api/tickets/{ticket_id}/reviewed", json={}).status_code == 403
    assert client.post(f"/api/tickets/{ticket_id}/reviewed", json={}, headers={"X-CSRF-Token": csrf}).json()["ok"]
    with sqlite3.connect(client.tmp / "web" / "state.sqlite") as db:
        db.execute("UPDATE sessions SET expires_at = '2000-01-01T00:00:00'")
    expired = client.post(f"/api/tickets/{ticket_id}/correct", json={"field": "summary", "value": "x"},
                          headers={"X-CSRF-Token": csrf, "X-Page": f"/tickets/{ticket_id}"})
    assert expired.status_code == 401 and expired.json()["login"] == f"/login?next=/tickets/{ticket_id}"


def test_bad_uploads_are_refused_before_the_gateway(client):
    _login(client)
    csrf = re.search(r'data-csrf="([^"]+)"', client.get("/upload").text).group(1)
    headers = {"X-CSRF-Token": csrf}
    text = client.post("/api/upload", files={"audio": ("call.wav", "不是录音".encode() * 10, "audio/wav")}, headers=headers)
    assert text.status_code == 415 and "不是支持的录音文件" in text.json()["error"]
    big = client.post("/api/upload", files={"audio": ("call.flac", b"fLaC" + bytes(5000), "audio/flac")}, headers=headers)
    assert big.status_code == 413 and "文件太大" in big.json()["error"]
    assert not any((client.tmp / "web" / "audio").iterdir())


def test_list_filters_and_keyset_paging(client):
    _login(client)
    first = client.get("/tickets").text
    ids = re.findall(r'href="/tickets/(HL-[^"]+)"', first)
    assert len(ids) == 50
    after = re.search(r'href="(/tickets\?after=[^"]+)"', first).group(1).replace("&amp;", "&")
    second = re.findall(r'href="/tickets/(HL-[^"]+)"', client.get(after).text)
    assert len(second) == 50 and not set(ids) & set(second)
    high = client.get("/tickets", params={"urgency": "high"}).text
    assert high.count('class="urg urg-high"') == high.count('class="urg urg-')
    assert "没有符合条件的工单" in client.get("/tickets", params={"q": "不存在的词语"}).text
    one = client.get("/tickets", params={"q": ids[3]}).text
    assert re.findall(r'href="/tickets/(HL-[^"]+)"', one) == [ids[3]]


def test_pages_render(client):
    _login(client)
    ticket_id = re.search(r'href="/tickets/(HL-[^"]+)"', client.get("/tickets").text).group(1)
    page = client.get(f"/tickets/{ticket_id}").text
    assert "AI生成" in page and 'id="edit-category"' in page
    assert "部门响应时效 TOP10" in client.get("/dashboard").text
    assert client.get("/audit").status_code == 403  # operators do not read the audit log
    ledger = client.get("/ledger.xlsx", params={"from": "2000-01-01", "to": "2100-01-01"})
    assert ledger.status_code == 200 and ledger.content[:2] == b"PK"  # an xlsx (zip)
    assert "请选择有效的起止日期" in client.get("/ledger.xlsx", params={"from": "2026-02-01", "to": "2026-01-01"}).text


def test_workbench_stays_out_of_the_asr_and_the_service():
    """The workbench reaches recognition and corrections only over gRPC (README architecture table)."""
    from tests.test_layering import GRAPH, violations

    assert any(name.startswith("gateway.web") for name in GRAPH)
    assert violations("gateway.web", ("gateway.asr", "gateway.service", "gateway.clients", "gateway.launch", "export", "model_repository")) == []


def _encode(path, fmt: str, codec: str, rate: int, seconds: float = 2.0) -> bytes:
    import av
    import numpy as np

    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        step = 960 if codec == "libopus" else 160
        t = np.arange(int(rate * seconds)) / rate
        pcm = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
        for i in range(0, len(pcm) - step + 1, step):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + step], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize("fmt,codec,rate", [("webm", "libopus", 48000), ("amr", "libopencore_amrnb", 8000)])
def test_recordings_browsers_cannot_seek_are_stored_as_ogg(tmp_path, fmt, codec, rate):
    import io

    import av

    from gateway.web.audio import playable_copy

    data = _encode(tmp_path / f"call.{fmt}", fmt, codec, rate)
    converted, kind = playable_copy(data, sniff(data[:64]))
    assert kind.name == "OGG" and converted[:4] == b"OggS"
    with av.open(io.BytesIO(converted)) as container:
        assert abs(container.duration / 1e6 - 2.0) < 0.2  # a duration the player can seek in
    flac = (tmp_path / "x.flac")
    flac.write_bytes(b"fLaC" + bytes(40))
    assert playable_copy(flac.read_bytes(), sniff(flac.read_bytes()[:64]))[1].name == "FLAC"  # kept as it came


# -- the list's own index (gateway.web.list_index) ------------------------------------------------
def _expected(history, keep) -> list[str]:
    """Every ticket id the list should show for a filter, in its order, straight from the history."""
    with sqlite3.connect(history) as db:
        rows = db.execute(
            "SELECT ticket_id, received_at, category, urgency, COALESCE(district, ''), department, duplicate_of, "
            "json_extract(ticket_json, '$.needs_review'), transcript FROM tickets ORDER BY received_at DESC, ticket_id DESC"
        ).fetchall()
    names = ("ticket_id", "received_at", "category", "urgency", "district", "department", "duplicate_of", "needs_review", "transcript")
    return [row[0] for row in rows if keep(dict(zip(names, row)))]


def _listed(reader, filters) -> list[str]:
    """Every ticket id of every page, following the keyset cursor."""
    ids, cursor = [], None
    while True:
        page = reader.list(filters, cursor, page_size=7)
        ids += [row["ticket_id"] for row in page.rows]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


@pytest.fixture()
def reader(tmp_path):
    from bench.web_list import make_history
    from gateway.web.history import HistoryReader

    make_history(tmp_path / "history.sqlite", 400)
    history = HistoryReader(tmp_path / "history.sqlite", tmp_path / "web" / "search.sqlite")
    yield history
    history.close()


def test_every_filter_and_combination_matches_the_history(reader):
    from datetime import date, timedelta

    from gateway.web.history import ListFilters

    week = date.today() - timedelta(days=60)
    cases = [
        (ListFilters(category="环境卫生"), lambda t: t["category"] == "环境卫生"),
        (ListFilters(department="江南区城市管理局"), lambda t: t["department"] == "江南区城市管理局"),
        (ListFilters(category="环境卫生", district="江南区"), lambda t: t["category"] == "环境卫生" and t["district"] == "江南区"),
        (ListFilters(urgency="high", date_from=week), lambda t: t["urgency"] == "high" and t["received_at"] >= week.isoformat()),
        (ListFilters(needs_review=True, category="噪音扰民"), lambda t: t["needs_review"] == 1 and t["category"] == "噪音扰民"),
        (ListFilters(duplicate=True, district="江北区"), lambda t: bool(t["duplicate_of"]) and t["district"] == "江北区"),
        (ListFilters(q="井盖", urgency="medium"), lambda t: "井盖" in t["transcript"] and t["urgency"] == "medium"),
        (ListFilters(category="环境卫生", urgency="high", district="江南区"),
         lambda t: (t["category"], t["urgency"], t["district"]) == ("环境卫生", "high", "江南区")),
    ]
    for filters, keep in cases:
        expected = _expected(reader.path, keep)
        assert expected, filters  # each case selects something in 400 tickets
        assert _listed(reader, filters) == expected, filters
    with sqlite3.connect(reader.path) as db:  # the ticket page's "later duplicates of this one"
        original, = db.execute("SELECT duplicate_of FROM tickets WHERE duplicate_of IS NOT NULL LIMIT 1").fetchone()
        later = [row[0] for row in db.execute("SELECT ticket_id FROM tickets WHERE duplicate_of = ? ORDER BY received_at", (original,))]
    assert [row["ticket_id"] for row in reader.duplicates_of(original)] == later


def test_the_index_follows_new_corrected_and_reanalysed_tickets(reader):
    import dataclasses
    from datetime import datetime

    from analysis import HistoryStore
    from gateway.web.history import ListFilters

    assert len(_listed(reader, ListFilters())) == 400  # built
    store = HistoryStore(reader.path)
    try:
        first = store.get(_expected(reader.path, lambda t: t["category"] != "教育服务")[0])
        store.correct(first.ticket_id, "category", "教育服务", by="王芳")  # what the gateway's CorrectTicket does
        new = dataclasses.replace(first, ticket_id="HL-new-ticket", received_at=datetime.now().replace(microsecond=0), transcript="新来电井盖丢了")
        store.add(new, None)
        assert first.ticket_id in _listed(reader, ListFilters(category="教育服务"))
        assert _listed(reader, ListFilters(q="新来电井盖"))[0] == "HL-new-ticket"
        # a batch re-run analyses a ticket again in place: same id and rowid, no correction
        again = store.get(_expected(reader.path, lambda t: t["urgency"] == "high")[0])
        store.add(dataclasses.replace(again, urgency="low"), None)
    finally:
        store.close()
    shown = _listed(reader, ListFilters(urgency="high"))
    assert again.ticket_id not in shown  # every row shown is checked against the history
    assert again.ticket_id in _listed(reader, ListFilters(urgency="low"))  # and re-indexed
    assert shown == _expected(reader.path, lambda t: t["urgency"] == "high")


def test_an_index_of_an_earlier_version_is_rebuilt(tmp_path, monkeypatch):
    from bench.web_list import make_history
    from gateway.web import list_index
    from gateway.web.history import HistoryReader, ListFilters

    monkeypatch.setattr(list_index, "BATCH", 8)  # a first build in batches, the indexes made at the end
    make_history(tmp_path / "history.sqlite", 30)
    old = tmp_path / "search.sqlite"
    with sqlite3.connect(old) as db:  # the transcript-only copy of the first workbench
        db.execute("CREATE TABLE search (rid INTEGER PRIMARY KEY, ticket_id TEXT NOT NULL, transcript TEXT NOT NULL)")
        db.execute("INSERT INTO search VALUES (1, 'HL-stale', 'x')")
    reader = HistoryReader(tmp_path / "history.sqlite", old)
    try:
        assert len(_listed(reader, ListFilters())) == 30
    finally:
        reader.close()
    with sqlite3.connect(old) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "search" not in names and {"rows_category", "rows_district", "rows_review", "rows_duplicate_of"} <= names
    reopened = HistoryReader(tmp_path / "history.sqlite", old)
    try:
        assert _listed(reopened, ListFilters(urgency="low")) == _expected(reopened.path, lambda t: t["urgency"] == "low")
    finally:
        reopened.close()
