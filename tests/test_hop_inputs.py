"""hop_inputs.BodyInputs on a hand-built graph: a body called twice, a value passed in,
two inputs dropped; the operands of both calls stay aligned with the body's placeholders."""
import torch
import torch.fx as fx

from tilepass.hop_inputs import BodyInputs


def wrap(body, *args):  # the calling convention of tag_activation_checkpoint / wrap
    return body(*args)


def _graph():
    body_g = fx.Graph()
    a, m1, m2, x = (body_g.placeholder(n) for n in ("a", "m1", "m2", "x"))
    body_g.output(body_g.call_function(torch.add, (a, x)))
    root = torch.nn.Module()
    root.body = fx.GraphModule(torch.nn.Module(), body_g)
    g = fx.Graph()
    p, q = g.placeholder("p"), g.placeholder("q")
    m1_value, m2_value = g.call_function(torch.mul, (q, 2)), g.call_function(torch.mul, (q, 3))
    ten = g.call_function(torch.add, (q, 10))
    body = g.get_attr("body")
    c1 = g.call_function(wrap, (body, p, m1_value, m2_value, q))
    c2 = g.call_function(wrap, (body, q, m1_value, m2_value, p))
    g.output(g.call_function(torch.add, (c1, c2)))
    return fx.GraphModule(root, g), body_g, (m1, m2), (c1, c2), ten, (m1_value, m2_value)


def test_thread_and_drop_keep_operands_aligned():
    gm, body_g, (m1, m2), (c1, c2), ten, (m1_value, m2_value) = _graph()
    inputs = BodyInputs(gm)
    assert inputs.calls[body_g] == [c1, c2]
    assert inputs.source(m1) is m1_value and inputs.source(m2) is m2_value
    assert inputs.source(next(iter(body_g.nodes))) is None  # "a" is p in one call, q in the other
    passed = inputs.thread(body_g, ten)
    assert inputs.thread(body_g, ten) is passed  # passed in once
    out = next(n for n in body_g.nodes if n.op == "output")
    with body_g.inserting_before(out):
        out.args = (body_g.call_function(torch.add, (out.args[0], passed)),)
    assert inputs.drop_unused(body_g, [m1, m2]) == 2
    gm.recompile()
    body_g.owning_module.recompile()
    assert [n.name for n in body_g.nodes if n.op == "placeholder"] == ["a", "x", passed.name]
    assert all(len(c.args) == 4 for c in (c1, c2))
    p, q = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(gm(p, q), 2 * (p + q) + 2 * (q + 10))
    assert not any(n.target is torch.mul for n in gm.graph.nodes)  # the dropped inputs' producers went too


def test_a_body_used_another_way_is_left_alone():
    gm, body_g, (m1, _), _, ten, _ = _graph()
    g = gm.graph
    other = next(n for n in g.nodes if n.op == "get_attr")
    with g.inserting_after(other):
        g.call_function(print, (other,))  # the body object read by something else
    inputs = BodyInputs(gm)
    assert inputs.calls[body_g] == [] and inputs.source(m1) is None
