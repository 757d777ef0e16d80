"""minires.viz: DOT structure of known graphs, module clusters, summary order, draw fallback."""
import re
import shutil
import sys
import types
import warnings

import numpy as np
import pytest

import minires
import minires.ops as F
from minires import models, nn, viz
from minires.tensor import Parameter

NODE = re.compile(r'^\s*([tf]\d+) \[label="((?:[^"\\]|\\.)*)", (.*)\]$')
EDGE = re.compile(r"^\s*([tf]\d+) -> ([tf]\d+)(?: \[label=(\d+)\])?;$")
CLUSTER = re.compile(r'^\s*label="([^"]*)"; style=rounded')


@pytest.fixture(autouse=True)
def one_op_per_layer(monkeypatch):
    """The graphs here count one op per layer: nn.Sequential's conv + ReLU fusion is off
    (tests/test_conv_fusion.py covers the fused models)."""
    monkeypatch.setattr(nn.Sequential, "fuse", False)


def parse(dot):
    """{node id: (label, style, cluster path)} and [(src, dst, input index or None)]."""
    nodes, edges, stack = {}, [], []
    for line in dot.splitlines():
        if m := NODE.match(line):
            nodes[m[1]] = (m[2].replace("\\n", "\n"), m[3], tuple(stack))
        elif m := EDGE.match(line):
            edges.append((m[1], m[2], None if m[3] is None else int(m[3])))
        elif m := CLUSTER.match(line):
            stack.append(m[1].split(":")[0])
        elif line.strip() == "}" and stack:
            stack.pop()
    return nodes, edges


def functions_in_order(nodes):
    """Function node values in execution order (f0, f1, ...)."""
    return [nodes[k] for k in sorted((k for k in nodes if k[0] == "f"), key=lambda k: int(k[1:]))]


def find(nodes, text):
    """The one node whose label contains `text`."""
    hits = [k for k, (label, _, _) in nodes.items() if text in label]
    assert len(hits) == 1, (text, hits)
    return hits[0]


@pytest.fixture
def small(rng):
    """loss = sum(relu(linear(x, w, b))): x a constant input, w and b Parameters."""
    x = minires.tensor(rng.standard_normal((2, 3)).astype(np.float32))
    w = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
    b = Parameter(rng.standard_normal(4).astype(np.float32))
    loss = F.sum(F.relu(F.linear(x, w, b)))
    return x, w, b, loss


def test_small_graph_nodes_and_edges(small):
    x, w, b, loss = small
    nodes, edges = parse(viz.to_dot(loss, params={"fc.weight": w, "fc.bias": b}))
    functions = sorted(label.split("\n")[0] for k, (label, _, _) in nodes.items() if k[0] == "f")
    assert functions == ["Linear", "ReLU", "Sum"]
    assert sum(k[0] == "t" for k in nodes) == 6  # x, w, b, linear out, relu out, loss
    assert len(edges) == 8  # 3 inputs + 1 output for Linear, 1 + 1 for ReLU and for Sum
    lin = find(nodes, "Linear")
    into = [(src, i) for src, dst, i in edges if dst == lin]
    assert into == [(find(nodes, "(2, 3)"), 0), (find(nodes, "fc.weight"), 1),
                    (find(nodes, "fc.bias"), 2)]  # input order, labelled
    for name, shape in (("fc.weight", "(4, 3)"), ("fc.bias", "(4,)")):
        label, style, cluster = nodes[find(nodes, name)]
        assert "box3d" in style and shape in label and "float32 cpu" in label
        assert cluster == ("fc",)
    assert nodes[lin][2] == ("fc",)  # the Linear joins its parameters' module
    label, style, _ = nodes[find(nodes, "output")]
    assert "()" in label and "#ffd54f" in style
    assert "dashed" in nodes[find(nodes, "(2, 3)")][1]  # the constant input
    relu = find(nodes, "ReLU")
    assert [e for e in edges if e[1] == relu][0][2] is None  # one input: no index label


