"""CTranslate2 Whisper weights -> an HF transformers checkpoint (WhisperForConditionalGeneration).

CTranslate2 fuses q/k/v of self-attention (``linear_0``) and k/v of cross-attention: they are
split in that order; the k bias is zero (HF has none). Special token ids come from the
tokenizer and the CT2 config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from .common import ExportError, log

# Whisper's feature extractor (written into the HF processor and model_info.json)
SAMPLE_RATE = 16000  # Hz
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH_S = 30


class WeightIntegrityError(ExportError):
    """The assembled weights do not look like the expected model."""



@dataclasses.dataclass
class SpecialTokens:
    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    lang_to_id: dict[str, int]  # "zh" -> 50260
    special_contents: list[str]  # all special added tokens in id order


def read_special_tokens(tokenizer_json: dict, ct2_config: dict) -> SpecialTokens:
    added = {a["content"]: a["id"] for a in tokenizer_json.get("added_tokens", [])}
    specials = sorted(
        ((a["id"], a["content"]) for a in tokenizer_json.get("added_tokens", []) if a.get("special")),
    )

    def need(*names):
        for n in names:
            if n in added:
                return added[n]
        raise WeightIntegrityError(f"tokenizer.json has none of the special tokens {names}")

    no_timestamps = need("<|notimestamps|>")
    lang_ids = ct2_config.get("lang_ids")
    id_to_content = {v: k for k, v in added.items()}
    if lang_ids:
        lang_to_id = {}
        for i in lang_ids:
            content = id_to_content.get(i)
            if content is None or not (content.startswith("<|") and content.endswith("|>")):
                raise WeightIntegrityError(f"language id {i} from ct2 config.json is not a <|xx|> token")
            lang_to_id[content[2:-2]] = int(i)
    else:  # derive: the tokens between <|startoftranscript|> and <|translate|>
        sot, tr = need("<|startoftranscript|>"), need("<|translate|>")
        lang_to_id = {id_to_content[i][2:-2]: i for i in range(sot + 1, tr) if i in id_to_content}
    return SpecialTokens(
        eot=need("<|endoftext|>"),
        sot=need("<|startoftranscript|>"),
        translate=need("<|translate|>"),
        transcribe=need("<|transcribe|>"),
        sot_lm=need("<|startoflm|>"),
        sot_prev=need("<|startofprev|>"),
        no_speech=need("<|nospeech|>", "<|nocaptions|>"),
        no_timestamps=no_timestamps,
        timestamp_begin=no_timestamps + 1,
        lang_to_id=lang_to_id,
        special_contents=[c for _, c in specials],
    )


def _split_rows(arr: np.ndarray, n: int) -> list[np.ndarray]:
    if arr.shape[0] % n:
        raise WeightIntegrityError(f"cannot split fused tensor of shape {arr.shape} into {n}")
    return np.split(arr, n, axis=0)


def ct2_to_hf_state_dict(m) -> tuple[dict, dict]:
    """Map a CTranslate2 WhisperSpec to HF WhisperForConditionalGeneration tensors (float32).

    Returns (state_dict of numpy arrays, dims dict)."""
    if m.spec != "WhisperSpec":
        raise WeightIntegrityError(f"model.bin holds a {m.spec!r}, expected 'WhisperSpec'")

    def t(name):
        return m[name].to_float32()

    def scalar(name, default=None):
        v = m.get(name)
        return default if v is None else int(v.data.reshape(-1)[0])

    def count_layers(prefix):
        n = 0
        while f"{prefix}/layer_{n}/ffn/linear_0/weight" in m:
            n += 1
        return n

    n_enc, n_dec = count_layers("encoder"), count_layers("decoder")
    conv1 = t("encoder/conv1/weight")
    emb = t("decoder/embeddings/weight")
    dims = {
        "n_mels": conv1.shape[1],
        "d_model": conv1.shape[0],
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_heads": scalar("encoder/num_heads"),
        "decoder_heads": scalar("decoder/num_heads"),
        "encoder_ffn": t("encoder/layer_0/ffn/linear_0/weight").shape[0],
        "decoder_ffn": t("decoder/layer_0/ffn/linear_0/weight").shape[0],
        "vocab_size": emb.shape[0],
        "max_source_positions": t("encoder/position_encodings/encodings").shape[0],
        "max_target_positions": t("decoder/position_encodings/encodings").shape[0],
    }
    # sanity: GELU (ctranslate2 ActivationType::GELU == 3), pre-norm, unscaled embeddings
    if scalar("decoder/activation", 3) != 3 or scalar("decoder/pre_norm", 1) != 1:
        raise WeightIntegrityError("unexpected activation/pre_norm flags in the CTranslate2 model")
    if scalar("decoder/scale_embeddings", 0) not in (0,):
        raise WeightIntegrityError("scaled embeddings are not supported")
    proj = m.get("decoder/projection/weight")
    if proj is not None and not np.array_equal(proj.data, m["decoder/embeddings/weight"].data):
        raise WeightIntegrityError("decoder projection is not tied to the embeddings")

    sd: dict[str, np.ndarray] = {}

    def ln(dst, src):
        sd[f"{dst}.weight"] = t(f"{src}/gamma")
        sd[f"{dst}.bias"] = t(f"{src}/beta")

    def lin(dst, src, bias=True):
        sd[f"{dst}.weight"] = t(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = t(f"{src}/bias")

    def fused(dst_names, src, n):
        ws = _split_rows(t(f"{src}/weight"), n)
        bs = _split_rows(t(f"{src}/bias"), n)
        for name, w, b in zip(dst_names, ws, bs):
            sd[f"{name}.weight"] = np.ascontiguousarray(w)
            if name.endswith("k_proj"):
                if np.abs(b).max() != 0.0:
                    raise WeightIntegrityError(f"{src}: non-zero key bias, HF Whisper has none")
            else:
                sd[f"{name}.bias"] = np.ascontiguousarray(b)

    def self_attention(d: str, s: str) -> None:  # HF layer d, CT2 layer s (encoder and decoder alike)
        fused([f"{d}.self_attn.q_proj", f"{d}.self_attn.k_proj", f"{d}.self_attn.v_proj"],
              f"{s}/self_attention/linear_0", 3)
        lin(f"{d}.self_attn.out_proj", f"{s}/self_attention/linear_1")
        ln(f"{d}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")

    def feed_forward(d: str, s: str) -> None:
        lin(f"{d}.fc1", f"{s}/ffn/linear_0")
        lin(f"{d}.fc2", f"{s}/ffn/linear_1")
        ln(f"{d}.final_layer_norm", f"{s}/ffn/layer_norm")

    e = "model.encoder"
    lin(f"{e}.conv1", "encoder/conv1")
    lin(f"{e}.conv2", "encoder/conv2")
    sd[f"{e}.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    for i in range(n_enc):
        s, d = f"encoder/layer_{i}", f"{e}.layers.{i}"
        self_attention(d, s)
        feed_forward(d, s)
    ln(f"{e}.layer_norm", "encoder/layer_norm")

    dd = "model.decoder"
    sd[f"{dd}.embed_tokens.weight"] = emb
    sd[f"{dd}.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    for i in range(n_dec):
        s, d = f"decoder/layer_{i}", f"{dd}.layers.{i}"
        self_attention(d, s)
        lin(f"{d}.encoder_attn.q_proj", f"{s}/attention/linear_0")
        fused([f"{d}.encoder_attn.k_proj", f"{d}.encoder_attn.v_proj"], f"{s}/attention/linear_1", 2)
        lin(f"{d}.encoder_attn.out_proj", f"{s}/attention/linear_2")
        ln(f"{d}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
        feed_forward(d, s)
    ln(f"{dd}.layer_norm", "decoder/layer_norm")
    return sd, dims


def _hf_tokenizer_json(ct2_dir: Path) -> dict:
    """tokenizer.json of the ct2 bundle plus the timestamp tokens <|0.00|>..<|30.00|> as
    (non-special) added tokens, as in OpenAI's HF tokenizers, so ids cover the whole vocab."""
    tok = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab_lines = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    have = {a["id"] for a in tok["added_tokens"]} | set(tok["model"]["vocab"].values())
    for i, content in enumerate(vocab_lines):
        if i not in have and content.startswith("<|") and content.endswith("|>"):
            tok["added_tokens"].append(
                {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": False}
            )
    return tok


def convert_to_hf(ct2_dir: Path, hf_dir: Path) -> tuple[dict, SpecialTokens]:
    """Convert ct2_dir into an HF checkpoint + processor in hf_dir. Returns (dims, special)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    from .ct2 import read_model

    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    m = read_model(ct2_dir / "model.bin")
    log(f"  model.bin: binary v{m.binary_version}, {m.spec} rev {m.revision}, {len(m.variables)} variables, "
        f"{len(m.aliases)} aliases, dtypes {sorted({v.dtype for v in m.variables.values()})}")
    sd, dims = ct2_to_hf_state_dict(m)
    del m

    hf_tok_json = _hf_tokenizer_json(ct2_dir)
    special = read_special_tokens(hf_tok_json, ct2_config)
    suppress = [int(x) for x in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(x) for x in ct2_config.get("suppress_ids_begin", [220, special.eot])]
    alignment_heads = [list(map(int, x)) for x in ct2_config.get("alignment_heads", [])]

    config = WhisperConfig(
        vocab_size=dims["vocab_size"],
        num_mel_bins=dims["n_mels"],
        encoder_layers=dims["encoder_layers"],
        encoder_attention_heads=dims["encoder_heads"],
        decoder_layers=dims["decoder_layers"],
        decoder_attention_heads=dims["decoder_heads"],
        encoder_ffn_dim=dims["encoder_ffn"],
        decoder_ffn_dim=dims["decoder_ffn"],
        d_model=dims["d_model"],
        max_source_positions=dims["max_source_positions"],
        max_target_positions=dims["max_target_positions"],
        decoder_start_token_id=special.sot,
        pad_token_id=special.eot,
        bos_token_id=special.eot,
        eos_token_id=special.eot,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        scale_embedding=False,
        activation_function="gelu",
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise WeightIntegrityError(f"weight mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight

    gen = GenerationConfig(
        decoder_start_token_id=special.sot,
        bos_token_id=special.eot,
        eos_token_id=special.eot,
        pad_token_id=special.eot,
        max_length=dims["max_target_positions"],
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=special.no_timestamps,
        prev_sot_token_id=special.sot_prev,
        is_multilingual=len(special.lang_to_id) > 1,
        lang_to_id={f"<|{k}|>": v for k, v in special.lang_to_id.items()},
        task_to_id={"transcribe": special.transcribe, "translate": special.translate},
        alignment_heads=alignment_heads,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    model.generation_config = gen

    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    gen.save_pretrained(hf_dir)
    for f in hf_dir.glob("*.safetensors"):
        f.chmod(0o644)

    tmp_tok = hf_dir / "_tokenizer_src"
    tmp_tok.mkdir(exist_ok=True)
    (tmp_tok / "tokenizer.json").write_text(json.dumps(hf_tok_json, ensure_ascii=False), encoding="utf-8")
    tokenizer = WhisperTokenizer.from_pretrained(
        tmp_tok,
        extra_special_tokens=[c for c in special.special_contents if c != "<|endoftext|>"],
        model_max_length=dims["max_target_positions"],
    )
    shutil.rmtree(tmp_tok)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=dims["n_mels"],
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=CHUNK_LENGTH_S,
        n_fft=N_FFT,
    )
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(hf_dir)
    info = dict(dims, suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
                alignment_heads=alignment_heads)
    return info, special
