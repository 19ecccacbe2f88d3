"""The review workbench (gateway/web) in a real browser: headless Chromium from Debian's package
driven by Playwright, over a real Triton + gateway (conftest) and the web app in its own process.

Screenshots of every page go to build/test-artifacts/web/. The tests run in file order and share
one stack: the upload creates the ticket the later tests look at.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = PROJECT_ROOT / "build" / "test-artifacts" / "web"
SAMPLE_CALL = PROJECT_ROOT / "data" / "calls" / "call_01_E006.flac"
MIC_CALL = PROJECT_ROOT / "data" / "calls" / "call_02_E007.flac"
MAX_UPLOAD_MB = 1.0
OPERATOR = ("wangfang", "operator-pass-1")
SUPERVISOR = ("lijun", "supervisor-pass-2")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: run `make setup` (tools/setup_system.sh installs chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wav_for_fake_microphone(source: Path, out: Path) -> Path:
    """Chromium's fake capture device plays a WAV file: the sample call as 16-bit mono 48 kHz, with a second of silence after it."""
    import wave

    import av
    import numpy as np

    chunks = []
    with av.open(str(source)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    samples = np.concatenate([*chunks, np.zeros(48000, dtype=np.int16)]).astype("<i2")
    with wave.open(str(out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(48000)
        wav.writeframes(samples.tobytes())
    return out


def _ticket_model_loads() -> bool:
    from analysis.model import CURRENT_MODEL, load_model

    path = Path(os.environ.get("HOTLINE_ANALYSIS_MODEL") or CURRENT_MODEL)
    if not path.exists():
        return True  # trained on first use
    try:
        load_model(path)
        return True
    except Exception:  # noqa: BLE001 - any unreadable model
        return False


class Stack:
    def __init__(self, base: str, history: Path, data_dir: Path, process: subprocess.Popen) -> None:
        self.base, self.history, self.data_dir, self.process = base, history, data_dir, process
        self.ticket_url: str | None = None
        self.ticket_id: str | None = None
        self.category: str | None = None

    def ticket_count(self) -> int:
        if not self.history.exists():
            return 0
        with sqlite3.connect(f"file:{self.history}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]

    def stored_audio(self) -> list[str]:
        folder = self.data_dir / "audio"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def stack(triton, model_dir, tmp_path_factory):
    from gateway.web.auth import hash_password

    root = tmp_path_factory.mktemp("web")
    users = root / "users.yaml"
    users.write_text(
        "users:\n"
        f"  - name: {OPERATOR[0]}\n    display_name: 王芳\n    role: operator\n    password_hash: \"{hash_password(OPERATOR[1])}\"\n"
        f"  - name: {SUPERVISOR[0]}\n    display_name: 李军\n    role: supervisor\n    password_hash: \"{hash_password(SUPERVISOR[1])}\"\n",
        encoding="utf-8",
    )
    from gateway.launch.local import GatewayProcess

    # as conftest.running_gateway, with a longer start-up allowance: the CPUs are shared
    gateway = GatewayProcess(model_dir, triton.grpc_url, log_path=root / "gateway.log", extra_args=["--history-db", str(root / "history.sqlite")])
    saved = os.environ.get("HOTLINE_ANALYSIS_MODEL")
    if not _ticket_model_loads():  # a stale build/analysis model (mid-change): the gateway trains its own
        os.environ["HOTLINE_ANALYSIS_MODEL"] = str(root / "ticket_model.joblib")
    try:
        gateway.start(timeout_s=300)
    finally:
        if saved is None:
            os.environ.pop("HOTLINE_ANALYSIS_MODEL", None)
        else:
            os.environ["HOTLINE_ANALYSIS_MODEL"] = saved
    try:
        port = _free_port()
        log = open(root / "web.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.web", "--gateway", gateway.address, "--port", str(port), "--users", str(users),
             "--history-db", str(root / "history.sqlite"), "--data-dir", str(root / "webdata"), "--max-upload-mb", str(MAX_UPLOAD_MB)],
            cwd=PROJECT_ROOT, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)), stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (root / "web.log").read_text(errors="replace")
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "web app did not start"
                time.sleep(0.2)
        try:
            yield Stack(base, root / "history.sqlite", root / "webdata", process)
        finally:
            process.terminate()
            process.wait(10)
            log.close()
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    fake_mic = _wav_for_fake_microphone(MIC_CALL, tmp_path_factory.mktemp("mic") / "call.wav")
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={fake_mic}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, stack):
    # bypass_csp: lets the test's own polling predicates run; the pages' scripts are same-origin files either way
    context = browser.new_context(locale="zh-CN", viewport={"width": 1360, "height": 900}, accept_downloads=True, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(120_000)  # a transcription on a shared CPU
    yield page
    context.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page, base: str, user: tuple[str, str]) -> None:
    page.fill("#username", user[0])
    page.fill("#password", user[1])
    page.click("#login-form button[type=submit]")


# ---------------------------------------------------------------------------------------- tests
def test_login_required_then_login(page, stack):
    page.goto(stack.base + "/tickets")
    assert "/login" in page.url  # tickets only for logged-in users
    assert page.locator("label[for=username]").inner_text() == "用户名"
    shot(page, "01_login")
    login(page, stack.base, (OPERATOR[0], "wrong password"))
    page.wait_for_selector("p.error")
    assert "用户名或密码错误" in page.inner_text("p.error")
    login(page, stack.base, OPERATOR)
    page.wait_for_url("**/tickets")
    assert "王芳" in page.inner_text("header")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["wb_session"]["httpOnly"] and cookies["wb_session"]["sameSite"] == "Lax"
    # a caller without the session cookie gets the login page, never tickets or audio
    with urllib.request.urlopen(urllib.request.Request(stack.base + "/tickets", method="GET")) as reply:
        assert reply.url.endswith("/login?next=/tickets")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stack.base + "/tickets/HL-20261116-00000000/audio")
    assert refused.value.code == 401


