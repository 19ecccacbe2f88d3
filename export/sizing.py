"""GLM-ASR-Nano sizing: parameters, GPU memory, KV cache, batch sizes -> docs/glm_asr_sizing.md.

    python -m export.sizing                          # the documented real config (export.glm_asr.REAL_CONFIG)
    python -m export.sizing --checkpoint DIR         # the config.json (and tokenizer) of a checkpoint
    python -m export.sizing --check                  # exit 1 if docs/glm_asr_sizing.md is not up to date

Everything is computed from the config: parameter counts per part from the layer shapes,
weight bytes per precision, KV cache bytes per token (K and V, every decoder layer, KV heads
only: GQA), per 30 s window (audio tokens + prompt text + output tokens), and how many
sequences x beams fit next to the weights on a 24 GB and an 80 GB GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .glm_asr import MERGE_FACTOR, N_FRAMES, REAL_CONFIG

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "glm_asr_sizing.md"
GB = 1e9
GIB = 1 << 30
# Prompt text around the audio: "<|user|>\n<|begin_of_audio|>" + "<|end_of_audio|><|user|>\nPlease
# transcribe this audio into text<|assistant|>\n": 3 + 11 tokens with the GLM-4 tokenizer
# (replaced by the exact count when a checkpoint's tokenizer is given).
PROMPT_TEXT_TOKENS = 14
OUTPUT_TOKENS = 100
RESERVE_BYTES = 2 * GIB  # CUDA context, ONNX Runtime/TensorRT workspace, activations (prefill of one window)
KV_HEADROOM = 0.10  # allocator fragmentation / capacity rounding of the cache
CAP_STEP = 16  # the decoder grows each cache in steps of 16 positions (model_repository/decoder)
GPUS = (("24 GB GPU (e.g. L4, A10, RTX 4090)", 24 * GB), ("80 GB GPU (A100/H100 80GB)", 80 * GB))
BEAMS = (1, 5)


@dataclass
class Dims:
    n_mels: int
    enc_hidden: int
    enc_ffn: int
    enc_layers: int
    enc_heads: int
    enc_frames: int
    merge: int
    dec_hidden: int
    dec_ffn: int
    dec_layers: int
    dec_heads: int
    dec_kv_heads: int
    head_dim: int
    vocab: int
    attention_bias: bool
    mlp_bias: bool
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Dims:
        a = {**REAL_CONFIG["audio_config"], **(config.get("audio_config") or {})}
        t = {**REAL_CONFIG["text_config"], **(config.get("text_config") or {})}
        tied = config.get("tie_word_embeddings", t.get("tie_word_embeddings", REAL_CONFIG["tie_word_embeddings"]))
        return cls(
            n_mels=int(a["num_mel_bins"]), enc_hidden=int(a["hidden_size"]), enc_ffn=int(a["intermediate_size"]),
            enc_layers=int(a["num_hidden_layers"]), enc_heads=int(a["num_attention_heads"]),
            enc_frames=N_FRAMES // 2, merge=MERGE_FACTOR,
            dec_hidden=int(t["hidden_size"]), dec_ffn=int(t["intermediate_size"]),
            dec_layers=int(t["num_hidden_layers"]), dec_heads=int(t["num_attention_heads"]),
            dec_kv_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
            head_dim=int(t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]),
            vocab=int(t["vocab_size"]), attention_bias=bool(t.get("attention_bias", False)),
            mlp_bias=bool(t.get("mlp_bias", False)), tied=bool(tied),
        )


def parameter_counts(d: Dims) -> dict[str, int]:
    """Parameters per part, from the module shapes of transformers' GlmAsrForConditionalGeneration."""
    h, f = d.enc_hidden, d.enc_ffn
    enc_layer = (h * h + h) + (h * h) + (h * h + h) + (h * h + h)  # q (bias), k (no bias), v, o
    enc_layer += (h * f + f) + (f * h + h) + 4 * h  # fc1, fc2, two LayerNorms
    encoder = (d.n_mels * h * 3 + h) + (h * h * 3 + h) + d.enc_layers * enc_layer + 2 * h
    merged = d.enc_ffn  # 4 frames of `hidden` concatenated: the projector input is intermediate_size wide
    D = d.dec_hidden
    adapter = (merged * 2 * D + 2 * D) + (2 * D * D + D)
    q, kv = d.dec_heads * d.head_dim, d.dec_kv_heads * d.head_dim
    attn = D * q + 2 * D * kv + q * D + (q + 2 * kv + D if d.attention_bias else 0)
    mlp = 3 * D * d.dec_ffn + (2 * d.dec_ffn + D if d.mlp_bias else 0)
    decoder = d.dec_layers * (attn + mlp + 2 * D) + D
    embeddings = d.vocab * D
    lm_head = 0 if d.tied else d.vocab * D
    return {"audio encoder": encoder, "adapter": adapter, "decoder layers": decoder,
            "token embeddings": embeddings, "lm_head": lm_head}


