"""GLM-ASR export: a transformers ``glmasr`` checkpoint directory -> ONNX (fp32, fp16, int8).

    python -m export --model glm-asr-nano --checkpoint /path/to/GLM-ASR-Nano-2512 --out build/models/glm-asr-nano
    python -m export --model glm-asr-tiny --out build/models/glm-asr-tiny

``glm-asr-nano`` reads the user's local copy of GLM-ASR-Nano-2512 (config.json with model_type
``glmasr``, model.safetensors, tokenizer and processor files with the chat template).
``glm-asr-tiny`` first builds a seeded, randomly initialised checkpoint of the same architecture
(``GlmAsrConfig`` with small dims, a small byte-level BPE tokenizer holding the real special
tokens, a chat template giving the official prompt, a 128-mel Whisper feature extractor) in
``OUT/hf`` and then runs exactly the same code path as for the real checkpoint.

Output layout (``OUT``)::

    OUT/hf/                   (tiny only) the generated checkpoint directory
    OUT/onnx/{fp32,fp16,int8,int8-vnni}/encoder.onnx       input_features [B, 128, 3000] -> encoder_output [B, A, D]
                              embed_tokens.onnx  input_ids [N, K, T] -> inputs_embeds [N, K, T, D]
                              decoder_step.onnx  inputs_embeds + KV cache -> logits, new K/V
                              (*.onnx.data next to a graph over 2 GB: ONNX external data)
    OUT/model_info.json       family "glm_asr", dims, eos ids, audio token id, ... (gateway, render.py)
    OUT/prompt.json           prompt ids split around the audio placeholder run (from the chat template)
    OUT/tokenizer.json        the checkpoint's tokenizer (gateway detokenization)
    OUT/.export_stamp         hash of sources + package versions + options (skip when unchanged)

Nothing about the prompt is hard-coded: the prompt ids come from the checkpoint's processor
(``apply_transcription_request``, i.e. its chat template) and every special id from its
tokenizer/config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .common import (
    ExportError,
    PhaseTimer,
    clear_stamp,
    compute_stamp,
    log,
    report_sizes,
    stamp_matches,
    write_stamp,
)
from .int8 import INT8_VARIANTS
from .onnx_tools import ort_session, quantize_graphs, torch_to_onnx

FAMILY = "glm_asr"
MODEL_NAMES = ("glm-asr-nano", "glm-asr-tiny")
ONNX_GRAPHS = ("encoder.onnx", "embed_tokens.onnx", "decoder_step.onnx")
VARIANTS = ("fp32", "fp16") + tuple(INT8_VARIANTS)  # int8 (7-bit weights) and int8-vnni (8-bit): export/int8.py
DEFAULT_OPSET = 17
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH_S = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_LENGTH_S
N_FRAMES = N_SAMPLES // HOP_LENGTH
# GlmAsrProcessor._get_audio_token_length: two convolutions (padding, kernel, stride), then
# `merge_factor` encoder frames per audio token
AUDIO_CONVS = ((1, 3, 1), (1, 3, 2))
MERGE_FACTOR = 4

# The real model, as documented (docs/glm_asr_sizing.md, /work/shared/DESIGN.md section 3). A
# checkpoint's config.json always wins; these values are what `python -m export.sizing` uses
# when it is given no checkpoint. lm_head untied: 2.26 B parameters x 2 bytes = the 4.5 GB bf16
# checkpoint (tied it would be 2.14 B).
REAL_CONFIG = {
    "audio_config": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "num_key_value_heads": 20, "num_mel_bins": 128, "max_position_embeddings": 1500,
        "partial_rotary_factor": 0.5, "hidden_act": "gelu",
    },
    "text_config": {
        "vocab_size": 59264, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "eos_token_id": [59246, 59253, 59255],
    },
    "audio_token_id": 59260,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
}

# Tiny: same structure, small dims (a 2-core CPU exports and tests it in seconds)
TINY_SEED = 20251221
TINY_VOCAB_REGULAR = 320  # byte-level BPE: 256 bytes + merges; the special tokens come after
# Larger random weights than transformers' 0.02 default: with 0.02 the residual stream is the
# current token's embedding and greedy decoding loops on one token whatever the audio; with these
# the outputs vary with the audio and the top-1/top-2 logit gaps stay well above float noise.
TINY_AUDIO = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_mel_bins": 128, "initializer_range": 0.2}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
             "initializer_range": 0.5}
TINY_LM_HEAD_STD = 0.5  # peaked next-token distributions: parity tests compare argmax/top-k orders
# The special tokens of the GLM-4 family tokenizer in their order: the eos ids of the real
# model (59246, 59253, 59255) are <|endoftext|>, <|user|> and <|observation|>, the audio
# placeholder (59260) is <|pad|>.
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|pad|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>",
)
TINY_EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
AUDIO_TOKEN = "<|pad|>"
# Renders the official GLM-ASR prompt:
#   <|user|>\n<|begin_of_audio|>{audio}<|end_of_audio|><|user|>\n{prompt}<|assistant|>\n
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message.role }}|>{{ '\\n' }}"
    "{%- if message.content is string -%}{{ message.content }}{%- else -%}"
    "{%- for item in message.content -%}"
    "{%- if item.type == 'audio' -%}<|begin_of_audio|><|pad|><|end_of_audio|><|user|>{{ '\\n' }}"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)
TINY_CORPUS = (
    "Please transcribe this audio into text",
    "The quick brown fox jumps over the lazy dog.",
    "Thank you for calling, how can I help you today?",
    "请把这段音频转写成文字。",
    "您好，这里是12345市民服务热线，请问有什么可以帮您？",
    "我家楼下的路灯坏了三天了，晚上很不安全。",
    "二零二五年三月十二号下午三点，维修师傅会上门。",
)

INT8_OPTIONS = {
    "weight_type": "QInt8",
    "per_channel": True,
    "op_types": ["MatMul"],
    "matmul_const_b_only": True,
    # kept in float: the encoder FFN down-projections and first layers (as measured for the
    # Whisper encoder this one is shaped like) and the Llama MLP down-projections (SiLU-gated
    # activations with outliers); the token table gets per-token int8 (int8.quantize_embedding_gathers)
    "fp32_modules": ["fc2", "down_proj"],
    "encoder_fp32_layers": 2,
    "int8_embedding_gather": True,
    # 7-bit weights (exact on CPUs without VNNI) in "int8"; export/int8.py INT8_VARIANTS sets it
    "reduce_range": True,
}
FP16_OPTIONS = {
    # exported from a float16 copy of the model (glm_asr_modules.half_copy): float32 islands where
    # transformers has them (RMSNorm statistics, softmax, RoPE angles: position x frequency reaches
    # thousands of radians, which float16 would round to whole radians)
    "method": "torch half export",
    "float32_io": ["input_features", "encoder_output", "input_ids", "inputs_embeds", "past_length", "logits"],
    "float16_io": ["past_k", "past_v", "new_k", "new_v"],
}


class CheckpointError(ExportError):
    """The checkpoint directory is missing files or holds another kind of model (``missing``: the
    missing files, when that is the problem)."""

    missing: list[str] = []


# --------------------------------------------------------------------------------------------
# checkpoint checks (before any long work)


def _chat_template_source(path: Path) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        if (path / name).is_file():
            return name
    for name in ("processor_config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("chat_template"):
            return f"{name}:chat_template"
    return None


def check_checkpoint(path) -> dict:
    """Fail fast, naming every missing file, unless ``path`` is a transformers GLM-ASR checkpoint.
    Returns its config.json."""
    path = Path(path)
    hint = ("a transformers-format GLM-ASR-Nano-2512 directory (config.json with model_type \"glmasr\", "
            "model.safetensors, tokenizer.json, tokenizer_config.json, processor_config.json or "
            "preprocessor_config.json, chat_template.jinja)")
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; expected {hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; expected {hint}")
    missing = []
    config = None
    if not (path / "config.json").is_file():
        missing.append("config.json")
    else:
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        pass
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from e
        missing += [f"{s} (listed in model.safetensors.index.json)" for s in shards if not (path / s).is_file()]
    else:
        missing.append("model.safetensors (or model.safetensors.index.json with its shards)")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            missing.append(name)
    if not ((path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()):
        missing.append("processor_config.json or preprocessor_config.json (the 128-mel feature extractor)")
    if _chat_template_source(path) is None:
        missing.append("chat_template.jinja (or a chat_template entry in processor_config.json/tokenizer_config.json)")
    if config is not None:
        model_type = config.get("model_type")
        if model_type != "glmasr":
            raise CheckpointError(
                f"{path} holds a {model_type or 'model without a model_type'!r} checkpoint, not GLM-ASR: "
                f"config.json needs model_type \"glmasr\" (GlmAsrForConditionalGeneration, transformers >= 5); "
                f"expected {hint}")
        for key in ("audio_config", "text_config"):
            if not isinstance(config.get(key), dict):
                raise CheckpointError(f"{path / 'config.json'} has no {key} section; expected {hint}")
    if missing:
        error = CheckpointError(f"checkpoint directory {path} is missing: {'; '.join(missing)}. Expected {hint}")
        error.missing = missing
        raise error
    return config


# --------------------------------------------------------------------------------------------
# the tiny checkpoint


def build_tiny_tokenizer():
    """Byte-level BPE over a few zh/en sentences, then the GLM special tokens (ids 320..337)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_REGULAR, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(list(TINY_CORPUS) * 4, trainer)
    if tok.get_vocab_size() != TINY_VOCAB_REGULAR:
        raise ExportError(f"tiny tokenizer has {tok.get_vocab_size()} regular tokens, expected {TINY_VOCAB_REGULAR}")
    tok.add_special_tokens(list(GLM_SPECIAL_TOKENS))
    return tok