def test_upload_by_drag_and_drop_shows_transcript_and_ticket(page, stack):
    page.goto(stack.base + "/upload")
    shot(page, "02_upload")
    before = stack.ticket_count()
    data = base64.b64encode(SAMPLE_CALL.read_bytes()).decode()
    page.evaluate(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "audio/flac" }));
            const zone = document.getElementById("dropzone");
            zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [SAMPLE_CALL.name, data],
    )
    page.wait_for_url("**/tickets/HL-*")
    stack.ticket_url = page.url
    stack.ticket_id = page.url.rsplit("/", 1)[1]
    assert stack.ticket_count() == before + 1
    assert page.locator("#transcript .w").count() > 5
    transcript = "".join(page.locator("#transcript .w").all_inner_texts())
    assert "电梯" in transcript
    assert page.locator("#badge-category").inner_text() == "AI生成"
    assert page.locator(".badge.ai").count() >= 7
    assert page.inner_text("#value-category") in page.locator("#input-category option").all_inner_texts()
    page.wait_for_function("document.getElementById('player').readyState >= 1")
    shot(page, "03_ticket")


def test_click_a_word_seeks_the_audio_there(page, stack):
    page.goto(stack.ticket_url)
    page.wait_for_function("document.getElementById('player').readyState >= 1")
    words = page.locator("#transcript .w")
    count = words.count()
    for index in (count // 2, count - 2, 1):
        word = words.nth(index)
        start = float(word.get_attribute("data-start"))
        word.click()
        page.wait_for_function("document.getElementById('player').seeking === false")
        now = page.evaluate("document.getElementById('player').currentTime")
        assert abs(now - start) < 0.5, (index, start, now)
    # keyboard: Tab reaches the first word of a segment, arrow keys move word by word, Enter plays there
    first = page.locator("#transcript .seg").first.locator(".w").first
    first.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    target = words.nth(2)
    assert page.evaluate("document.activeElement.dataset.start") == target.get_attribute("data-start")
    start = float(target.get_attribute("data-start"))
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('player').seeking === false")
    assert abs(page.evaluate("document.getElementById('player').currentTime") - start) < 0.5
    page.evaluate("document.getElementById('player').pause()")


def test_edit_category_persists_and_is_exported(page, stack, tmp_path):
    page.goto(stack.ticket_url)
    old = page.inner_text("#value-category")
    new = "环境卫生" if old != "环境卫生" else "住房物业"
    page.click("#edit-category")
    page.select_option("#input-category", new)
    page.click(".editor[data-field=category] button[type=submit]")
    page.wait_for_function("document.getElementById('badge-category').textContent === '人工确认'")
    stack.category = new
    page.reload()
    assert page.inner_text("#value-category") == new
    assert page.inner_text("#badge-category") == "人工确认"
    assert OPERATOR[0] in page.inner_text("#ticket-audit")
    shot(page, "04_ticket_corrected")
    out = tmp_path / "corrections.jsonl"
    subprocess.run(
        [sys.executable, "-m", "analysis", "export-corrections", str(out), "--history-db", str(stack.history)],
        cwd=PROJECT_ROOT, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)), check=True, capture_output=True,
    )
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    mine = [r for r in records if r["ticket_id"] == stack.ticket_id and r["field"] == "category"]
    assert mine and mine[-1]["new_value"] == new and mine[-1]["old_value"] == old and mine[-1]["corrected_by"] == OPERATOR[0]


