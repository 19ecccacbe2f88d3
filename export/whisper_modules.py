"""Torch modules exported to ONNX for the whisper family (see docs/INTERFACES.md).

* ``WhisperEncoderWrapper``: input_features [B, n_mels, 3000] -> encoder_output [B, S, d]
  (the HF encoder itself, eager attention).
* ``WhisperCrossKV``: encoder_output [N, S, d] -> cross_k, cross_v [L, N, H, S, dh]
  (all layers' cross-attention K/V projections in one matmul).
* ``WhisperDecoderStep``: one decoder step with explicit self-attention caches.

The decoder modules copy the weights of a ``WhisperForConditionalGeneration`` and implement
the Whisper decoder directly, so the graph is small and has no HF cache classes in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _arange_like(t: torch.Tensor) -> torch.Tensor:
    """0..len(t)-1 as int64, traced from a 1-D tensor's length (works for length 0)."""
    return torch.cumsum(torch.ones_like(t, dtype=torch.int64), 0) - 1


class WhisperEncoderWrapper(nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.encoder = hf_model.model.encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features, return_dict=True).last_hidden_state


class WhisperCrossKV(nn.Module):
    """Cross-attention keys/values of every decoder layer, computed once per sequence."""

    def __init__(self, hf_model):
        super().__init__()
        cfg = hf_model.config
        layers = hf_model.model.decoder.layers
        self.n_layers = len(layers)
        self.n_heads = cfg.decoder_attention_heads
        self.d_model = cfg.d_model
        self.head_dim = self.d_model // self.n_heads
        wk = [layer.encoder_attn.k_proj.weight.detach() for layer in layers]  # [d, d] each (out, in)
        wv = [layer.encoder_attn.v_proj.weight.detach() for layer in layers]
        bv = [layer.encoder_attn.v_proj.bias.detach() for layer in layers]
        # [d_in, 2 * L * d_out]; k has no bias in Whisper.
        w = torch.cat(wk + wv, dim=0).t().contiguous()
        b = torch.cat([torch.zeros(self.n_layers * self.d_model, dtype=w.dtype)] + bv, dim=0)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, encoder_output: torch.Tensor):
        n, s, _ = encoder_output.shape
        kv = torch.matmul(encoder_output, self.weight) + self.bias  # [N, S, 2*L*d]
        kv = kv.reshape(n, s, 2, self.n_layers, self.n_heads, self.head_dim)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [2, L, N, H, S, dh]
        return kv[0], kv[1]


