"""Load time of the workbench's ticket list with a large history (default 100,000 tickets).

    python -m bench.web_list [--tickets 100000] [--db build/bench/web_history.sqlite] [--browser]

Fills a history store (analysis/'s schema, synthetic tickets spread over a year), starts the web
app on it (no gateway needed for the list) and times GET /tickets: the first page, a deep page
(following "下一页" 20 times), each filter alone, text searches, combined filters, a deep page of a
rare combination, and one ticket's page (it lists the ticket's later duplicates). With
--browser it also times the page in headless Chromium (navigation to load event).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from http.cookiejar import CookieJar
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

PHRASES = ["路灯坏了", "小区门口垃圾没人清", "楼上装修噪音太大", "自来水发黄", "公交车不按站停", "孩子入学问题",
           "医院排队太久", "物业不修电梯", "拖欠工资", "超市卖过期食品", "井盖丢了很危险", "停电一整天"]


def make_history(path: Path, count: int, *, seed: int = 7, days: int = 365) -> None:
    """A history store (the real schema, via analysis.HistoryStore) with `count` synthetic tickets."""
    from analysis import HistoryStore, Ticket, load_config
    from analysis.duplicates import issue_keys_of, place_keys_of

    config = load_config()
    categories, districts = config.taxonomy.names, config.gazetteer.district_names
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    HistoryStore(path).close()  # schema, application id
    rng = random.Random(seed)
    end = datetime.now().replace(microsecond=0)
    rows = []
    for index in range(count):
        received = end - timedelta(seconds=rng.randrange(days * 86400))
        category, district = rng.choice(categories), rng.choice(districts)
        urgency = rng.choices(("high", "medium", "low"), (1, 3, 6))[0]
        text = f"{district}{rng.choice(PHRASES)}，第{index}号来电"
        department, reason = config.matrix.assign(category, district, text)
        ticket = Ticket(
            ticket_id=f"HL-{received:%Y%m%d}-{index:08x}", received_at=received, transcript=text, text=text,
            category=category, category_confidence=rng.random(), category_evidence=(), urgency=urgency, urgency_score=rng.random(),
            urgency_reasons=(), urgency_evidence=(), place={"district": district, "address": f"{district}幸福路{index % 300}号"},
            department=department, department_reason=reason, summary=text[:30],
            duplicate_of=f"HL-{received:%Y%m%d}-{max(0, index - 1):08x}" if index and rng.random() < 0.05 else None,
            needs_review=rng.random() < 0.2,
        )
        rows.append((ticket.ticket_id, ticket.received_at.isoformat(), category, urgency, department, district, None,
                     json.dumps(list(place_keys_of(ticket.place)), ensure_ascii=False), json.dumps(list(issue_keys_of(())), ensure_ascii=False),
                     ticket.duplicate_of, text, json.dumps(ticket.to_dict(), ensure_ascii=False), None, None, end.isoformat()))
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_web(history: Path, data_dir: Path, users: Path, port: int, gateway: str = "127.0.0.1:1") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.web", "--gateway", gateway, "--port", str(port), "--users", str(users),
         "--history-db", str(history), "--data-dir", str(data_dir), "--log-level", "warning"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"web app exited: {process.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("web app did not start")


def login(base: str, name: str, password: str) -> urllib.request.OpenerDirector:
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{base}/login").read().decode()
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    data = urllib.parse.urlencode({"username": name, "password": password, "csrf_token": token, "next": "/tickets"}).encode()
    opener.open(f"{base}/login", data=data).read()
    return opener


def timed(opener, url: str, repeat: int = 5) -> tuple[float, str]:
    times, body = [], ""
    for _ in range(repeat):
        started = time.perf_counter()
        body = opener.open(url).read().decode()
        times.append(time.perf_counter() - started)
    return statistics.median(times), body


TODAY = datetime.now().date()
LAST_7_DAYS = {"from": (TODAY - timedelta(days=7)).isoformat(), "to": TODAY.isoformat()}
RARE = {"category": "环境卫生", "urgency": "high", "district": "江南区"}
CASES = (  # (label, query of GET /tickets)
    ("category filter", {"category": "噪音扰民"}),
    ("urgency=high", {"urgency": "high"}),
    ("district filter", {"district": "江南区"}),
    ("department filter", {"department": "江南区城市管理局"}),
    ("needs review", {"needs_review": "1"}),
    ("duplicates", {"duplicate": "1"}),
    ("last 7 days", LAST_7_DAYS),
    ("text search 幸福路12号", {"q": "幸福路12号"}),
    ("text search, no hit", {"q": "不存在的词语"}),
    ("text search 井盖丢了 (1 in 12)", {"q": "井盖丢了"}),
    ("category+district", {"category": "环境卫生", "district": "江南区"}),
    ("urgency=high + last 7 days", {"urgency": "high", **LAST_7_DAYS}),
    ("needs review + category", {"needs_review": "1", "category": "环境卫生"}),
    ("duplicates + district", {"duplicate": "1", "district": "江南区"}),
    ("district + department", {"district": "江南区", "department": "江南区城市管理局"}),
    ("text search + district", {"q": "井盖丢了", "district": "江南区"}),
    ("text search + category+urgency", {"q": "井盖丢了", "category": "环境卫生", "urgency": "high"}),
    ("category+urgency+district", RARE),
    ("needs review+category+district+7 days", {"needs_review": "1", "category": "环境卫生", "district": "江南区", **LAST_7_DAYS}),
)


def next_pages(opener, base: str, url: str, pages: int) -> str:
    """The URL of the page `pages` clicks on "下一页" after `url` (or the last one there is)."""
    for _ in range(pages):
        body = opener.open(url).read().decode()
        marker = 'href="/tickets?'
        nexts = [part.split('"', 1)[0] for part in body.split(marker)[1:] if "after=" in part.split('"', 1)[0]]
        if not nexts:
            break
        url = base + "/tickets?" + nexts[-1].replace("&amp;", "&")
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=100_000)
    parser.add_argument("--db", type=Path, default=PROJECT_ROOT / "build" / "bench" / "web_history.sqlite")
    parser.add_argument("--reuse", action="store_true", help="keep an existing --db of the right size")
    parser.add_argument("--browser", action="store_true", help="also time the page in headless Chromium (/usr/bin/chromium)")
    args = parser.parse_args(argv)
    from gateway.web.auth import hash_password

    reuse = False
    if args.reuse and args.db.exists():
        with sqlite3.connect(args.db) as db:
            reuse = db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0] == args.tickets
    if not reuse:
        started = time.perf_counter()
        make_history(args.db, args.tickets)
        print(f"history with {args.tickets:,} tickets written in {time.perf_counter() - started:.1f} s: {args.db}")
    with tempfile.TemporaryDirectory() as folder:
        users = Path(folder) / "users.yaml"
        users.write_text(f"users:\n  - name: bench\n    role: operator\n    password_hash: \"{hash_password('bench-password')}\"\n", encoding="utf-8")
        port = free_port()
        process = start_web(args.db, Path(folder) / "web", users, port)
        try:
            base = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            opener = login(base, "bench", "bench-password")  # lands on the list: the first one after a start
            results = [("login + first list after start*", time.perf_counter() - started)]
            first, body_first = timed(opener, f"{base}/tickets")
            rows = body_first.count('<a href="/tickets/HL-')
            assert rows == 50, f"the first page shows {rows} tickets, not 50 (login failed?)"
            results.append(("first page (50 of all)", first))
            results.append(("page 21 (keyset cursor)", timed(opener, next_pages(opener, base, f"{base}/tickets", 20))[0]))
            for label, query in CASES:
                results.append((label, timed(opener, f"{base}/tickets?{urllib.parse.urlencode(query)}")[0]))
            deep = next_pages(opener, base, f"{base}/tickets?{urllib.parse.urlencode(RARE)}", 5)
            results.append(("page 6 of category+urgency+district", timed(opener, deep)[0]))
            ticket_id = body_first.split('<a href="/tickets/', 1)[1].split('"', 1)[0]
            results.append(("one ticket's page", timed(opener, f"{base}/tickets/{ticket_id}")[0]))
            print(f"\nGET /tickets with {args.tickets:,} tickets (median of 5, server + transfer, this machine):")
            for label, seconds in results:
                print(f"  {label:<40} {seconds * 1000:8.1f} ms")
            print("  * includes the scrypt check of the password and building the workbench's list index (gateway.web.list_index)")
            if args.browser:
                from playwright.sync_api import sync_playwright

                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                    page = browser.new_page()
                    page.goto(f"{base}/login")
                    page.fill("#username", "bench")
                    page.fill("#password", "bench-password")
                    page.click("button[type=submit]")
                    page.wait_for_url("**/tickets")
                    loads = []
                    for _ in range(5):
                        page.goto(f"{base}/tickets")
                        loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
                    print(f"  browser: navigation to load event  {statistics.median(loads):8.1f} ms (headless Chromium)")
                    browser.close()
        finally:
            process.terminate()
            process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
