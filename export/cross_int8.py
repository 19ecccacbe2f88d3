"""Cross-attention over 8-bit K/V (Whisper int8 variant): a graph rewrite of decoder_init and
decoder_step.

On a CPU the decoder step is bound by reading each sequence's cross-attention K/V: 2 x 6 layers
x 1,500 frames x 512 floats, 37 MB for Whisper base, read again on every step and shared by
nothing (bench/step_profile.py: the attention matmuls are 57% of a 4-window step). Stored as
uint8 with one scale per frame (K) or per channel (V) they are a quarter of that, and the two
attention products run as MatMulInteger: about half the time of the float matmuls, and a
quarter of the memory of every sequence in flight.

The rewritten graphs (docs/INTERFACES.md):

* decoder_init: encoder_output [N, S, d] -> cross_k u8 [L, N, H, dh, S] (transposed: the
  scores' right operand), cross_k_scale f32 [L, N, H, 1, S], cross_v u8 [L, N, H, S, dh],
  cross_v_scale f32 [L, N, H, 1, dh]. Symmetric, zero point 128: k = (k_u8 - 128) * scale.
* decoder_step: the same four inputs instead of the float cross_k / cross_v. Per layer:
  scores = (q_u8 - 128) . (k_u8 - 128) * q_scale * k_scale, with q quantized per row (one
  query of one head of one beam: never per batch, so a window's result does not depend on what
  it is batched with); e = exp(scores - max) in (0, 1], quantized with the fixed scale 1/255;
  context = sum(e_u8 * (v_u8 - 128)) * v_scale / sum(e_u8) (the weights the product used, so
  they sum to one).

Both products are U8U8: ONNX Runtime's U8U8 kernels widen to 16 bits before multiplying
(``vpmaddwd``), so unlike U8S8 on AVX2 without VNNI nothing saturates (export/int8.py) and
the full 8-bit range is safe on every x86 CPU.
"""

from __future__ import annotations

from .graph_edit import GraphRewriteError, consumers, drop_dead_nodes, producers, topological_sort

Q_MAX = 127.0         # symmetric 8-bit range of K, V and the queries around the zero point
ZERO_POINT = 128      # uint8 zero point of K, V and the queries
E_LEVELS = 255.0      # levels of the attention weights exp(s - max) in (0, 1]
CROSS_INPUTS = ("cross_k", "cross_k_scale", "cross_v", "cross_v_scale")


class CrossRewriteError(GraphRewriteError):
    """The graph does not have the cross-attention pattern this rewrite expects."""


def _constants(graph, prefix: str):
    from onnx import TensorProto, helper

    names = {
        "q_max": (TensorProto.FLOAT, Q_MAX), "zp_f": (TensorProto.FLOAT, float(ZERO_POINT)),
        "zp_u8": (TensorProto.UINT8, ZERO_POINT), "zero_u8": (TensorProto.UINT8, 0),
        "tiny": (TensorProto.FLOAT, 1e-30), "inv_levels": (TensorProto.FLOAT, 1.0 / E_LEVELS),
    }
    out = {}
    for key, (dtype, value) in names.items():
        name = f"{prefix}{key}"
        graph.initializer.append(helper.make_tensor(name, dtype, [], [value]))
        out[key] = name
    graph.initializer.append(helper.make_tensor(f"{prefix}last_axis", TensorProto.INT64, [1], [-1]))
    out["last_axis"] = f"{prefix}last_axis"
    return out


def _quantize_nodes(x: str, axis: int, name: str, c: dict):
    """Nodes quantizing float x symmetrically to uint8 (zero point 128) with one scale per slice
    along `axis` (reduced with keepdims): returns (nodes, uint8 name, scale name)."""
    from onnx import TensorProto, helper

    n = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=f"{name}/{op}_{outs[0].split('/')[-1]}", **kw)
    p = f"{name}/"
    nodes = [
        n("Abs", [x], [p + "abs"]),
        n("ReduceMax", [p + "abs"], [p + "amax"], axes=[axis], keepdims=1),
        n("Max", [p + "amax", c["tiny"]], [p + "amax_pos"]),
        n("Div", [p + "amax_pos", c["q_max"]], [p + "scale"]),
        n("Div", [x, p + "scale"], [p + "ratio"]),
        n("Round", [p + "ratio"], [p + "rounded"]),
        n("Add", [p + "rounded", c["zp_f"]], [p + "shifted"]),
        n("Cast", [p + "shifted"], [p + "u8"], to=TensorProto.UINT8),
    ]
    return nodes, p + "u8", p + "scale"