def test_expired_session_goes_to_login_and_keeps_the_edit(page, stack):
    page.goto(stack.ticket_url)
    with sqlite3.connect(stack.data_dir / "state.sqlite") as db:  # the session runs out while the page is open
        db.execute("UPDATE sessions SET expires_at = '2000-01-01T00:00:00'")
    page.click("#edit-summary")
    page.fill("#input-summary", "电梯困人，请尽快派人（人工修改）")
    page.click(".editor[data-field=summary] button[type=submit]")
    page.wait_for_url(lambda url: "/login?next=" in url)
    shot(page, "05_login_after_expiry")
    login(page, stack.base, OPERATOR)
    page.wait_for_url(stack.ticket_url)
    page.wait_for_function("document.getElementById('badge-summary').textContent === '人工确认'")
    assert page.inner_text("#value-summary") == "电梯困人，请尽快派人（人工修改）"
    page.reload()
    assert page.inner_text("#value-summary") == "电梯困人，请尽快派人（人工修改）"


def test_status_review_and_rerecognize(page, stack):
    page.goto(stack.ticket_url)
    for status in ("dispatched", "closed"):
        page.select_option("#status-select", status)
        page.click("#status-form button[type=submit]")
        page.wait_for_function("document.getElementById('notice').textContent.includes('状态已更新')")
        page.evaluate("document.getElementById('notice').textContent = ''")
    assert "办结" in page.inner_text("#status-times")
    page.click("#mark-reviewed")
    page.wait_for_function("document.getElementById('reviewed-info').textContent.includes('核对')")
    page.click(".rerec summary")
    # selecting words fills the range
    words = page.locator("#transcript .w")
    page.evaluate("""() => {
        const words = document.querySelectorAll('#transcript .w');
        const range = document.createRange();
        range.setStartBefore(words[1]);
        range.setEndAfter(words[4]);
        document.getSelection().removeAllRanges();
        document.getSelection().addRange(range);
    }""")
    expected = max(0.0, float(words.nth(1).get_attribute("data-start")) - 0.2)
    page.wait_for_function("document.getElementById('rr-start').value !== '0'")
    assert abs(float(page.input_value("#rr-start")) - expected) < 0.11
    assert float(page.input_value("#rr-end")) > float(words.nth(4).get_attribute("data-end"))
    page.fill("#rr-start", "0")
    page.fill("#rr-end", "5")
    page.fill("#rr-hotwords", "幸福家园")
    page.click("#rerec-form button[type=submit]")
    page.wait_for_function("!document.getElementById('rerec-result').textContent.includes('识别中')")
    assert page.locator("#rerec-result p").count() >= 1, page.inner_text("#rerec-result")
    shot(page, "06_ticket_status_rerecognized")