def test_parameters_unnamed_without_mapping(small):
    nodes, _ = parse(viz.to_dot(small[3]))
    params = [label for label, style, cluster in nodes.values() if "box3d" in style]
    assert sorted(params) == ["(4, 3) float32 cpu", "(4,) float32 cpu"]  # no name line
    assert all(cluster == () for _, _, cluster in nodes.values())


def test_function_arguments_in_labels(rng):
    x = minires.tensor(rng.standard_normal((1, 2, 6, 6)), requires_grad=True)
    w = minires.tensor(rng.standard_normal((3, 2, 3, 3)))
    y = F.sum(F.max_pool2d(F.conv2d(x, w, stride=2, padding=1), 2), axis=1)
    labels = [label for label, _, _ in parse(viz.to_dot(y))[0].values()]
    assert "Conv2d\nstride=(2, 2) padding=(1, 1) relu=False" in labels
    assert "MaxPool2d\nkernel=(2, 2) stride=(2, 2) padding=(0, 0)" in labels  # its Windows
    assert "Sum\naxis=1 keepdims=False" in labels
    assert viz.function_args(F.getitem(x, (0, slice(1, None), Ellipsis)).creator) == [
        "key=(0, 1:, ...)"]


def _seed_forward(rng, batch=2, trace=False):
    model = models.seed_net()
    x = minires.tensor(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    labels = rng.integers(0, 10, batch)
    if not trace:
        return model, F.cross_entropy(model(x), labels), None
    with viz.trace_modules(model) as tags:
        logits = model(x)
    return model, F.cross_entropy(logits, labels), tags


def test_seed_net_graph_counts(rng):
    model, loss, _ = _seed_forward(rng)
    nodes, edges = parse(viz.to_dot(loss, modules=model))
    ops = [label.split("\n")[0] for k, (label, _, _) in nodes.items() if k[0] == "f"]
    expected = {"Conv2d": 5, "ReLU": 5, "MaxPool2d": 2, "ResidualAdd": 1, "Reshape": 1,
                "Linear": 1, "CrossEntropy": 1}
    assert {op: ops.count(op) for op in set(ops)} == expected
    assert len(ops) == 16
    assert sum("box3d" in style for _, style, _ in nodes.values()) == len(model.parameters())
    # one output edge per Function; inputs: conv 3, relu 1, pool 1, add 2, reshape 1,
    # linear 3, cross-entropy 1
    assert len(edges) == 16 + 5 * 3 + 5 + 2 + 2 + 1 + 3 + 1


def test_seed_net_clusters_traced_and_guessed(rng):
    model, loss, tags = _seed_forward(rng, trace=True)
    assert not any("forward" in vars(m) for m in model.modules())  # wrappers removed
    nodes, _ = parse(viz.to_dot(loss, modules=model, trace=tags))
    where = {}
    for label, _, cluster in functions_in_order(nodes):
        where.setdefault(label.split("\n")[0], []).append(cluster)
    assert where["Conv2d"] == [("features", "features.0"), ("features", "features.2"),
                               ("features", "features.4"), ("skip", "skip.block", "skip.block.0"),
                               ("skip", "skip.block", "skip.block.2")]
    assert where["ReLU"] == [("features",)] * 3 + [("skip", "skip.block")] * 2
    assert where["MaxPool2d"] == [("features",), ("head",)]
    assert where["ResidualAdd"] == [("skip",)] and where["CrossEntropy"] == [()]
    assert where["Linear"] == [("head", "head.2")]
    guessed, _ = parse(viz.to_dot(loss, modules=model))
    relus = [c for label, _, c in functions_in_order(guessed) if label == "ReLU"]
    assert relus[0] == ("features",) and relus[3] == ("skip", "skip.block")
    assert relus[2] == ()  # last ReLU of features: a guess cannot place it, a trace can


def test_trace_modules_restores_forward_on_error(rng):
    model = models.seed_net()
    with pytest.raises(ValueError):
        with viz.trace_modules(model):
            model(minires.tensor(np.zeros((1, 2, 28, 28), np.float32)))  # wrong channels
    assert not any("forward" in vars(m) for m in model.modules())


def test_gradient_norms_on_leaves(small):
    x, w, b, loss = small
    loss.backward(retain_graph=True)
    nodes, _ = parse(viz.to_dot(loss, grads=True, params={"w": w, "b": b}))
    for name, p in (("w\n", w), ("b\n", b)):
        expected = f"|grad| = {np.linalg.norm(p.grad.astype(np.float64)):.3g}"
        assert nodes[find(nodes, name)][0].endswith(expected)
    assert "|grad|" not in nodes[find(nodes, "(2, 3)")][0]  # x has no gradient


def test_freed_graph_raises(small):
    loss = small[3]
    loss.backward()
    with pytest.raises(RuntimeError, match="freed by backward"):
        viz.to_dot(loss)


def test_deep_chain_without_recursion(rng):
    y = x = minires.tensor(rng.standard_normal(3), requires_grad=True)
    for _ in range(3000):
        y = y * 1.0
    functions, tensors, _ = viz.walk(y)
    assert len(functions) == 3000 and tensors[0] is x and tensors[-1] is y
    assert len(viz.summary(y).splitlines()) == 3002  # header, one per op, total


def test_summary_topological_order(rng):
    model, loss, _ = _seed_forward(rng, batch=3)
    lines = viz.summary(loss).splitlines()
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:-1]]
    assert [r[0] for r in rows] == [str(i) for i in range(16)]
    assert [r[1] for r in rows] == ["Conv2d", "ReLU"] * 3 + ["MaxPool2d"] + [
        "Conv2d", "ReLU"] * 2 + ["ResidualAdd", "MaxPool2d", "Reshape", "Linear",
                                 "CrossEntropy"]
    assert rows[0][2] == "(3, 1, 28, 28) (16, 1, 3, 3) (16,) -> (3, 16, 28, 28)"
    assert rows[13][2] == "(3, 16, 3, 3) -> (3, 144)"
    relu_saved = 3 * 16 * 28 * 28 * 4  # ReLU saves its float32 output
    assert rows[1][3] == f"{relu_saved / 1024:.1f} KB"
    functions = viz.walk(loss)[0]
    saved = {id(a): a.nbytes for f in functions for a in f.saved if a is not None}
    total = sum(saved.values())  # counted once though ReLU and the next conv share it
    assert total < sum(a.nbytes for f in functions for a in f.saved if a is not None)
    assert lines[-1] == f"16 ops, {total / 1024:.1f} KB saved for backward"
    produced = {id(f): i for i, f in enumerate(functions)}
    for i, f in enumerate(functions):  # inputs come from earlier lines
        assert all(produced[id(x.creator)] < i for x in f.inputs if x.creator is not None)