def rewrite_init(model) -> None:
    """decoder_init: float cross_k / cross_v outputs [L, N, H, S, dh] -> the four 8-bit outputs."""
    from onnx import TensorProto, helper

    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    if set(outputs) != {"cross_k", "cross_v"}:
        raise CrossRewriteError(f"decoder_init outputs {sorted(outputs)}, expected cross_k and cross_v")
    c = _constants(graph, "cross_q8/")
    produced = producers(graph)
    rename = {}
    for name in ("cross_k", "cross_v"):
        float_name = f"{name}_float"
        rename[name] = float_name
        node = produced[name]
        node.output[list(node.output).index(name)] = float_name
    nodes = []
    # K: one scale per frame (over dh), stored transposed [L, N, H, dh, S]
    kn, k_u8, k_scale = _quantize_nodes(rename["cross_k"], -1, "cross_q8/k", c)
    nodes += kn
    nodes.append(helper.make_node("Transpose", [k_u8], ["cross_k"], name="cross_q8/k/T", perm=[0, 1, 2, 4, 3]))
    nodes.append(helper.make_node("Transpose", [k_scale], ["cross_k_scale"], name="cross_q8/k/scale_T",
                                  perm=[0, 1, 2, 4, 3]))
    # V: one scale per channel (over the frames), [L, N, H, S, dh]
    vn, v_u8, v_scale = _quantize_nodes(rename["cross_v"], -2, "cross_q8/v", c)
    nodes += vn
    nodes.append(helper.make_node("Identity", [v_u8], ["cross_v"], name="cross_q8/v/out"))
    nodes.append(helper.make_node("Identity", [v_scale], ["cross_v_scale"], name="cross_q8/v/scale_out"))
    graph.node.extend(nodes)
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in outputs["cross_k"].type.tensor_type.shape.dim]
    L, N, H, S, dh = dims
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("cross_k", TensorProto.UINT8, [L, N, H, dh, S]),
        helper.make_tensor_value_info("cross_k_scale", TensorProto.FLOAT, [L, N, H, 1, S]),
        helper.make_tensor_value_info("cross_v", TensorProto.UINT8, [L, N, H, S, dh]),
        helper.make_tensor_value_info("cross_v_scale", TensorProto.FLOAT, [L, N, H, 1, dh]),
    ])
    drop_dead_nodes(graph)  # after the outputs are the new ones


def _attention_sites(graph):
    """[(layer index input, scores MatMul, Softmax, context MatMul, q)] of every cross-attention:
    MatMul(q, Transpose(Gather(cross_k, l))) -> Softmax -> MatMul(., Gather(cross_v, l))."""
    produced, users = producers(graph), consumers(graph)

    def only_user(node, op_type: str, what: str):
        found = users.get(node.output[0], [])
        if len(found) != 1 or found[0].op_type != op_type:
            raise CrossRewriteError(f"{node.name}: {what}")
        return found[0]

    sites = []
    for gk in [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "cross_k"]:
        tk = only_user(gk, "Transpose", "cross_k is not transposed into a MatMul")
        mm = only_user(tk, "MatMul", "not the right operand of one MatMul")
        if mm.input[1] != tk.output[0]:
            raise CrossRewriteError(f"{tk.name}: not the right operand of one MatMul")
        sm = only_user(mm, "Softmax", "the scores do not go into one Softmax")
        mv = only_user(sm, "MatMul", "not followed by MatMul(., Gather(cross_v, same layer))")
        gv = produced.get(mv.input[1])
        if gv is None or gv.op_type != "Gather" or gv.input[0] != "cross_v" or gv.input[1] != gk.input[1]:
            raise CrossRewriteError(f"{sm.name}: not followed by MatMul(., Gather(cross_v, same layer))")
        sites.append((gk.input[1], mm, sm, mv, mm.input[0], gk, tk, gv))
    if not sites:
        raise CrossRewriteError("decoder_step has no Gather(cross_k, layer)")
    return sites