def test_microphone_recording_becomes_a_ticket(page, stack):
    before = stack.ticket_count()
    page.goto(stack.base + "/upload")
    page.click("#rec-start")
    page.wait_for_function("document.getElementById('rec-stop').disabled === false")
    page.wait_for_timeout(9_000)  # the fake microphone plays the sample call (8 s) in a loop
    shot(page, "07_upload_recording")
    page.click("#rec-stop")
    page.wait_for_url("**/tickets/HL-*")
    assert stack.ticket_count() == before + 1
    assert any(name.endswith(".webm") or name.endswith(".ogg") for name in stack.stored_audio())
    text = "".join(page.locator("#transcript .w").all_inner_texts())
    assert len(text) >= 5, text
    # MediaRecorder's WebM has no duration; the stored copy (OGG) does, so its words seek too
    page.wait_for_function("isFinite(document.getElementById('player').duration) && document.getElementById('player').duration > 5")
    word = page.locator("#transcript .w").nth(page.locator("#transcript .w").count() // 2)
    start = float(word.get_attribute("data-start"))
    word.click()
    page.wait_for_function("document.getElementById('player').seeking === false")
    assert abs(page.evaluate("document.getElementById('player').currentTime") - start) < 0.5
    page.evaluate("document.getElementById('player').pause()")
    shot(page, "08_ticket_from_microphone")


def test_bad_uploads_show_a_message_and_store_nothing(page, stack, tmp_path):
    page.goto(stack.base + "/upload")
    tickets, audio = stack.ticket_count(), stack.stored_audio()
    not_audio = tmp_path / "投诉说明.wav"  # the name says audio, the bytes do not
    not_audio.write_text("这不是录音文件，只是一段文字。" * 20, encoding="utf-8")
    page.set_input_files("#file-input", str(not_audio))
    page.wait_for_function("document.getElementById('upload-message').textContent.length > 0")
    assert "不是支持的录音文件" in page.inner_text("#upload-message")
    shot(page, "09_upload_not_audio")
    broken = tmp_path / "broken.wav"  # a WAV header and garbage: the gateway cannot decode it
    broken.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(3000))
    page.set_input_files("#file-input", str(broken))
    page.wait_for_function("document.getElementById('upload-message').textContent.includes('无法处理')")
    too_big = tmp_path / "long_call.flac"
    too_big.write_bytes(SAMPLE_CALL.read_bytes() * 8)  # over the 1 MB limit of this stack
    page.set_input_files("#file-input", str(too_big))
    page.wait_for_function("document.getElementById('upload-message').textContent.includes('文件太大')")
    shot(page, "10_upload_too_big")
    # the server checks too (a script bypassing the page's check)
    csrf = page.get_attribute("body", "data-csrf")
    reply = page.request.post(stack.base + "/api/upload", headers={"X-CSRF-Token": csrf},
                              multipart={"audio": {"name": "long_call.flac", "mimeType": "audio/flac", "buffer": too_big.read_bytes()}})
    assert reply.status == 413 and "文件太大" in reply.json()["error"]
    no_csrf = page.request.post(stack.base + "/api/upload", multipart={"audio": {"name": "a.flac", "mimeType": "audio/flac", "buffer": SAMPLE_CALL.read_bytes()}})
    assert no_csrf.status == 403
    assert stack.ticket_count() == tickets and stack.stored_audio() == audio


def test_list_filters_and_paging(page, stack):
    page.goto(stack.base + "/tickets")
    assert page.locator("table.list tbody tr").count() >= 2
    shot(page, "11_list")
    page.select_option("#f-category", stack.category)  # set by hand above
    page.click(".filters button[type=submit]")
    page.wait_for_url("**/tickets?*category=*")
    assert stack.ticket_id in page.inner_text("table.list")
    page.fill("#f-q", "不会出现的词语")
    page.click(".filters button[type=submit]")
    assert "没有符合条件的工单" in page.inner_text("table.list")
    page.goto(stack.base + f"/tickets?q={stack.ticket_id}")
    page.click(f"text={stack.ticket_id}")
    page.wait_for_url(stack.ticket_url)


def test_dashboard_ledger_and_audit(page, stack, tmp_path):
    page.goto(stack.base + "/dashboard")
    assert page.locator("table.heat").count() == 1
    assert "部门响应时效 TOP10" in page.inner_text("main")
    assert page.locator("#h-resp ~ table tbody tr").first.inner_text().startswith("1")  # the ticket closed above
    shot(page, "12_dashboard")
    page.goto(stack.base + "/ledger")
    shot(page, "13_ledger")
    with page.expect_download() as download:
        page.click("#ledger-form button[type=submit]")
    path = tmp_path / "ledger.xlsx"
    download.value.save_as(path)
    from openpyxl import load_workbook

    sheet = load_workbook(path).active
    ids = [row[0] for row in sheet.iter_rows(min_row=2, values_only=True)]
    assert stack.ticket_id in ids
    page.goto(stack.base + "/audit")  # operators may not read the audit log
    assert "仅限主管" in page.inner_text("main")
    page.click("header form button[type=submit]")  # log out (a CSRF-checked form)
    page.wait_for_url("**/login")
    login(page, stack.base, SUPERVISOR)
    page.wait_for_url("**/tickets")
    page.goto(stack.base + "/audit")
    log = page.inner_text("table.list")
    for action in ("登录", "上传录音", "修改字段", "更新状态", "重新识别", "下载台账", "上传被拒"):
        assert action in log, action
    shot(page, "14_audit")
