"""Torch modules exported to ONNX for the glm_asr family (GLM-ASR-Nano-2512; docs/INTERFACES.md).

* ``GlmAsrAudioEncoder``: input_features [B, n_mels, 3000] -> encoder_output [B, A, D]
  (the HF audio tower, 4-frame merge and the adapter MLP: audio embeddings in the LLM space).
* ``GlmAsrEmbedTokens``: input_ids [N, K, T] -> inputs_embeds [N, K, T, D] (the LLM token table).
* ``GlmAsrDecoderStep``: one Llama decoder step over ``inputs_embeds`` with an explicit KV cache
  (GQA: the cache holds the KV heads only), the final RMSNorm and the LM head of the last position.

The decoder step copies the weights of a ``GlmAsrForConditionalGeneration`` and implements the
Llama decoder directly (no HF cache classes in the graph), with the same arithmetic as
``transformers.models.llama`` (RMSNorm in float32, rotate-half RoPE with float32 cos/sin,
softmax in float32). Node names carry module names (``/layers.3/down_proj/MatMul``) so the
INT8 quantizer can keep chosen projections in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _arange_like(t: torch.Tensor) -> torch.Tensor:
    """0..len(t)-1 as int64, traced from a 1-D tensor's length (works for length 0)."""
    return torch.cumsum(torch.ones_like(t, dtype=torch.int64), 0) - 1


def text_config(hf_model):
    return hf_model.config.text_config


def audio_config(hf_model):
    return hf_model.config.audio_config


class GlmAsrAudioEncoder(nn.Module):
    """Audio tower + frame merge + projector: what GlmAsrModel.get_audio_features computes before
    it drops the padding tokens (the caller keeps the first n_audio_tokens(n_samples) rows)."""

    def __init__(self, hf_model):
        super().__init__()
        self.audio_tower = hf_model.model.audio_tower
        self.multi_modal_projector = hf_model.model.multi_modal_projector
        self.merged = int(audio_config(hf_model).intermediate_size)
        self.dtype = self.multi_modal_projector.linear_1.weight.dtype

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        x = input_features.to(self.dtype)  # (float32 I/O also for a float16 graph)
        h = self.audio_tower(x, return_dict=True).last_hidden_state  # [B, S, d_enc]
        h = h.reshape(h.shape[0], -1, self.merged)  # [B, S / merge, merge * d_enc]
        return self.multi_modal_projector(h).to(torch.float32)


class GlmAsrEmbedTokens(nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        w = hf_model.get_input_embeddings().weight.detach()
        self.weight = nn.Parameter(w.clone(), requires_grad=False)  # [V, D]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(torch.float32)


class _Linear(nn.Module):
    """x @ W (+ b) with W stored as [in, out]: one MatMul with a constant B in ONNX."""

    def __init__(self, linears):
        super().__init__()
        ws, bs, any_bias = [], [], False
        for lin in linears:
            w = lin.weight.detach()
            ws.append(w.t())
            if lin.bias is not None:
                any_bias = True
                bs.append(lin.bias.detach())
            else:
                bs.append(torch.zeros(w.shape[0], dtype=w.dtype))
        self.weight = nn.Parameter(torch.cat(ws, dim=1).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(torch.cat(bs).contiguous(), requires_grad=False) if any_bias else None

    def forward(self, x):
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class _RMSNorm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x, cos, sin, rot: int, full: bool):
    if full:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * cos + _rotate_half(xr) * sin, xp], dim=-1)


class _LlamaLayer(nn.Module):
    def __init__(self, layer, n_heads: int, n_kv_heads: int, head_dim: int, rot: int):
        super().__init__()
        sa, mlp = layer.self_attn, layer.mlp
        self.h, self.hkv, self.dh, self.rot = n_heads, n_kv_heads, head_dim, rot
        self.g = n_heads // n_kv_heads
        self.scaling = float(getattr(sa, "scaling", head_dim**-0.5))
        self.input_layernorm = _RMSNorm(layer.input_layernorm)
        self.qkv_proj = _Linear([sa.q_proj, sa.k_proj, sa.v_proj])
        self.o_proj = _Linear([sa.o_proj])
        self.post_attention_layernorm = _RMSNorm(layer.post_attention_layernorm)
        self.gate_up_proj = _Linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = _Linear([mlp.down_proj])
        self.inter = int(mlp.gate_proj.weight.shape[0])

    def forward(self, x, cos, sin, past_k, past_v, mask):
        # x [N, K, T, D]; cos/sin [N, 1, 1, T, rot] (broadcast over K and heads);
        # past_k/v [N, K, Hkv, P, dh]; mask [N, 1, 1, 1, T, P+T] (bool, True = attend)
        n, k, t, _ = x.shape
        h, hkv, g, dh = self.h, self.hkv, self.g, self.dh
        full = self.rot == dh

        qkv = self.qkv_proj(self.input_layernorm(x))  # [N, K, T, (H + 2 Hkv) dh]
        q = qkv[..., : h * dh].reshape(n, k, t, hkv, g, dh).permute(0, 1, 3, 4, 2, 5)  # [N, K, Hkv, G, T, dh]
        new_k = qkv[..., h * dh:(h + hkv) * dh].reshape(n, k, t, hkv, dh).permute(0, 1, 3, 2, 4)  # [N,K,Hkv,T,dh]
        new_v = qkv[..., (h + hkv) * dh:].reshape(n, k, t, hkv, dh).permute(0, 1, 3, 2, 4)
        q = _apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2), self.rot, full)
        new_k = _apply_rope(new_k, cos, sin, self.rot, full)

        keys = torch.cat([past_k, new_k], dim=3)  # [N, K, Hkv, P+T, dh]
        values = torch.cat([past_v, new_v], dim=3)
        # the G query heads of a KV head are folded into the query axis: no repeat of the cache
        scores = torch.matmul(q.reshape(n, k, hkv, g * t, dh), keys.transpose(-1, -2)) * self.scaling
        scores = scores.reshape(n, k, hkv, g, t, -1).to(torch.float32)
        scores = scores.masked_fill(mask.logical_not(), float("-inf"))
        attn = torch.softmax(scores, dim=-1).to(values.dtype)
        ctx = torch.matmul(attn.reshape(n, k, hkv, g * t, -1), values)  # [N, K, Hkv, G*T, dh]
        ctx = ctx.reshape(n, k, hkv, g, t, dh).permute(0, 1, 4, 2, 3, 5).reshape(n, k, t, h * dh)
        x = x + self.o_proj(ctx)

        gu = self.gate_up_proj(self.post_attention_layernorm(x))
        x = x + self.down_proj(F.silu(gu[..., : self.inter]) * gu[..., self.inter:])
        return x, new_k, new_v