def build_tiny_checkpoint(dst: Path, seed: int = TINY_SEED) -> Path:
    """Write a seeded random GLM-ASR checkpoint (weights, tokenizer, processor, chat template) to dst."""
    import torch
    from transformers import (
        GenerationConfig,
        GlmAsrConfig,
        GlmAsrForConditionalGeneration,
        GlmAsrProcessor,
        PreTrainedTokenizerFast,
        WhisperFeatureExtractor,
    )

    tok = build_tiny_tokenizer()
    eos = [tok.token_to_id(t) for t in TINY_EOS_TOKENS]
    audio_id = tok.token_to_id(AUDIO_TOKEN)
    vocab = tok.get_vocab_size()
    config = GlmAsrConfig(
        audio_config=dict(TINY_AUDIO),
        text_config=dict(TINY_TEXT, vocab_size=vocab, eos_token_id=eos, pad_token_id=eos[0],
                         bos_token_id=None, tie_word_embeddings=False),
        audio_token_id=audio_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GlmAsrForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        head = model.get_output_embeddings().weight
        if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            raise ExportError("the tiny checkpoint is meant to have an untied lm_head (as the real one)")
        head.copy_(torch.randn(head.shape, generator=g) * TINY_LM_HEAD_STD)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[0], do_sample=False)

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     padding_side="left", model_max_length=TINY_TEXT["max_position_embeddings"])
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                 chunk_length=CHUNK_LENGTH_S, n_fft=N_FFT)
    processor = GlmAsrProcessor(fe, hf_tok, chat_template=TINY_CHAT_TEMPLATE, audio_token=AUDIO_TOKEN)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    for f in tmp.glob("*.safetensors"):
        f.chmod(0o644)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