def rewrite_step(model) -> int:
    """decoder_step: cross-attention over the four 8-bit inputs; returns the layers rewritten."""
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if "cross_k" not in inputs or "cross_v" not in inputs:
        raise CrossRewriteError(f"decoder_step inputs {sorted(inputs)} lack cross_k / cross_v")
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inputs["cross_k"].type.tensor_type.shape.dim]
    L, N, H, S, dh = dims
    sites = _attention_sites(graph)
    c = _constants(graph, "cross_q8/")
    remove = set()
    added = []
    for i, (layer, mm, sm, mv, q, gk, tk, gv) in enumerate(sites):
        p = f"/cross_q8/{i}"
        n = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=f"{p}/{op}_{outs[0].split('/')[-1]}", **kw)
        qn, q_u8, q_scale = _quantize_nodes(q, -1, f"{p}/q", c)
        added += qn
        added += [
            n("Gather", ["cross_k_scale", layer], [f"{p}/k_scale"], axis=0),
            n("Gather", ["cross_v_scale", layer], [f"{p}/v_scale"], axis=0),
            # scores [N, H, KT, S]
            n("MatMulInteger", [q_u8, gk.output[0], c["zp_u8"], c["zp_u8"]], [f"{p}/scores_i32"]),
            # two Muls, not one by q_scale * k_scale: ONNX Runtime fuses that form into
            # MatMulIntegerToFloat, whose batched kernel took 4x the time of MatMulInteger here
            n("Cast", [f"{p}/scores_i32"], [f"{p}/scores_f"], to=TensorProto.FLOAT),
            n("Mul", [f"{p}/scores_f", q_scale], [f"{p}/scores_q"]),
            n("Mul", [f"{p}/scores_q", f"{p}/k_scale"], [f"{p}/scores"]),
            # e = exp(scores - max) in (0, 1] at 1/255 steps
            n("ReduceMax", [f"{p}/scores"], [f"{p}/scores_max"], axes=[-1], keepdims=1),
            n("Sub", [f"{p}/scores", f"{p}/scores_max"], [f"{p}/scores_shifted"]),
            n("Exp", [f"{p}/scores_shifted"], [f"{p}/e"]),
            n("QuantizeLinear", [f"{p}/e", c["inv_levels"], c["zero_u8"]], [f"{p}/e_u8"]),
            n("MatMulInteger", [f"{p}/e_u8", gv.output[0], c["zero_u8"], c["zp_u8"]], [f"{p}/ctx_i32"]),
            n("Cast", [f"{p}/e_u8"], [f"{p}/e_f"], to=TensorProto.FLOAT),
            n("ReduceSum", [f"{p}/e_f", c["last_axis"]], [f"{p}/e_sum"], keepdims=1),
            n("Div", [f"{p}/v_scale", f"{p}/e_sum"], [f"{p}/ctx_scale"]),
            n("Cast", [f"{p}/ctx_i32"], [f"{p}/ctx_f"], to=TensorProto.FLOAT),
            n("Mul", [f"{p}/ctx_f", f"{p}/ctx_scale"], [mv.output[0]]),
        ]
        remove.update(id(x) for x in (mm, sm, mv, tk))
    kept = [x for x in graph.node if id(x) not in remove]
    del graph.node[:]
    graph.node.extend(kept + added)
    position = list(graph.input).index(inputs["cross_k"])
    for name in ("cross_k", "cross_v"):
        graph.input.remove(inputs[name])
    for j, info in enumerate([
        helper.make_tensor_value_info("cross_k", TensorProto.UINT8, [L, N, H, dh, S]),
        helper.make_tensor_value_info("cross_k_scale", TensorProto.FLOAT, [L, N, H, 1, S]),
        helper.make_tensor_value_info("cross_v", TensorProto.UINT8, [L, N, H, S, dh]),
        helper.make_tensor_value_info("cross_v_scale", TensorProto.FLOAT, [L, N, H, 1, dh]),
    ]):
        graph.input.insert(position + j, info)
    del graph.value_info[:]  # shapes of the removed float tensors
    topological_sort(graph)  # each layer's new nodes after what they read
    drop_dead_nodes(graph)
    return len(sites)


def rewrite_cross_attention(onnx_dir) -> int:
    """Rewrite decoder_init.onnx and decoder_step.onnx of one variant directory in place;
    returns the layers rewritten."""
    from pathlib import Path

    from .onnx_tools import load_onnx, save_onnx

    onnx_dir = Path(onnx_dir)
    init = load_onnx(onnx_dir / "decoder_init.onnx")
    rewrite_init(init)
    step = load_onnx(onnx_dir / "decoder_step.onnx")
    layers = rewrite_step(step)
    save_onnx(init, onnx_dir / "decoder_init.onnx")
    save_onnx(step, onnx_dir / "decoder_step.onnx")
    return layers
