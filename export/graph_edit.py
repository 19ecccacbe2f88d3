"""Small helpers shared by the ONNX graph rewrites (export/cross_int8.py,
export/fused_attention.py): who produces and who reads a tensor, constants, dead nodes, order."""

from __future__ import annotations


class GraphRewriteError(RuntimeError):
    """The graph does not have the pattern a rewrite expects."""


def consumers(graph) -> dict:
    """tensor name -> the nodes reading it."""
    users = {}
    for node in graph.node:
        for x in node.input:
            users.setdefault(x, []).append(node)
    return users


def producers(graph) -> dict:
    """tensor name -> the node writing it."""
    return {out: node for node in graph.node for out in node.output}


def scalar_constant(graph, name: str, produced: dict) -> float | None:
    """The value of a one-element constant tensor (an initializer or a Constant node), else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            values = numpy_helper.to_array(init)
            return float(values.reshape(-1)[0]) if values.size == 1 else None
    node = produced.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                values = numpy_helper.to_array(attr.t)
                return float(values.reshape(-1)[0]) if values.size == 1 else None
    return None


def drop_dead_nodes(graph) -> int:
    """Remove nodes none of whose outputs is read or is a graph output, until none is left;
    then initializers nothing reads. Returns the nodes removed."""
    wanted = {o.name for o in graph.output}
    removed = 0
    while True:
        used = wanted | {x for node in graph.node for x in node.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)
    used = wanted | {x for node in graph.node for x in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return removed


def topological_sort(graph) -> None:
    """Order the nodes so that each comes after what it reads."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(x in known for x in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise GraphRewriteError(f"cycle or missing input at {rest[0].name} ({list(rest[0].input)})")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