class GlmAsrDecoderStep(nn.Module):
    """(inputs_embeds, past_length, past_k, past_v) -> (logits, new_k, new_v).

    inputs_embeds [N, K, T, D] f32, past_length [N] i64, past_k/v [L, N, K, Hkv, P, dh]
    -> logits [N, K, V] (last new position), new_k/v [L, N, K, Hkv, T, dh].
    Token t of sequence n sits at position past_length[n] + t; cached positions >= past_length[n]
    are padding and masked; new tokens attend causally to each other.
    """

    def __init__(self, hf_model):
        super().__init__()
        cfg = text_config(hf_model)
        lm = hf_model.model.language_model
        self.n_layers = len(lm.layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported Llama MLP activation {cfg.hidden_act!r} (expected silu)")
        rope = lm.rotary_emb
        rope_type = getattr(rope, "rope_type", "default")
        if str(rope_type).startswith("dynamic") or rope_type == "longrope":
            raise ValueError(f"RoPE type {rope_type!r} depends on the sequence length; not exportable as a step graph")
        inv_freq = rope.inv_freq.detach().to(torch.float32).clone()
        self.inv_freq = nn.Parameter(inv_freq, requires_grad=False)  # [rot / 2]
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self.rot = 2 * int(inv_freq.numel())
        self.layers = nn.ModuleList(
            _LlamaLayer(layer, self.n_heads, self.n_kv_heads, self.head_dim, self.rot) for layer in lm.layers
        )
        self.norm = _RMSNorm(lm.norm)
        w = hf_model.get_output_embeddings().weight.detach()  # [V, D]
        self.lm_head = nn.Parameter(w.t().contiguous(), requires_grad=False)  # [D, V]

    def forward(self, inputs_embeds, past_length, past_k, past_v):
        x = inputs_embeds.to(self.lm_head.dtype)  # float32 input; the cache has the graph's dtype
        n, k, t, _ = x.shape

        new_pos = _arange_like(x[0, 0, :, 0])  # [T]
        positions = (past_length.unsqueeze(1) + new_pos.unsqueeze(0)).to(torch.float32)  # [N, T]
        freqs = positions.unsqueeze(-1) * self.inv_freq  # [N, T, rot/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype).unsqueeze(1).unsqueeze(1)  # [N, 1, 1, T, rot]
        sin = (emb.sin() * self.rope_scale).to(x.dtype).unsqueeze(1).unsqueeze(1)

        # mask [N, 1, 1, 1, T, P+T]: valid past (p < past_length[n]) + causal among the new tokens
        past_pos = _arange_like(past_k[0, 0, 0, 0, :, 0])  # [P]
        past_ok = past_pos.unsqueeze(0) < past_length.unsqueeze(1)  # [N, P]
        past_ok = past_ok.unsqueeze(1).expand(n, t, past_ok.shape[1])  # [N, T, P]
        causal = new_pos.unsqueeze(0) <= new_pos.unsqueeze(1)  # [T(query), T(key)]
        causal = causal.unsqueeze(0).expand(n, t, t)
        mask = torch.cat([past_ok, causal], dim=2).unsqueeze(1).unsqueeze(1).unsqueeze(1)

        new_ks, new_vs = [], []
        for i, layer in enumerate(self.layers):
            x, nk, nv = layer(x, cos, sin, past_k[i], past_v[i], mask)
            new_ks.append(nk)
            new_vs.append(nv)
        last = self.norm(x[:, :, -1, :])  # [N, K, D]
        logits = torch.matmul(last, self.lm_head).to(torch.float32)  # [N, K, V]
        return logits, torch.stack(new_ks, 0), torch.stack(new_vs, 0)


def half_copy(hf_model):
    """A float16 copy of the HF model whose RoPE frequencies stay float32 (fp16 would round
    them by up to 5e-4 relative: most of a radian at position 1500)."""
    import copy

    half = copy.deepcopy(hf_model).half()
    fp32 = dict(hf_model.named_buffers())
    for name, buf in half.named_buffers():
        if name.endswith("inv_freq") and name in fp32:
            buf.data = fp32[name].detach().to(torch.float32).clone()
    return half.eval()


def load_step_modules(hf_model):
    """(audio encoder, token embedding, decoder step) torch modules in eval mode."""
    return (
        GlmAsrAudioEncoder(hf_model).eval(),
        GlmAsrEmbedTokens(hf_model).eval(),
        GlmAsrDecoderStep(hf_model).eval(),
    )