class _LayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().clone(), requires_grad=False)
        self.eps = ln.eps
        self.shape = (int(ln.weight.shape[0]),)

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _Linear(nn.Module):
    """x @ W + b with W stored as [in, out] (one MatMul with a constant B in ONNX; node names
    carry the module name, e.g. /layers.0/fc2/MatMul, which the int8 quantizer relies on)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)

    @classmethod
    def from_linears(cls, linears, scales=None):
        """Fuse nn.Linear modules along the output dim (a missing bias counts as zero)."""
        scales = scales or [1.0] * len(linears)
        ws, bs = [], []
        for lin, sc in zip(linears, scales):
            w = lin.weight.detach()
            ws.append(w.t() * sc)
            b = lin.bias.detach() if lin.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            bs.append(b * sc)
        return cls(torch.cat(ws, dim=1), torch.cat(bs, dim=0))

    def forward(self, x):
        return torch.matmul(x, self.weight) + self.bias


class _DecoderLayer(nn.Module):
    def __init__(self, layer, n_heads: int):
        super().__init__()
        d = layer.self_attn.q_proj.weight.shape[0]
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        scaling = self.head_dim**-0.5
        sa, ca = layer.self_attn, layer.encoder_attn
        self.self_ln = _LayerNorm(layer.self_attn_layer_norm)
        self.qkv = _Linear.from_linears([sa.q_proj, sa.k_proj, sa.v_proj], [scaling, 1.0, 1.0])
        self.self_out = _Linear.from_linears([sa.out_proj])
        self.cross_ln = _LayerNorm(layer.encoder_attn_layer_norm)
        self.cross_q = _Linear.from_linears([ca.q_proj], [scaling])
        self.cross_out = _Linear.from_linears([ca.out_proj])
        self.ffn_ln = _LayerNorm(layer.final_layer_norm)
        self.fc1 = _Linear.from_linears([layer.fc1])
        self.fc2 = _Linear.from_linears([layer.fc2])

    def forward(self, x, past_k, past_v, self_mask, cross_k, cross_v):
        # x [N, K, T, d]; past_k/v [N, K, H, P, dh]; self_mask [N, 1, 1, T, P+T] (bool, True = attend)
        # cross_k/v [N, H, S, dh]
        n, k, t, d = x.shape
        h, dh = self.n_heads, self.head_dim

        # self-attention
        qkv = self.qkv(self.self_ln(x))  # [N, K, T, 3d]
        qkv = qkv.reshape(n, k, t, 3, h, dh).permute(3, 0, 1, 4, 2, 5)  # [3, N, K, H, T, dh]
        q, new_k, new_v = qkv[0], qkv[1], qkv[2]
        keys = torch.cat([past_k, new_k], dim=3)  # [N, K, H, P+T, dh]
        values = torch.cat([past_v, new_v], dim=3)
        scores = torch.matmul(q, keys.transpose(-1, -2))  # [N, K, H, T, P+T]
        scores = scores.masked_fill(self_mask.logical_not(), float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, values)  # [N, K, H, T, dh]
        ctx = ctx.permute(0, 1, 3, 2, 4).reshape(n, k, t, d)
        x = x + self.self_out(ctx)

        # cross-attention: the K beams of a sequence share its cross K/V (K*T folded into queries)
        q = self.cross_q(self.cross_ln(x))  # [N, K, T, d]
        q = q.reshape(n, k * t, h, dh).transpose(1, 2)  # [N, H, K*T, dh]
        scores = torch.matmul(q, cross_k.transpose(-1, -2))  # [N, H, K*T, S]
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, cross_v)  # [N, H, K*T, dh]
        ctx = ctx.transpose(1, 2).reshape(n, k, t, d)
        x = x + self.cross_out(ctx)

        # feed-forward
        x = x + self.fc2(F.gelu(self.fc1(self.ffn_ln(x))))
        return x, new_k, new_v


class WhisperDecoderStep(nn.Module):
    """(input_ids, past_length, past_k, past_v, cross_k, cross_v) -> (logits, new_k, new_v).

    Shapes as in docs/INTERFACES.md:
    input_ids [N, K, T] i64, past_length [N] i64, past_k/v [L, N, K, H, P, dh],
    cross_k/v [L, N, H, S, dh] -> logits [N, K, V] (last new position), new_k/v [L, N, K, H, T, dh].
    """

    def __init__(self, hf_model):
        super().__init__()
        cfg = hf_model.config
        dec = hf_model.model.decoder
        self.n_layers = len(dec.layers)
        self.n_heads = cfg.decoder_attention_heads
        self.d_model = cfg.d_model
        self.head_dim = self.d_model // self.n_heads
        self.embed_scale = (self.d_model**0.5) if getattr(cfg, "scale_embedding", False) else 1.0
        # One [d, V] matrix serves the token lookup (gather on axis 1) and the tied output
        # projection (x @ W), so the ONNX file stores the vocabulary matrix once.
        out_w = hf_model.get_output_embeddings().weight.detach()
        in_w = dec.embed_tokens.weight.detach()
        if out_w.data_ptr() != in_w.data_ptr() and not torch.equal(out_w, in_w):
            raise ValueError("WhisperDecoderStep expects tied input/output embeddings")
        self.vocab_t = nn.Parameter(in_w.t().contiguous(), requires_grad=False)  # [d, V]
        self.pos_embed = nn.Parameter(dec.embed_positions.weight.detach().clone(), requires_grad=False)
        self.layers = nn.ModuleList(_DecoderLayer(layer, self.n_heads) for layer in dec.layers)
        self.final_ln = _LayerNorm(dec.layer_norm)

    def forward(self, input_ids, past_length, past_k, past_v, cross_k, cross_v):
        n, k, t = input_ids.shape
        d = self.d_model

        tok = torch.index_select(self.vocab_t, 1, input_ids.reshape(-1))  # [d, N*K*T]
        x = tok.t().reshape(n, k, t, d)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        new_pos = _arange_like(input_ids[0, 0])  # [T]
        positions = past_length.unsqueeze(1) + new_pos.unsqueeze(0)  # [N, T]
        x = x + F.embedding(positions, self.pos_embed).unsqueeze(1)  # [N, 1, T, d]

        # mask [N, 1, 1, T, P+T]: valid past (p < past_length[n]) + causal among new tokens
        past_pos = _arange_like(past_k[0, 0, 0, 0, :, 0])  # [P]
        past_ok = past_pos.unsqueeze(0) < past_length.unsqueeze(1)  # [N, P]
        past_ok = past_ok.unsqueeze(1).expand(n, t, past_ok.shape[1])  # [N, T, P]
        causal = new_pos.unsqueeze(0) <= new_pos.unsqueeze(1)  # [T(query), T(key)]
        causal = causal.unsqueeze(0).expand(n, t, t)
        mask = torch.cat([past_ok, causal], dim=2).unsqueeze(1).unsqueeze(1)

        new_ks = []
        new_vs = []
        for i, layer in enumerate(self.layers):
            x, nk, nv = layer(x, past_k[i], past_v[i], mask, cross_k[i], cross_v[i])
            new_ks.append(nk)
            new_vs.append(nv)

        last = self.final_ln(x[:, :, -1, :])  # [N, K, d]
        logits = torch.matmul(last, self.vocab_t)  # [N, K, V]
        return logits, torch.stack(new_ks, 0), torch.stack(new_vs, 0)
