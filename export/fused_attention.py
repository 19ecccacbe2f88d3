"""Encoder self-attention as one fused operator: a graph rewrite of the int8 encoder.onnx.

The exported encoder computes each layer's self-attention as Reshape/Transpose of q, k and v,
MatMul(q, k^T), a scale, Softmax and MatMul(p, v), then Transpose/Reshape back. For a 30 s
window that materializes an [N, 8, 1500, 1500] float score tensor per layer (72 MB per window)
and reads it three times; in the int8 encoder those float products and the Softmax were about
two thirds of ONNX Runtime's kernel time (`python -m bench.step_profile`, its encoder profile).
ONNX Runtime's contrib MultiHeadAttention computes the same thing in blocks without the score
tensor (its CPU kernel uses flash attention when there is no mask or bias), from q, k, v in
[N, S, d] and the product of the scales as its `scale`. The arithmetic is the same float
arithmetic in another order (tests/test_fused_attention.py: a synthetic chain within 1e-5, the
fp32 encoder on a real call within 2e-3 of its output's scale).

The rewrite replaces exactly that chain and nothing else; a layer that does not have it is left
as it is, and a graph in which no layer has it is refused, so a change of the exporter shows up
at export time instead of as a silently slower encoder.
"""

from __future__ import annotations

from .graph_edit import GraphRewriteError, consumers, drop_dead_nodes, producers, scalar_constant, topological_sort

CONTRIB_DOMAIN = "com.microsoft"
Q_PERM = [0, 2, 1, 3]   # [N, S, H, dh] -> [N, H, S, dh]: queries, values and the context back
K_PERM = [0, 2, 3, 1]   # [N, S, H, dh] -> [N, H, dh, S]: keys, the scores' right operand


class AttentionFusionError(GraphRewriteError):
    """The encoder has no self-attention of the form this rewrite fuses."""


def _perm(node) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


class _Chain:
    """Matches one attention chain from its Softmax; None where the graph differs anywhere."""

    def __init__(self, graph):
        self.graph = graph
        self.produced = producers(graph)
        self.users = consumers(graph)
        self.graph_outputs = {o.name for o in graph.output}

    def op(self, tensor: str, op_type: str):
        node = self.produced.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def only_user(self, tensor: str, op_type: str):
        found = self.users.get(tensor, [])
        if tensor in self.graph_outputs or len(found) != 1 or found[0].op_type != op_type:
            return None
        return found[0]

    def private(self, *tensors: str) -> bool:
        """Each tensor is read by one node of the chain and by nothing else."""
        return all(tensor not in self.graph_outputs and len(self.users.get(tensor, [])) == 1 for tensor in tensors)

    def strip_scale(self, tensor: str) -> tuple[str, float]:
        """A Mul by a scalar constant in front of `tensor`: (its other input, the scalar)."""
        mul = self.op(tensor, "Mul")
        if mul is None:
            return tensor, 1.0
        for i in (0, 1):
            value = scalar_constant(self.graph, mul.input[1 - i], self.produced)
            if value is not None:
                return mul.input[i], value
        return tensor, 1.0

    def heads_input(self, tensor: str, perm: list[int]) -> str | None:
        """The [N, S, d] tensor that Reshape + Transpose(perm) split into heads."""
        transpose = self.op(tensor, "Transpose")
        if transpose is None or _perm(transpose) != perm:
            return None
        reshape = self.op(transpose.input[0], "Reshape")
        return reshape.input[0] if reshape is not None else None

    def match(self, softmax) -> dict | None:
        scores, scale = self.strip_scale(softmax.input[0])
        product = self.op(scores, "MatMul")
        if product is None:
            return None
        q_heads = self.heads_input(product.input[0], Q_PERM)
        k = self.heads_input(product.input[1], K_PERM)
        if q_heads is None or k is None:
            return None
        q, q_scale = self.strip_scale(q_heads)
        context = self.only_user(softmax.output[0], "MatMul")
        if context is None or context.input[0] != softmax.output[0]:
            return None
        v = self.heads_input(context.input[1], Q_PERM)
        merge = self.only_user(context.output[0], "Transpose")
        if v is None or merge is None or _perm(merge) != Q_PERM:
            return None
        out = self.only_user(merge.output[0], "Reshape")
        if out is None or not self.private(scores, product.input[0], product.input[1], context.input[1]):
            return None
        return {"q": q, "k": k, "v": v, "scale": scale * q_scale, "output": out.output[0], "name": softmax.name}


def fuse_self_attention(model, num_heads: int) -> int:
    """Replace every matched self-attention chain of `model` by MultiHeadAttention; returns the
    layers fused. The chains' other nodes (the shape arithmetic of the reshapes) go with them."""
    from onnx import helper

    graph = model.graph
    chain = _Chain(graph)
    sites = [site for site in (chain.match(n) for n in graph.node if n.op_type == "Softmax") if site]
    if not sites:
        raise AttentionFusionError("no self-attention chain MatMul(q, k^T) -> Softmax -> MatMul(., v) found")
    for site in sites:
        # the old chain's last Reshape wrote site["output"]; the fused node writes it now
        old = chain.produced[site["output"]]
        old.output[0] = f"{site['output']}/unfused"
        graph.node.append(helper.make_node(
            "MultiHeadAttention", [site["q"], site["k"], site["v"]], [site["output"]],
            name=f"{site['name']}/fused", domain=CONTRIB_DOMAIN, num_heads=num_heads, scale=site["scale"]))
    drop_dead_nodes(graph)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    del graph.value_info[:]  # shapes of the removed tensors
    topological_sort(graph)
    return len(sites)


def fuse_encoder_attention(onnx_dir, num_heads: int) -> int:
    """Rewrite encoder.onnx of one variant directory in place; returns the layers fused."""
    from pathlib import Path

    from .onnx_tools import load_onnx, save_onnx

    path = Path(onnx_dir) / "encoder.onnx"
    model = load_onnx(path)
    layers = fuse_self_attention(model, num_heads)
    save_onnx(model, path)
    return layers
