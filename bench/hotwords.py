"""Hotword biasing on the real decoding path: term recall, CER, false insertions, overhead.

    python -m bench.hotwords [--model-dir build/models/whisper-base] [--precision fp32] [--boost 3.5 2.5]

Starts a local Triton (rendered repository of the exported model) and decodes in-process
with :meth:`gateway.asr.transcriber.Transcriber.decode_audio` (the gateway's own window decode:
features, Triton encoder, the stateful Triton decoder, ``beam_search`` with its bonus cap,
the token limit per second of audio and the loop fallback) with and without a
:class:`gateway.asr.hotwords.HotwordScorer` (the same scorer the gRPC gateway builds).

- hotword set: ``data/hotwords`` (``tools/make_hotword_set.py``): clips with rare place and
  department names; hotword list = ``terms.txt`` (spoken) + ``distractors.txt`` (never spoken);
- general set: speech the list was not made for: the 20 demo calls (``data/calls``, a
  fictional city's streets and departments) and the zh sample clips (pytest-audioeval);
- conditions: no hotwords; the bench list at each ``--boost``, capped (the default
  ``DecodingOptions.max_biased_logprob=0``) and, for the main boost, uncapped (how biasing
  behaved before the cap); a 10,000-phrase list; and an *unrelated* list, the 103 Beijing
  names of ``config/hotwords.example`` (capped and uncapped): what a deployment's server list
  does to calls that mention none of its names;
- term recall: spoken terms found in the hypothesis (simplified Chinese, no punctuation);
- CER: on the hotword clips and on the general set (does biasing hurt other speech?);
- false insertions: terms of the condition's list that are not in a clip's reference but
  appear in its hypothesis (distractors; all list terms; on the general set);
- overhead: time inside the scorer per decoder step against the decoder step itself, for
  the bench list and for a 10,000-phrase list; graph build time for 10,000 phrases.

Writes build/bench/hotwords.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.asr.audio import decode_audio
from gateway.asr.decoding import DecodingOptions
from gateway.asr.hotwords import ContextGraph, HotwordOptions, HotwordScorer, load_hotword_file, parse_hotwords
from gateway.asr.transcriber import Transcriber, TranscribeOptions
from gateway.asr.triton_client import TritonAsrClient
from gateway.launch.triton_process import TritonProcess
from model_repository.render import render_repository
from tests.conftest import cer, normalize_for_cer, sample_clips

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA = PROJECT_ROOT / "data" / "hotwords"
EXAMPLE_LISTS = PROJECT_ROOT / "config" / "hotwords.example"


class TimedSession:
    """Decoder session proxy that times each step."""

    def __init__(self, session) -> None:
        self.session = session
        self.step_s: list[float] = []

    async def step(self, input_ids, parent_beams, top_k, extra_ids):
        t0 = time.perf_counter()
        out = await self.session.step(input_ids, parent_beams, top_k, extra_ids)
        self.step_s.append(time.perf_counter() - t0)
        return out

    async def close(self) -> None:
        await self.session.close()


class TimedScorer:
    """TokenScorer proxy that adds up the time spent inside the scorer."""

    def __init__(self, scorer: HotwordScorer) -> None:
        self.scorer = scorer
        self.seconds = 0.0

    def _timed(self, method, *args):
        t0 = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def initial_state(self):
        return self.scorer.initial_state()

    def extra_ids(self, state):
        return self._timed(self.scorer.extra_ids, state)

    def advance(self, state, token_id):
        return self._timed(self.scorer.advance, state, token_id)

    def finish(self, state):
        return self._timed(self.scorer.finish, state)


@dataclass
class Decoded:
    text: str
    seconds: float
    steps: int
    step_s: list[float] = field(default_factory=list)
    scorer_s: float = 0.0
    fallback: bool = False  # the biased decode looped and was redone without hotwords


@dataclass(frozen=True)
class Condition:
    scorer: HotwordScorer | None
    capped: bool = True  # DecodingOptions.max_biased_logprob = 0 (default) or None
    terms: tuple[str, ...] = ()  # the list's phrases (insertions on the general set)


class TimedClient:
    """TritonAsrClient proxy whose decoder sessions time their steps (into ``sessions``)."""

    def __init__(self, client: TritonAsrClient) -> None:
        self.client = client
        self.sessions: list[TimedSession] = []

    def decoder_session(self, *args, **kwargs):
        session = TimedSession(self.client.decoder_session(*args, **kwargs))
        self.sessions.append(session)
        return session

    def __getattr__(self, name):
        return getattr(self.client, name)


async def decode(transcriber: Transcriber, audio: np.ndarray, beam_size: int, condition: Condition) -> Decoded:
    """One <= 30 s clip through the gateway's own window decode (Transcriber.decode_audio:
    token limit per second of audio, bonus cap, loop fallback), language zh, no VAD."""
    timed_client: TimedClient = transcriber.client
    timed_client.sessions.clear()
    timed = TimedScorer(condition.scorer) if condition.scorer is not None else None
    cap = DecodingOptions().max_biased_logprob if condition.capped else None
    options = TranscribeOptions(language="zh", beam_size=beam_size, vad=None, scorer=timed, max_biased_logprob=cap)
    t0 = time.perf_counter()
    chunk = await transcriber.decode_audio(audio, options)
    seconds = time.perf_counter() - t0
    text = "".join(s.text for s in chunk.segments).strip()
    step_s = [t for session in timed_client.sessions for t in session.step_s]
    fallback = len(timed_client.sessions) > 1  # decoded again without hotwords (a loop)
    return Decoded(text, seconds, len(step_s), step_s, timed.seconds if timed else 0.0, fallback)


def load_set() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["audio_array"] = decode_audio((DATA / row["audio"]).read_bytes())
    return rows


def synthetic_phrases(n: int, seed: int = 0) -> list[str]:
    """n distinct fake place names shaped like real ones: a 2-3 character body + a suffix.

    (An earlier generator drew bodies from the suffix characters too, so that almost any run
    of 路/东/北... was a listed prefix; at boost 3.5 that adversarial list made 2 of 42 clips
    hallucinate chains of listed names. Real lists are not that dense.)"""
    rng = random.Random(seed)
    body = "安平和兴华新建民光明长春永定丰盛福寿康宁嘉禾瑞祥泰德顺利汇通锦绣翠柳桃杏梅松柏枫榆槐芳园林清泉溪雅静"
    suffixes = ["路", "街", "桥", "庄", "村", "园", "里", "营", "大街", "胡同", "小区", "街道", "社区", "家园"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(body) for _ in range(rng.randint(2, 3))) + rng.choice(suffixes))
    return sorted(out)


def load_general_set() -> list[dict]:
    """Speech the bench list was not made for: the demo calls and the zh sample clips."""
    calls = PROJECT_ROOT / "data" / "calls"
    rows = []
    for line in (calls / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            audio = decode_audio((calls / entry["file"]).read_bytes())
            rows.append({"audio_array": audio, "text": entry["text"], "terms": [], "name": entry["file"]})
    for clip in sample_clips():
        if clip.language == "zh":
            rows.append({"audio_array": decode_audio(clip.path.read_bytes()), "text": clip.reference_text, "terms": [], "name": clip.name})
    return rows


def load_example_list() -> list:
    """The example server lists (Beijing districts, streets, departments): unrelated to both sets."""
    return [hw for path in sorted(EXAMPLE_LISTS.glob("*.txt")) for hw in load_hotword_file(path)]


def contains(text: str, term: str) -> bool:
    return normalize_for_cer(term) in normalize_for_cer(text)


def list_insertions(rows, decoded: list[Decoded], terms: Sequence[str]) -> list[int]:
    """Per clip: listed terms in the hypothesis that are not in the reference."""
    return [sum(contains(d.text, t) and not contains(row["text"], t) for t in terms) for row, d in zip(rows, decoded)]


def summarise(rows, decoded: list[Decoded], terms_all: list[str], distractors: list[str]) -> dict:
    hits = total = 0
    dist_ins = list_ins = 0
    cers = []
    missed = []
    for row, d in zip(rows, decoded):
        for term in row["terms"]:
            total += 1
            if contains(d.text, term):
                hits += 1
            else:
                missed.append(term)
        dist_ins += sum(contains(d.text, t) and not contains(row["text"], t) for t in distractors)
        list_ins += sum(contains(d.text, t) and not contains(row["text"], t) for t in terms_all)
        cers.append(cer(d.text, row["text"]))
    steps = [s for d in decoded for s in d.step_s]
    scorer_s = sum(d.scorer_s for d in decoded)
    return {
        "term_recall": hits / total if total else 0.0,
        "terms_found": hits,
        "terms_total": total,
        "missed": missed,
        "cer": statistics.mean(cers) if cers else 0.0,
        "distractor_insertions": dist_ins,
        "distractor_insertion_rate": dist_ins / (len(rows) * len(distractors)) if distractors else 0.0,
        "other_list_term_insertions": list_ins,
        "loop_fallbacks": sum(d.fallback for d in decoded),
        "decode_s": sum(d.seconds for d in decoded),
        "decoder_steps_s": sum(steps),
        "steps": len(steps),
        "step_ms_median": 1000 * statistics.median(steps) if steps else 0.0,
        "scorer_ms_per_step": 1000 * scorer_s / len(steps) if steps else 0.0,
        "scorer_overhead_pct": 100 * scorer_s / sum(steps) if steps else 0.0,
    }


async def bench(args) -> dict:
    report: dict = {"beam_size": args.beam_size, "precision": args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        repository = render_repository(args.model_dir, Path(tmp) / "repo", precision=args.precision)
        with TritonProcess(repository, log_path=Path(tmp) / "triton.log") as triton:
            client = TritonAsrClient(triton.grpc_url)
            try:
                transcriber = Transcriber(TimedClient(client), args.model_dir)
                vocabulary = transcriber.family.hotword_vocabulary()
                terms = list(load_hotword_file(DATA / "terms.txt"))
                distractors = list(load_hotword_file(DATA / "distractors.txt"))
                hotwords = parse_hotwords(terms + distractors)
                t0 = time.perf_counter()
                graph = ContextGraph(hotwords, vocabulary)
                report["bench_list"] = {"phrases": len(hotwords), "build_ms": 1000 * (time.perf_counter() - t0)}

                big = parse_hotwords(list(dict.fromkeys([h.phrase for h in hotwords] + synthetic_phrases(10_000)))[:10_000])
                t0 = time.perf_counter()
                big_graph = ContextGraph(big, vocabulary)
                report["list_10k"] = {"phrases": len(big), "build_ms": 1000 * (time.perf_counter() - t0), "nodes": big_graph.n_nodes}
                print(f"graph build: {len(hotwords)} phrases {report['bench_list']['build_ms']:.1f} ms; "
                      f"{len(big)} phrases {report['list_10k']['build_ms']:.0f} ms", flush=True)

                rows = load_set()
                if args.limit:
                    rows = rows[: args.limit]
                general = load_general_set()
                example = parse_hotwords(load_example_list())
                example_graph = ContextGraph(example, vocabulary)
                example_terms = tuple(h.phrase for h in example)
                bench_terms = tuple(h.phrase for h in hotwords)
                await decode(transcriber, rows[0]["audio_array"], args.beam_size, Condition(None))  # warm-up
                term_names = [h.phrase for h in terms]
                dist_names = [h.phrase for h in distractors]
                main_boost = args.boost[0]
                conditions: dict[str, Condition] = {"baseline": Condition(None)}
                for boost in args.boost:
                    conditions[f"boost {boost:g}"] = Condition(HotwordScorer(graph, HotwordOptions(boost=boost)), True, bench_terms)
                conditions[f"boost {main_boost:g} uncapped"] = Condition(HotwordScorer(graph, HotwordOptions(boost=main_boost)), False, bench_terms)
                conditions[f"boost {main_boost:g}, 10k list"] = Condition(
                    HotwordScorer(big_graph, HotwordOptions(boost=main_boost)), True, tuple(h.phrase for h in big))
                for boost in args.boost:
                    unrelated = HotwordScorer(example_graph, HotwordOptions(boost=boost))
                    conditions[f"boost {boost:g}, unrelated list"] = Condition(unrelated, True, example_terms)
                unrelated = HotwordScorer(example_graph, HotwordOptions(boost=main_boost))
                conditions[f"boost {main_boost:g}, unrelated list uncapped"] = Condition(unrelated, False, example_terms)
                if args.only:
                    conditions = {k: v for k, v in conditions.items() if k == "baseline" or re.search(args.only, k)}
                # conditions interleaved clip by clip: machine load affects all of them alike
                decoded: dict[str, list[Decoded]] = {name: [] for name in conditions}
                general_decoded: dict[str, list[Decoded]] = {name: [] for name in conditions}
                for i, row in enumerate(rows):
                    print(f"hotword clip {i + 1}/{len(rows)}", end="\r", flush=True)
                    for name, condition in conditions.items():
                        decoded[name].append(await decode(transcriber, row["audio_array"], args.beam_size, condition))
                for i, row in enumerate(general):
                    print(f"general clip {i + 1}/{len(general)}  ", end="\r", flush=True)
                    for name, condition in conditions.items():
                        general_decoded[name].append(await decode(transcriber, row["audio_array"], args.beam_size, condition))
                results = {}
                base_s = sum(d.seconds for d in decoded["baseline"])
                for name, condition in conditions.items():
                    summary = summarise(rows, decoded[name], term_names, dist_names)
                    summary["decode_time_vs_baseline"] = sum(d.seconds for d in decoded[name]) / base_s
                    summary["texts"] = [d.text for d in decoded[name]]
                    summary["general_cer"] = statistics.mean(cer(d.text, r["text"]) for d, r in zip(general_decoded[name], general))
                    inserted = list_insertions(general, general_decoded[name], condition.terms)
                    summary["general_list_insertions"] = sum(inserted)
                    summary["general_clips_with_insertions"] = sum(n > 0 for n in inserted)
                    summary["general_loop_fallbacks"] = sum(d.fallback for d in general_decoded[name])
                    summary["general_texts"] = [d.text for d in general_decoded[name]]
                    results[name] = summary
                report["general"] = [{"name": r["name"], "text": r["text"]} for r in general]
                report["results"] = results
                report["clips"] = [{"audio": r["audio"], "text": r["text"], "terms": r["terms"]} for r in rows]
            finally:
                await client.close()
    return report


def print_report(report: dict) -> None:
    results = report["results"]
    print(f"\nbeam {report['beam_size']}, {report['precision']}; list: {report['bench_list']['phrases']} phrases "
          f"(graph {report['bench_list']['build_ms']:.1f} ms); 10k list graph {report['list_10k']['build_ms']:.0f} ms\n")
    print(f"general set: {len(report['general'])} clips (demo calls + zh samples)\n")
    print("| condition | term recall | CER hotword set | CER general | list-term insertions general (clips) | loop fallbacks (hotword / general) | distractor insertions (rate) | other list-term insertions | decode s (vs baseline) | decoder steps | step ms (median) | time in Triton steps s | scorer ms/step | scorer overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        general = (f"{100 * r['general_cer']:.1f}% | {r['general_list_insertions']} ({r['general_clips_with_insertions']}) | "
                   f"{r['loop_fallbacks']} / {r['general_loop_fallbacks']}")
        print(
            f"| {name} | {100 * r['term_recall']:.1f}% ({r['terms_found']}/{r['terms_total']}) | {100 * r['cer']:.1f}% | {general} | "
            f"{r['distractor_insertions']} ({100 * r['distractor_insertion_rate']:.2f}%) | {r['other_list_term_insertions']} | "
            f"{r['decode_s']:.1f} ({r['decode_time_vs_baseline']:.2f}x) | {r['steps']} | {r['step_ms_median']:.1f} | {r['decoder_steps_s']:.1f} | {r['scorer_ms_per_step']:.3f} | {r['scorer_overhead_pct']:.1f}% |"
        )
    base = results["baseline"]["texts"]
    best = next(k for k in results if k != "baseline")
    print(f"\nper clip (baseline -> {best}):")
    for clip, a, b in zip(report["clips"], base, results[best]["texts"]):
        mark = "  " if a == b else "* "
        print(f"{mark}{clip['text']}\n    base: {a}\n    hw:   {b}")
    print("\ngeneral clips that change under a list (baseline -> each condition that differs):")
    for i, clip in enumerate(report["general"]):
        a = results["baseline"]["general_texts"][i]
        changed = [(name, r["general_texts"][i]) for name, r in results.items() if name != "baseline" and r["general_texts"][i] != a]
        if changed:
            print(f"* {clip['name']}: {clip['text']}\n    base: {a}")
            for name, text in changed:
                print(f"    {name}: {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "build" / "models" / "whisper-base")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--boost", type=float, nargs="+", default=[3.5, 5.0], help="one or more boosts to compare (the first is the main one)")
    parser.add_argument("--only", default="", help="regex: run only the conditions it matches (and the baseline)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N hotword clips")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "build" / "bench" / "hotwords.json")
    args = parser.parse_args(argv)
    report = asyncio.run(bench(args))
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
