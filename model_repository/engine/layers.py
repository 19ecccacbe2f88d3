"""Per-layer K/V inputs for decoder_step (load-time graph rewrite) and feeding them.

The contract's graph takes K/V stacked over layers ([L, ...]) and picks layer l with
Gather(axis 0): ONNX Runtime copies every layer out of the stack on every step (for the
cross-attention K/V that is all of it: about 37 MB per sequence per step for Whisper base,
more than half of a batched step). With one input per layer the slices of the stored
[L, N, ...] cache (contiguous views) are fed without any copy.
"""
import os
import tempfile

from .config import enabled
from .session import make_session

# the cross_*_scale inputs: the 8-bit cross-attention variant (export/cross_int8.py)
LAYER_STACKED = ("past_k", "past_v", "cross_k", "cross_v", "cross_k_scale", "cross_v_scale")


def _scalar_constants(graph) -> dict:
    from onnx import numpy_helper

    consts = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    for init in graph.initializer:
        if not init.dims:
            consts[init.name] = numpy_helper.to_array(init)
    return consts


def _layer_of_gathers(graph, name: str, consts: dict):
    """{gather output: layer} when every user of input `name` is Gather(name, scalar const, axis 0),
    else None."""
    layer_of = {}
    for node in [n for n in graph.node if name in n.input]:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (node.op_type != "Gather" or node.input[0] != name or list(node.input).count(name) != 1
                or axis != 0 or node.input[1] not in consts or consts[node.input[1]].ndim != 0):
            return None
        layer_of[node.output[0]] = int(consts[node.input[1]])
    return layer_of or None


def _split_input(graph, inp, layer_of: dict) -> int:
    """Replace input `inp` and its Gathers with one input per layer; returns the layer count
    (0 when the input's static layer dim disagrees with the Gathers)."""
    from onnx import helper

    name = inp.name
    dims = inp.type.tensor_type.shape.dim
    n_layers = max(layer_of.values()) + 1
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value != n_layers:
        return 0
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims[1:]]
    rename = {out: f"{name}.{layer}" for out, layer in layer_of.items()}
    users = [n for n in graph.node if name in n.input]
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
    for node in users:
        graph.node.remove(node)
    position = list(graph.input).index(inp)
    graph.input.remove(inp)
    for layer in range(n_layers):
        graph.input.insert(position + layer, helper.make_tensor_value_info(
            f"{name}.{layer}", inp.type.tensor_type.elem_type, shape))
    return n_layers


def split_layer_inputs(model) -> dict:
    """Rewrite decoder_step so each layer's K/V is its own graph input ("cross_k.3" [N, H, S, dh]).

    Returns {input: L} for the inputs rewritten; an input used any other way is left alone."""
    graph = model.graph
    consts = _scalar_constants(graph)
    done = {}
    for name in LAYER_STACKED:
        inp = next((i for i in graph.input if i.name == name), None)
        if inp is None or any(o.name == name for o in graph.output):
            continue
        layer_of = _layer_of_gathers(graph, name, consts)
        if layer_of:
            n_layers = _split_input(graph, inp, layer_of)
            if n_layers:
                done[name] = n_layers
    if done:  # drop the layer-index constants nobody reads any more
        used = {x for node in graph.node for x in node.input} | {o.name for o in graph.output}
        for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            graph.node.remove(node)
    return done


def per_layer_inputs(session) -> dict:
    """{input: L} for the stacked K/V inputs a graph already takes per layer ("cross_k.3")."""
    names = {i.name for i in session.get_inputs()}
    found = {}
    for name in LAYER_STACKED:
        n = 0
        while f"{name}.{n}" in names:
            n += 1
        if n:
            found[name] = n
    return found


def load_step_session(path: str, config: dict, logger):
    """(decoder_step session, {input: L} split per layer) — per-layer K/V inputs when the graph
    allows and the `split_layer_inputs` parameter is on, else the graph as is.

    render.py deploys the graph already split; a stacked graph is split here, at load, when the
    parameter asks for it. Either way the session is made from a file: one made from the
    serialized bytes keeps about 100 MB (int8) to 200 MB (fp32) more for good."""
    session = make_session(path, config, logger)
    split = per_layer_inputs(session)
    if split or not enabled(config, "split_layer_inputs"):
        return session, split
    session = None  # a stacked graph: split it here (one session at a time)
    try:
        import onnx

        model = onnx.load(path)
        split = split_layer_inputs(model)
        if split:
            with tempfile.TemporaryDirectory(prefix="decoder-step-") as tmp:
                split_path = os.path.join(tmp, os.path.basename(path))
                onnx.save(model, split_path)
                del model
                session = make_session(split_path, config, logger,
                                       label=f"{path} (per-layer inputs for {', '.join(sorted(split))})")
            return session, split
        logger.log_warn(f"{path}: stacked K/V inputs are not plain per-layer Gathers; using the graph as is")
    except ImportError:
        logger.log_warn("the onnx package is missing from pylib_dir: running decoder_step with "
                        "layer-stacked K/V inputs (slower: a copy of the caches per step)")
    except Exception as error:  # noqa: BLE001 - fall back to the unmodified graph
        logger.log_warn(f"could not split the K/V inputs of {path} per layer ({error!r}); using the graph as is")
    return make_session(path, config, logger), {}


def feed_layers(feeds: dict, split: dict, name: str, array) -> None:
    """Feed the layer-stacked `array` [L, ...] as input `name`, or as `name.l` per layer when split."""
    if name in split:
        for layer in range(split[name]):
            feeds[f"{name}.{layer}"] = array[layer]
    else:
        feeds[name] = array
