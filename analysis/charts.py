"""PNG charts of the dashboard (matplotlib, Agg backend: no display needed).

Chinese labels need a CJK font. The first installed one of CJK_FONT_NAMES is used
(Debian: `apt-get install fonts-wqy-microhei` or `fonts-noto-cjk`); without one the
charts are still drawn, the labels show as boxes, and `cjk_font()` returns None so the
dashboard can say so.
"""

from __future__ import annotations

import io
from collections import Counter
from datetime import date
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: batch machines have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402

CJK_FONT_NAMES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "AR PL UMing CN",
)
URGENCY_COLORS = {"high": "#d9534f", "medium": "#f0ad4e", "low": "#5cb85c"}
URGENCY_LABELS = {"high": "高", "medium": "中", "low": "低"}
UNKNOWN_DISTRICT = "未知"


def cjk_font() -> str | None:
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONT_NAMES if name in installed), None)


def _setup() -> None:
    font = cjk_font()
    if font:
        plt.rcParams["font.sans-serif"] = [font, "DejaVu Sans"]
        plt.rcParams["font.family"] = "sans-serif"
    plt.rcParams["axes.unicode_minus"] = False
    plt.rcParams["font.size"] = 11


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def heatmap_category_district(rows: Sequence[dict], categories: Sequence[str], districts: Sequence[str]) -> bytes:
    _setup()
    columns = list(districts) + [UNKNOWN_DISTRICT]
    counts = Counter((row["category"], row.get("district") or UNKNOWN_DISTRICT) for row in rows)
    used = [category for category in categories if any(counts[(category, column)] for column in columns)] or list(categories)
    matrix = [[counts[(category, column)] for column in columns] for category in used]
    figure, axes = plt.subplots(figsize=(0.9 * len(columns) + 3.2, 0.42 * len(used) + 1.6))
    image = axes.imshow(matrix, cmap="Reds", aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(used)), used)
    peak = max((max(line) for line in matrix), default=0)
    for y, line in enumerate(matrix):
        for x, value in enumerate(line):
            if value:
                axes.text(x, y, str(value), ha="center", va="center", color="white" if value > peak * 0.6 else "black", fontsize=11)
    axes.set_title("诉求类型 × 区县")
    figure.colorbar(image, ax=axes, shrink=0.8, label="工单数")
    return _png(figure)


def top_departments(rows: Sequence[dict], limit: int = 10) -> bytes:
    _setup()
    counts = Counter(row["department"] for row in rows).most_common(limit)[::-1]
    figure, axes = plt.subplots(figsize=(8, 0.42 * max(1, len(counts)) + 1.4))
    axes.barh([name for name, _ in counts], [value for _, value in counts], color="#337ab7")
    for y, (_, value) in enumerate(counts):
        axes.text(value, y, f" {value}", va="center", fontsize=9)
    axes.set_title(f"责任部门工单量（前 {limit}）")
    axes.set_xlabel("工单数")
    return _png(figure)


def daily_volume(rows: Sequence[dict], days: Sequence[date]) -> bytes:
    _setup()
    figure, axes = plt.subplots(figsize=(8, 3.6))
    bottom = [0] * len(days)
    labels = [f"{day:%m-%d}" for day in days]
    for level in ("high", "medium", "low"):
        values = [sum(1 for row in rows if row["day"] == day and row["urgency"] == level) for day in days]
        axes.bar(labels, values, bottom=bottom, color=URGENCY_COLORS[level], label=URGENCY_LABELS[level])
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        if total:
            axes.text(x, total, str(total), ha="center", va="bottom", fontsize=9)
    axes.set_title("每日来电量（按紧急程度）")
    axes.set_ylabel("工单数")
    axes.legend(title="紧急程度", loc="upper left")
    return _png(figure)


def urgency_mix(rows: Sequence[dict]) -> bytes:
    _setup()
    counts = Counter(row["urgency"] for row in rows)
    levels = [level for level in ("high", "medium", "low") if counts[level]]
    figure, axes = plt.subplots(figsize=(4.2, 4.2))
    if levels:
        axes.pie(
            [counts[level] for level in levels],
            labels=[f"{URGENCY_LABELS[level]} ({counts[level]})" for level in levels],
            colors=[URGENCY_COLORS[level] for level in levels],
            autopct="%1.0f%%",
            startangle=90,
            counterclock=False,
        )
    axes.set_title("紧急程度构成")
    return _png(figure)