def kv_bytes_per_token(d: Dims, bytes_per_value: int = 2) -> int:
    return 2 * d.dec_layers * d.dec_kv_heads * d.head_dim * bytes_per_value


def audio_tokens_per_window(d: Dims) -> int:
    return (d.enc_frames - d.merge) // d.merge + 1


def prompt_text_tokens(checkpoint: Path | None) -> tuple[int, str]:
    """Text tokens of the prompt (without the audio placeholders) and where the number comes from."""
    if checkpoint is not None:
        prompt = checkpoint / "prompt.json"
        if prompt.is_file():  # an export directory
            p = json.loads(prompt.read_text(encoding="utf-8"))
            return len(p["prefix_ids"]) + len(p["suffix_ids"]), str(prompt)
        tok = checkpoint / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(str(tok))
            text = ("<|user|>\n<|begin_of_audio|>", "<|end_of_audio|><|user|>\nPlease transcribe this audio into "
                    "text<|assistant|>\n")
            return sum(len(t.encode(x, add_special_tokens=False).ids) for x in text), f"{tok} (tokenized)"
    return PROMPT_TEXT_TOKENS, "GLM-4 tokenizer estimate"


def sizing(config: dict, prompt_tokens: int, output_tokens: int = OUTPUT_TOKENS) -> dict:
    d = Dims.from_config(config)
    params = parameter_counts(d)
    total = sum(params.values())
    a = audio_tokens_per_window(d)
    window_tokens = a + prompt_tokens + output_tokens
    cached_positions = -(-window_tokens // CAP_STEP) * CAP_STEP
    kv_tok = kv_bytes_per_token(d)
    kv_window = kv_tok * window_tokens
    kv_window_alloc = kv_tok * cached_positions * (1 + KV_HEADROOM)
    weights = {"fp16": 2 * total, "int8": total}  # int8: 1 byte a weight (biases, norms, scales: < 0.1 %)
    fits = {}
    for label, mem in GPUS:
        for prec, w in weights.items():
            free = mem - w - RESERVE_BYTES
            beams = max(0, int(free // kv_window_alloc))
            fits[(label, prec)] = {"free": free, "beam_windows": beams,
                                   **{f"seq_beam{b}": beams // b for b in BEAMS}}
    step_bytes_fp16 = 2 * (params["decoder layers"] + (params["lm_head"] or params["token embeddings"]))
    return {"dims": d, "params": params, "total": total, "audio_tokens": a, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "window_tokens": window_tokens, "cached_positions": cached_positions,
            "kv_per_token": kv_tok, "kv_window": kv_window, "kv_window_alloc": kv_window_alloc, "weights": weights,
            "fits": fits, "step_bytes_fp16": step_bytes_fp16}


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f} M"


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def render_markdown(s: dict, source: str, prompt_source: str) -> str:
    d: Dims = s["dims"]
    p = s["params"]
    lines = [
        "# GLM-ASR-Nano-2512 sizing",
        "",
        f"Generated by `python -m export.sizing` from {source}; do not edit by hand",
        "(`python -m export.sizing --checkpoint DIR` recomputes it from a real checkpoint's config.json).",
        "",
        "## Architecture used",
        "",
        f"- audio encoder: {d.enc_layers} layers, hidden {d.enc_hidden}, FFN {d.enc_ffn}, {d.enc_heads} heads, "
        f"{d.n_mels} mel bins, {d.enc_frames} frames per 30 s window (rotary positions, partial 0.5)",
        f"- adapter: {d.merge} frames merged ({d.merge} x {d.enc_hidden} = {d.enc_ffn}) -> {2 * d.dec_hidden} -> GELU -> "
        f"{d.dec_hidden}: {s['audio_tokens']} audio tokens per 30 s window",
        f"- decoder: {d.dec_layers} Llama layers, hidden {d.dec_hidden}, FFN {d.dec_ffn}, {d.dec_heads} query heads / "
        f"{d.dec_kv_heads} KV heads (GQA), head dim {d.head_dim}, vocab {d.vocab:,}, "
        f"lm_head {'tied to' if d.tied else 'separate from'} the token embeddings",
        "",
        "## Parameters per part",
        "",
        "| part | parameters | fp16 | int8 |",
        "|---|---:|---:|---:|",
    ]
    for name, n in p.items():
        if n:
            lines.append(f"| {name} | {_m(n)} | {_gb(2 * n)} | {_gb(n)} |")
    lines += [
        f"| **total** | **{_m(s['total'])}** | **{_gb(s['weights']['fp16'])}** | **{_gb(s['weights']['int8'])}** |",
        "",
        "The ONNX graphs split them as: `encoder.onnx` = audio encoder + adapter, `embed_tokens.onnx` = token "
        "embeddings, `decoder_step.onnx` = decoder layers + lm_head (fp32 files are twice the fp16 size).",
        "",
        "## KV cache",
        "",
        f"- per token: 2 (K, V) x {d.dec_layers} layers x {d.dec_kv_heads} KV heads x {d.head_dim} x 2 bytes (fp16) = "
        f"**{s['kv_per_token']:,} bytes** ({s['kv_per_token'] / 1024:.0f} KiB); the INT8 variant keeps the cache in "
        "fp16 as well",
        f"- per 30 s window and beam: {s['audio_tokens']} audio tokens + {s['prompt_tokens']} prompt text tokens "
        f"({prompt_source}) + {s['output_tokens']} output tokens = {s['window_tokens']} positions = "
        f"**{s['kv_window'] / 1e6:.1f} MB**",
        f"- as allocated by the decoder model (capacity rounded up to {CAP_STEP} positions = {s['cached_positions']}, "
        f"+{int(KV_HEADROOM * 100)}% fragmentation headroom): {s['kv_window_alloc'] / 1e6:.1f} MB per beam; every "
        "beam holds its own copy of the prompt's cache, so a sequence with beam size B needs B times that",
        "",
        "## Memory per GPU and batch sizes",
        "",
        f"Free for the cache = GPU memory - weights - {RESERVE_BYTES / GIB:.0f} GiB (CUDA context, ONNX Runtime/TensorRT "
        "workspace, activations of one window's prefill). A *beam-window* is one beam of one 30 s window "
        "(the cache of one row of the decoder's `[L, N, K, H, P, dh]` cache).",
        "",
        "| GPU | weights | free for KV | beam-windows | sequences at beam 1 | sequences at beam 5 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (label, prec), f in s["fits"].items():
        lines.append(f"| {label} | {prec} ({_gb(s['weights'][prec])}) | {_gb(f['free'])} | {f['beam_windows']:,} | "
                     f"{f['seq_beam1']:,} | {f['seq_beam5']:,} |")
    lines += [
        "",
        "Concurrent sequences are bounded further by the Triton decoder's `max_sequences` (64 per instance by "
        "default) and `max_batch_size` (16 steps per execution): raise them (`--set max_sequences=...`, "
        "`--decoder-max-batch`) to use the room on an 80 GB GPU, or run several decoder instances.",
        "",
        "## Bandwidth floor of a decoder step",
        "",
        f"One step reads the decoder layers and the lm_head: {_gb(s['step_bytes_fp16'])} in fp16 "
        f"({_gb(s['step_bytes_fp16'] / 2)} in int8), about {s['step_bytes_fp16'] / 3.35e12 * 1e3:.2f} ms on an H100 "
        f"(3.35 TB/s) and {s['step_bytes_fp16'] / 0.3e12 * 1e3:.1f} ms on an L4 (300 GB/s), whatever the batch: batch "
        "beams and sequences into one step.",
        "",
        "## Caveats",
        "",
        "- With this repository's Python-backend decoder the KV cache lives in the Triton process's host memory "
        "(numpy) and is fed to ONNX Runtime every step; the GPU then needs the weights and workspace only, host RAM "
        "holds the cache (same sizes as above), and each step copies the live cache over PCIe. The batch sizes "
        "above are those of a GPU-resident cache (ONNX Runtime I/O binding or a TensorRT engine with the cache on "
        "the device).",
        "- Not measured: no GPU and no real checkpoint were available where this was written. Verify with "
        "`make export MODEL=glm-asr-nano CHECKPOINT=DIR` (ONNX vs PyTorch check) and watch `nvidia-smi` under load.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.sizing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a GLM-ASR checkpoint (config.json) or export directory; default: the documented real config")
    ap.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS)
    ap.add_argument("--out", type=Path, default=DOC_PATH, help=f"markdown file to write (default {DOC_PATH})")
    ap.add_argument("--check", action="store_true", help="only check that --out is up to date")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if args.checkpoint is not None:
        cfg_path = args.checkpoint / "config.json"
        if not cfg_path.is_file() and (args.checkpoint / "model_info.json").is_file():
            info = json.loads((args.checkpoint / "model_info.json").read_text(encoding="utf-8"))
            cfg_path = Path(info["checkpoint"]) / "config.json"
        if not cfg_path.is_file():
            print(f"sizing: error: {cfg_path} not found", file=sys.stderr)
            return 2
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if config.get("model_type") != "glmasr":
            print(f"sizing: error: {cfg_path} is a {config.get('model_type')!r} config, not glmasr", file=sys.stderr)
            return 2
        source = f"`{cfg_path}`"
    else:
        config = REAL_CONFIG
        source = "the documented GLM-ASR-Nano-2512 config (`export.glm_asr.REAL_CONFIG`, DESIGN.md section 3)"
    n_prompt, prompt_source = prompt_text_tokens(args.checkpoint)
    s = sizing(config, n_prompt, args.output_tokens)
    text = render_markdown(s, source, prompt_source)
    if args.json:
        out = {k: v for k, v in s.items() if k not in ("dims", "fits")}
        out["fits"] = {f"{g} {p}": v for (g, p), v in s["fits"].items()}
        print(json.dumps(out, indent=2, default=str))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"sizing: {args.out} is out of date; run `python -m export.sizing`", file=sys.stderr)
            return 1
        print(f"sizing: {args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"sizing: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