def test_draw_falls_back_to_dot(small, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` raises
    with pytest.warns(RuntimeWarning, match=r"dot -Tsvg .*g\.dot -o .*g\.svg"):
        written = viz.draw(small[3], tmp_path / "g.svg")
    assert written == tmp_path / "g.dot" and not (tmp_path / "g.svg").exists()
    assert written.read_text() == viz.to_dot(small[3])


def test_draw_uses_graphviz_package(small, tmp_path, monkeypatch):
    calls = []

    class Source:
        def __init__(self, text):
            calls.append(text)

        def pipe(self, format):
            return f"rendered {format}".encode()

    monkeypatch.setitem(sys.modules, "graphviz", types.SimpleNamespace(Source=Source))
    written = viz.draw(small[3], tmp_path / "g.png", params={"w": small[1]})
    assert written.read_bytes() == b"rendered png"
    assert calls == [viz.to_dot(small[3], params={"w": small[1]})]


def test_draw_dot_suffix_and_bad_suffix(small, tmp_path):
    assert viz.draw(small[3], tmp_path / "g.dot").read_text() == viz.to_dot(small[3])
    with pytest.raises(ValueError, match=r"draw: unsupported file suffix '\.jpeg'"):
        viz.draw(small[3], tmp_path / "g.jpeg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot not installed")
def test_draw_with_dot_program(small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = viz.draw(small[3], tmp_path / "g.svg")
    svg = written.read_text()
    assert written.suffix == ".svg" and "<svg" in svg and svg.count('class="node"') == 9