# --------------------------------------------------------------------------------------------
# loading (also used by the tests)


def load_reference(checkpoint, dtype=None):
    """(GlmAsrForConditionalGeneration float32 eval with eager attention, GlmAsrProcessor)."""
    import torch
    from transformers import AutoProcessor, GlmAsrForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    check_checkpoint(checkpoint)
    model = GlmAsrForConditionalGeneration.from_pretrained(
        str(checkpoint), dtype=dtype or torch.float32, attn_implementation="eager")
    model.eval()
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    if not hasattr(processor, "apply_transcription_request"):
        raise CheckpointError(f"{checkpoint}: AutoProcessor gives {type(processor).__name__}, not GlmAsrProcessor")
    return model, processor


def load_step_modules(model):
    from .glm_asr_modules import load_step_modules as _load

    return _load(model)


def n_audio_tokens(n_samples: int, hop_length: int = HOP_LENGTH, n_frames: int = N_FRAMES) -> int:
    """Audio tokens the processor gives ``n_samples`` of one window (GlmAsrProcessor._get_audio_token_length)."""
    length = min(n_frames, -(-int(n_samples) // hop_length))
    for padding, kernel, stride in AUDIO_CONVS:
        length = (length + 2 * padding - (kernel - 1) - 1) // stride + 1
    return max(0, (length - MERGE_FACTOR) // MERGE_FACTOR + 1)


def derive_prompt(processor, audio_token_id: int) -> dict:
    """Prompt ids around the audio placeholder run, from the checkpoint's chat template."""
    per_window = n_audio_tokens(N_SAMPLES)
    inputs = processor.apply_transcription_request(np.zeros(N_SAMPLES, np.float32))
    ids = [int(i) for i in inputs["input_ids"][0].tolist()]
    positions = [i for i, t in enumerate(ids) if t == audio_token_id]
    if not positions:
        raise CheckpointError(f"the chat template puts no audio placeholder (id {audio_token_id}) into the prompt")
    first, last = positions[0], positions[-1]
    if last - first + 1 != len(positions):
        raise CheckpointError("the audio placeholders of the prompt are not one consecutive run")
    if len(positions) != per_window:
        raise CheckpointError(f"the processor gives {len(positions)} audio tokens for a 30 s window, "
                              f"the encoder makes {per_window}")
    # the count for a shorter window must follow the same formula (the gateway computes it)
    short = processor.apply_transcription_request(np.zeros(int(7.3 * SAMPLE_RATE), np.float32))
    n_short = int((short["input_ids"][0] == audio_token_id).sum())
    if n_short != n_audio_tokens(int(7.3 * SAMPLE_RATE)):
        raise CheckpointError(f"audio token count of a 7.3 s clip: processor {n_short}, "
                              f"formula {n_audio_tokens(int(7.3 * SAMPLE_RATE))}")
    tok = processor.tokenizer
    return {
        "audio_token_id": int(audio_token_id),
        "audio_token": tok.convert_ids_to_tokens(int(audio_token_id)),
        "prefix_ids": ids[:first],
        "suffix_ids": ids[last + 1:],
        "tokens_per_window": per_window,
        "prefix_text": tok.decode(ids[:first]),
        "suffix_text": tok.decode(ids[last + 1:]),
        "instruction": getattr(processor, "default_transcription_prompt", None),
        "audio_tokens": {
            "sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_frames": N_FRAMES,
            "convs": [list(c) for c in AUDIO_CONVS], "merge_factor": MERGE_FACTOR,
            "rule": "frames = min(n_frames, ceil(samples / hop)); per conv: (x + 2p - (k - 1) - 1) // s + 1; "
                    "tokens = (x - merge) // merge + 1",
        },
        "source": "processor.apply_transcription_request (the checkpoint's chat template)",
    }


def model_info_for(model, processor, name: str, checkpoint: Path, prompt: dict, opset: int) -> dict:
    cfg = model.config
    tc, ac = cfg.text_config, cfg.audio_config
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tc.eos_token_id
    eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if not eos:
        raise CheckpointError(f"{checkpoint}: no eos_token_id in generation_config.json or text_config")
    tok = processor.tokenizer
    fe = processor.feature_extractor
    if int(fe.feature_size) != int(ac.num_mel_bins):
        raise CheckpointError(f"feature extractor makes {fe.feature_size} mel bins, the encoder takes {ac.num_mel_bins}")
    specials = {t: int(tok.convert_tokens_to_ids(t)) for t in tok.all_special_tokens}
    for t in GLM_SPECIAL_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            specials.setdefault(t, int(i))
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    return {
        "family": FAMILY,
        "name": name,
        "checkpoint": str(checkpoint),
        "n_mels": int(ac.num_mel_bins),
        "n_frames": N_FRAMES,
        "sample_rate": int(fe.sampling_rate),
        "n_fft": int(fe.n_fft),
        "hop_length": int(fe.hop_length),
        "chunk_length_s": int(fe.chunk_length),
        # audio tokens per window vary with the audio length (<= audio_tokens_per_window): the
        # Triton tensors carrying them have a variable dim (-1)
        "encoder_frames": -1,
        "audio_tokens_per_window": int(prompt["tokens_per_window"]),
        "d_model": int(tc.hidden_size),
        "n_layers": int(tc.num_hidden_layers),
        "n_heads": int(tc.num_attention_heads),
        "n_kv_heads": int(tc.num_key_value_heads or tc.num_attention_heads),
        "head_dim": head_dim,
        "intermediate_size": int(tc.intermediate_size),
        "vocab_size": int(tc.vocab_size),
        "max_target_positions": int(tc.max_position_embeddings),
        "encoder": {"hidden_size": int(ac.hidden_size), "intermediate_size": int(ac.intermediate_size),
                    "n_layers": int(ac.num_hidden_layers), "n_heads": int(ac.num_attention_heads),
                    "frames": N_FRAMES // 2, "merge_factor": MERGE_FACTOR},
        "eos_token_ids": eos,
        "eot": eos[0],
        "audio_token_id": int(cfg.audio_token_id),
        "pad_token_id": None if tok.pad_token_id is None else int(tok.pad_token_id),
        "special_tokens": specials,
        "suppress_tokens": [],
        "begin_suppress_tokens": [],
        "tie_word_embeddings": bool(model.get_output_embeddings().weight.data_ptr()
                                    == model.get_input_embeddings().weight.data_ptr()),
        "prompt_file": "prompt.json",
        "tokenizer_file": "tokenizer.json",
        "onnx": {"opset": opset, "variants": list(VARIANTS), "graphs": list(ONNX_GRAPHS),
                 "int8": INT8_OPTIONS, "fp16": FP16_OPTIONS},
    }


# --------------------------------------------------------------------------------------------
# ONNX export


def export_onnx(model, onnx_dir: Path, opset: int, timer: PhaseTimer, half: bool = False) -> None:
    """The three graphs; ``half``: float16 weights and KV cache, float32 islands where the HF code
    has them (RMSNorm statistics, softmax, RoPE angles), float32 features/embeddings/logits I/O."""
    import torch

    from .glm_asr_modules import half_copy

    onnx_dir.mkdir(parents=True, exist_ok=True)
    label = " (fp16)" if half else ""
    if half:
        model = half_copy(model)
    encoder, embed, step = load_step_modules(model)
    tc, ac = model.config.text_config, model.config.audio_config
    L, Hkv, dh, D = step.n_layers, step.n_kv_heads, step.head_dim, int(tc.hidden_size)
    kv_dtype = torch.float16 if half else torch.float32

    with timer.phase(f"onnx encoder (audio tower + adapter){label}"):
        feats = torch.randn(1, int(ac.num_mel_bins), N_FRAMES)
        torch_to_onnx(encoder, (feats,), onnx_dir / "encoder.onnx", ["input_features"], ["encoder_output"],
                      {"input_features": {0: "B"}, "encoder_output": {0: "B"}}, opset)

    with timer.phase(f"onnx embed_tokens{label}"):
        ids = torch.randint(0, int(tc.vocab_size), (2, 3, 4), dtype=torch.int64)
        torch_to_onnx(embed, (ids,), onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
                      {"input_ids": {0: "N", 1: "K", 2: "T"}, "inputs_embeds": {0: "N", 1: "K", 2: "T"}}, opset)

    with timer.phase(f"onnx decoder_step{label}"):
        N, K, T, P = 2, 3, 4, 5
        args = (torch.randn(N, K, T, D), torch.tensor([P, 2], dtype=torch.int64),
                torch.randn(L, N, K, Hkv, P, dh).to(kv_dtype), torch.randn(L, N, K, Hkv, P, dh).to(kv_dtype))
        torch_to_onnx(
            step, args, onnx_dir / "decoder_step.onnx",
            ["inputs_embeds", "past_length", "past_k", "past_v"], ["logits", "new_k", "new_v"],
            {"inputs_embeds": {0: "N", 1: "K", 2: "T"}, "past_length": {0: "N"},
             "past_k": {1: "N", 2: "K", 4: "P"}, "past_v": {1: "N", 2: "K", 4: "P"},
             "logits": {0: "N", 1: "K"}, "new_k": {1: "N", 2: "K", 4: "T"}, "new_v": {1: "N", 2: "K", 4: "T"}},
            opset)


class OnnxGlmAsr:
    """The three graphs of one precision, run directly with ONNX Runtime (no Triton)."""

    def __init__(self, onnx_dir, info: dict, threads: int = 2):
        onnx_dir = Path(onnx_dir)
        self.encoder = ort_session(onnx_dir / "encoder.onnx", threads)
        self.embed = ort_session(onnx_dir / "embed_tokens.onnx", threads)
        self.step = ort_session(onnx_dir / "decoder_step.onnx", threads)
        self.info = info
        meta = {i.name: i for i in self.step.get_inputs()}["past_k"]
        self.kv_dtype = np.float16 if meta.type == "tensor(float16)" else np.float32

    def audio_embeddings(self, features: np.ndarray, n_tokens: int | None = None) -> np.ndarray:
        (out,) = self.encoder.run(["encoder_output"], {"input_features": features.astype(np.float32)})
        return out if n_tokens is None else out[:, :n_tokens]

    def prefill_embeds(self, ids: list[int], audio: np.ndarray) -> np.ndarray:
        """inputs_embeds [1, 1, T, D] of the prompt with the placeholders replaced by audio [A, D]."""
        arr = np.asarray(ids, np.int64)[None, None]
        (emb,) = self.embed.run(None, {"input_ids": arr})
        mask = arr[0, 0] == self.info["audio_token_id"]
        if int(mask.sum()) != audio.shape[0]:
            raise ValueError(f"{int(mask.sum())} placeholders for {audio.shape[0]} audio embeddings")
        emb = emb.astype(np.float32)
        emb[0, 0, mask] = audio
        return emb

    def empty_cache(self, k: int = 1):
        i = self.info
        z = np.zeros((i["n_layers"], 1, k, i["n_kv_heads"], 0, i["head_dim"]), self.kv_dtype)
        return z, z

    def run_step(self, embeds: np.ndarray, past_k, past_v):
        logits, nk, nv = self.step.run(None, {"inputs_embeds": embeds.astype(np.float32),
                                              "past_length": np.array([past_k.shape[4]], np.int64),
                                              "past_k": past_k, "past_v": past_v})
        return logits, np.concatenate([past_k, nk], axis=4), np.concatenate([past_v, nv], axis=4)

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        (emb,) = self.embed.run(None, {"input_ids": np.asarray(ids, np.int64)})
        return emb.astype(np.float32)

    def greedy(self, features: np.ndarray, prompt_ids: list[int], n_audio: int, max_new_tokens: int,
               suppress=()) -> tuple[list[int], list[np.ndarray]]:
        audio = self.audio_embeddings(features, n_audio)[0]
        pk, pv = self.empty_cache()
        logits, pk, pv = self.run_step(self.prefill_embeds(prompt_ids, audio), pk, pv)
        eos = set(self.info["eos_token_ids"])
        out, all_logits = [], []
        for _ in range(max_new_tokens):
            lg = logits[0, 0].astype(np.float64)
            all_logits.append(lg.copy())
            lg[list(suppress)] = -np.inf
            tok = int(np.argmax(lg))
            if tok in eos:
                break
            out.append(tok)
            logits, pk, pv = self.run_step(self.embed_ids([[[tok]]]), pk, pv)
        return out, all_logits


# --------------------------------------------------------------------------------------------
# verify


def _verify(model, processor, out: Path, info: dict, prompt: dict) -> dict:
    """ONNX vs torch on a prompt with audio: prefill + cached steps, per precision. Returns figures."""
    import torch

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(4.2 * SAMPLE_RATE))).astype(np.float32)
    inputs = processor.apply_transcription_request(audio)
    ids = inputs["input_ids"][0].tolist()
    n_audio = ids.count(info["audio_token_id"])
    feats = inputs["input_features"].numpy().astype(np.float32)
    steps = 8
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, suppress_tokens=info["eos_token_ids"])
    ref_tokens = gen.sequences[0, len(ids):].tolist()
    keep = np.ones(int(gen.scores[0].shape[-1]), bool)
    keep[info["eos_token_ids"]] = False  # -inf in torch's processed scores
    scale = max(float(np.abs(s[0].numpy()[keep]).max()) for s in gen.scores)
    figures = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        try:
            runner = OnnxGlmAsr(out / "onnx" / variant, info)
            tokens, logits = runner.greedy(feats, ids, n_audio, steps, suppress=info["eos_token_ids"])
        except Exception as e:  # noqa: BLE001 - fp16 may need a GPU provider; fp32 must run
            if variant == "fp32":
                raise
            log(f"  {variant}: ONNX Runtime on this CPU cannot run it ({str(e).splitlines()[0][:160]}); "
                "check it with a GPU execution provider")
            figures[variant] = None
            continue
        diffs = [float(np.abs(a[keep] - s[0].numpy()[keep]).max()) for a, s in zip(logits, gen.scores)]
        same = tokens == ref_tokens
        figures[variant] = {"max_abs_logit_diff": max(diffs), "logit_scale": scale, "same_greedy_tokens": same}
        log(f"  {variant}: greedy {steps} tokens {'same as' if same else 'DIFFER from'} torch generate, "
            f"max |logit diff| {max(diffs):.2e} (logits up to {scale:.1f}; {time.perf_counter() - t0:.1f}s)")
        if variant == "fp32" and max(diffs) > 5e-4 * max(1.0, scale):
            raise ExportError(f"fp32 ONNX disagrees with torch: max |logit diff| {max(diffs):.3g} for logits up to "
                              f"{scale:.3g} (tokens {tokens} vs {ref_tokens})")
    return figures


# --------------------------------------------------------------------------------------------
# driver


def _required_outputs() -> list[str]:
    req = ["model_info.json", "prompt.json", "tokenizer.json"]
    req += [f"onnx/{v}/{g}" for v in VARIANTS for g in ONNX_GRAPHS]
    return req


def _checkpoint_fingerprint(path: Path) -> dict:
    """Cheap identity of a checkpoint: small files hashed, weights by name/size/mtime."""
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if not p.is_file():
            continue
        st = p.stat()
        h.update(p.name.encode())
        if st.st_size < (4 << 20):
            h.update(p.read_bytes())
        else:
            h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    return {"path": str(path.resolve()), "sha256": h.hexdigest()}


def export(model_name: str, out, opset: int = DEFAULT_OPSET, force: bool = False, checkpoint=None,
           verify: bool = True, **_ignored) -> Path:
    if model_name not in MODEL_NAMES:
        raise ExportError(f"unknown GLM-ASR model {model_name!r}; known: {', '.join(MODEL_NAMES)}")
    out = Path(out)
    if model_name == "glm-asr-nano":
        if checkpoint is None:
            raise CheckpointError("glm-asr-nano needs its checkpoint directory: --checkpoint /path/to/GLM-ASR-Nano-2512 "
                                  "(make export MODEL=glm-asr-nano CHECKPOINT=/path/to/dir); it cannot be downloaded here")
        checkpoint = Path(checkpoint)
        check_checkpoint(checkpoint)  # fail fast, before anything slow
        source = _checkpoint_fingerprint(checkpoint)
    else:
        if checkpoint is not None:
            raise ExportError("glm-asr-tiny builds its own checkpoint; --checkpoint is for glm-asr-nano")
        checkpoint = out / "hf"
        source = {"tiny_seed": TINY_SEED}
    options = {"model": model_name, "opset": opset, "int8": INT8_OPTIONS, "int8_variants": INT8_VARIANTS,
               "fp16": FP16_OPTIONS, "source": source}
    packages = ["torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers", "safetensors"]
    stamp = compute_stamp(options, packages)
    required = _required_outputs() + (["hf/config.json", "hf/model.safetensors"] if model_name == "glm-asr-tiny" else [])
    if not force and stamp_matches(out, stamp, required):
        log(f"{out}: up to date (stamp {stamp[:12]})")
        return out

    import torch

    t_start = time.perf_counter()
    timer = PhaseTimer()
    out.mkdir(parents=True, exist_ok=True)
    clear_stamp(out)
    log(f"exporting {model_name} -> {out} (opset {opset}, checkpoint {checkpoint})")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if model_name == "glm-asr-tiny":
        with timer.phase("build tiny checkpoint"):
            build_tiny_checkpoint(checkpoint)
    with timer.phase("load checkpoint"):
        model, processor = load_reference(checkpoint)
    with timer.phase("prompt + model_info"):
        prompt = derive_prompt(processor, int(model.config.audio_token_id))
        info = model_info_for(model, processor, model_name, checkpoint.resolve(), prompt, opset)
        for name, data in (("prompt.json", prompt), ("model_info.json", info)):
            tmp = out / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, out / name)
        shutil.copyfile(checkpoint / "tokenizer.json", out / "tokenizer.json")
        log(f"  prompt: {prompt['prefix_text']!r} + {prompt['tokens_per_window']} x {prompt['audio_token']} + "
            f"{prompt['suffix_text']!r}; eos {info['eos_token_ids']}")

    export_onnx(model, out / "onnx" / "fp32", opset, timer)
    export_onnx(model, out / "onnx" / "fp16", opset, timer, half=True)
    with timer.phase("quantize int8"):
        gathers = {"embed_tokens": 0} if INT8_OPTIONS["int8_embedding_gather"] else {}
        for variant, changes in INT8_VARIANTS.items():
            quantize_graphs(out / "onnx" / "fp32", out / "onnx" / variant, ONNX_GRAPHS, {**INT8_OPTIONS, **changes},
                            encoder_layer="/layers.{}/", gather_min_elements=gathers)
    if verify:
        with timer.phase("verify"):
            _verify(model, processor, out, info, prompt)

    write_stamp(out, stamp)
    log(f"timings: {timer.summary()}")
    log("files:")
    report_sizes(out, [r for r in required if not r.startswith("hf/")])
    log(f"done in {time.perf_counter() - t_start:.1f}s")
    return out
