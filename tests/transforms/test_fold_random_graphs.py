"""Property test: random small CNN DAGs (conv / BN / ReLU / add / concat / pool / pad).

``fold`` never changes the output (float64), and the folded graph is **minimal**:

    no single-entry single-exit linear region of the folded graph - for any exit node,
    any valid entry on its dominator chain, every node allowed (not only the regions
    ``find_regions`` would pick greedily) - is exact, holds a conv, has more than one
    op besides identity calls, and is worth folding by fold's own rule (the folded conv
    is no bigger than the convs it replaces, and it is not a plain chain of convs).

Equivalently: no conv, BN, affine, pad, pool or branch sum is left that an exact fold
could merge into a conv without growing the kernel. Checked by
:func:`undone_folds` below (which enumerates those regions)
returning nothing on the re-traced folded model. So when a maximal region is refused
(bias under zero padding, a kernel that would grow), its best exact sub-regions must
have been folded.

The folding rule, asserted structurally on every folded random graph as well
(:func:`exact_folds_left`), whatever else in the graph is refused (a biased output under
zero padding, a ``ceil_mode`` pool with partial windows, a kernel that would grow):

* every conv -> BN whose conv output is used only by that BN is folded;
* every aligned multi-branch conv block (a sum of branches read from one value, each
  an aligned conv - stride 1, odd kernel, centred zero padding, the same groups -
  optionally followed by a BN, or a lone BN) is folded into one conv.

The generator draws conv -> BN pairs (biased convs too) and ``ceil_mode`` pools with
partial windows among the other ops, so refused regions around such pairs and blocks
are common.

The same programs with adversarial user code added (reads of parameters and buffers
outside their modules, in-place writes into tensors read again, conv subclasses
overriding ``_conv_forward``, hooks): ``fold`` without inputs never changes an output.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import repcompiler
from repcompiler.passes.find_regions import find_regions
from repcompiler.passes.regions.dominance import dominators, entry_candidates
from repcompiler.passes.regions.expression import build_region
from repcompiler.passes.regions.lowering import LoweredGraph
from repcompiler.passes.regions.selection import not_worth, worth_alone
from repcompiler.rules.defaults import default_rules
from repcompiler.capture.tracing import trace_model
from test_pass_contract import assert_pipeline_matches_fold

SIZE = 10


def undone_folds(gm, merge_convs=False):
    """Every exact fold still possible in ``gm``: the check that a graph is folded to
    its **minimum**.

    Unlike ``find_regions`` (one region per exit, chosen greedily), this looks at
    *every* single-entry single-exit linear region: for every linear node ``e``, every
    valid entry on its dominator chain, no node excluded. A region is an undone fold
    when it is exact, holds a conv, has more than one op that is not an identity call
    (a lone conv is already folded), and folding it is worth it by ``find_regions``'s
    own rule. Returns them largest first per exit, exits in reverse graph order.
    """
    g = LoweredGraph(gm, default_rules(), frozenset())
    g.classify()
    g.infer_shapes()
    idom = dominators(g)
    out = []
    for e in reversed(g.nodes):
        if not g.linear(e):
            continue
        for d, body, aliases in reversed(entry_candidates(g, idom, e, set())):
            reg = build_region(g, d, e, body, aliases)
            if not (reg.exact and reg.has_conv) or not_worth(g, reg, merge_convs):
                continue
            if worth_alone(g, reg):
                out.append(reg)
    return out


class DagNet(nn.Module):
    """Interprets a fixed program: ``(op, inputs, module_name)`` per node."""

    def __init__(self, program, mods: dict[str, nn.Module]) -> None:
        super().__init__()
        self.program = program
        self.ops = nn.ModuleDict(mods)

    def forward(self, x):
        vals = [x]
        for op, ins, name in self.program:
            a = vals[ins[0]]
            if op == "mod":
                v = self.ops[name](a)
            elif op == "add":
                v = a + vals[ins[1]]
            elif op == "cat":
                v = torch.cat([a, vals[ins[1]]], dim=1)
            elif op == "pad":
                v = F.pad(a, [1, 1, 1, 1])
            elif op == "scale":
                v = a * 0.5
            elif op == "readw":  # a conv's weight read outside the conv
                v = a * (1.0 + self.ops[name].weight.abs().mean())
            elif op == "readbn":  # a BN's buffer read outside the BN
                v = a + self.ops[name].running_var.mean()
            elif op == "mul_":  # an in-place write into a value that may be read again later
                v = a.mul_(1.5)
            else:  # pragma: no cover
                raise AssertionError(op)
            vals.append(v)
        return vals[-1]


@st.composite
def dag_nets(draw):
    c0 = draw(st.sampled_from([2, 3, 4]))
    shapes = [(c0, SIZE)]  # (channels, spatial)
    program = []
    mods: dict[str, nn.Module] = {}
    n = draw(st.integers(2, 9))
    for i in range(n):
        src = draw(st.integers(0, len(shapes) - 1))
        c, s = shapes[src]
        kinds = ["conv", "conv", "bn", "relu", "avg", "pad", "scale", "add", "cat", "block", "block", "convbn",
                 "ceilpool"]
        kind = draw(st.sampled_from(kinds))
        name = f"m{i}"
        if kind == "block":  # a multi-branch block on one input: RepVGG / DBB / ACNet-like
            cout = draw(st.sampled_from([c, 4]))
            join = draw(st.sampled_from(["add", "cat"]))
            outs = []
            for b in range(draw(st.integers(2, 3))):
                shape = draw(st.sampled_from(["3x3", "1x1", "1x3", "id", "avg", "1x1-3x3"]))
                if shape in ("id", "avg") and (cout != c or join == "cat"):
                    shape = "1x1"
                cur = src
                bname = f"{name}b{b}"
                if shape == "1x1-3x3":
                    mods[bname + "p"] = nn.Conv2d(c, c, 1, bias=False).double()
                    program.append(("mod", (cur,), bname + "p"))
                    shapes.append((c, s))
                    cur = len(shapes) - 1
                    mods[bname + "pbn"] = nn.BatchNorm2d(c).double()
                    program.append(("mod", (cur,), bname + "pbn"))
                    shapes.append((c, s))
                    cur = len(shapes) - 1
                    shape = "3x3"
                if shape in ("3x3", "1x1", "1x3"):
                    k = {"3x3": 3, "1x1": 1, "1x3": (1, 3)}[shape]
                    pad = {"3x3": 1, "1x1": 0, "1x3": (0, 1)}[shape]
                    mods[bname] = nn.Conv2d(c, cout, k, padding=pad, bias=draw(st.booleans())).double()
                elif shape == "avg":
                    mods[bname] = nn.AvgPool2d(3, 1, 1)
                else:
                    mods[bname] = nn.Identity()
                program.append(("mod", (cur,), bname))
                shapes.append((cout, s))
                cur = len(shapes) - 1
                if draw(st.booleans()):
                    mods[bname + "bn"] = nn.BatchNorm2d(cout).double()
                    program.append(("mod", (cur,), bname + "bn"))
                    shapes.append((cout, s))
                    cur = len(shapes) - 1
                outs.append(cur)
            acc = outs[0]
            for o in outs[1:]:
                program.append((join, (acc, o), name))
                shapes.append((shapes[acc][0] + shapes[o][0] if join == "cat" else cout, s))
                acc = len(shapes) - 1
            continue
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            p = draw(st.sampled_from([0, k // 2])) if k > 1 else 0
            if s + 2 * p - k + 1 < 2:
                p = k // 2
            cout = draw(st.sampled_from([2, 3, 4]))
            g = draw(st.sampled_from([1, c])) if cout % c == 0 else 1
            mods[name] = nn.Conv2d(c, cout, k, padding=p, groups=g, bias=draw(st.booleans())).double()
            program.append(("mod", (src,), name))
            shapes.append((cout, s + 2 * p - k + 1))
        elif kind == "convbn":  # conv -> BN, the conv biased or not (patch embeddings, stems)
            k = draw(st.sampled_from([1, 3]))
            cout = draw(st.sampled_from([2, 3, 4]))
            mods[name] = nn.Conv2d(c, cout, k, padding=k // 2, bias=draw(st.booleans())).double()
            program.append(("mod", (src,), name))
            shapes.append((cout, s))
            mods[name + "bn"] = nn.BatchNorm2d(cout).double()
            program.append(("mod", (len(shapes) - 1,), name + "bn"))
            shapes.append((cout, s))
        elif kind == "ceilpool":  # partial windows at the border: never merges with a conv
            if s < 4:
                continue
            mods[name] = nn.AvgPool2d(3, 2, ceil_mode=True)
            program.append(("mod", (src,), name))
            shapes.append((c, -(-(s - 3) // 2) + 1))
        elif kind == "bn":
            mods[name] = nn.BatchNorm2d(c).double()
            program.append(("mod", (src,), name))
            shapes.append((c, s))
        elif kind == "relu":
            mods[name] = nn.ReLU()
            program.append(("mod", (src,), name))
            shapes.append((c, s))
        elif kind == "avg":
            cip = draw(st.booleans())
            mods[name] = nn.AvgPool2d(3, 1, 1, count_include_pad=cip)
            program.append(("mod", (src,), name))
            shapes.append((c, s))
        elif kind == "pad":
            if s > 14:
                continue
            program.append(("pad", (src,), name))
            shapes.append((c, s + 2))
        elif kind == "scale":
            program.append(("scale", (src,), name))
            shapes.append((c, s))
        else:
            partners = [j for j, sh in enumerate(shapes) if sh[1] == s and (kind == "cat" or sh[0] == c)]
            other = draw(st.sampled_from(partners))
            program.append((kind, (src, other), name))
            shapes.append((c + shapes[other][0] if kind == "cat" else c, s))
    net = DagNet(program, mods).double()
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.3)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return net.eval(), c0


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUMS = {operator.add, torch.add}


def _module(gm: nn.Module, n: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(n.target)) if n.op == "call_module" else None


def _single_use_conv(gm: nn.Module, n: torch.fx.Node, calls: dict) -> bool:
    m = _module(gm, n)
    return type(m) in _CONV_TYPES and len(n.users) == 1 and calls[n.target] == 1


def _aligned(conv: nn.Module) -> bool:
    """Stride 1, each window centred on its output pixel (odd kernel, 'same' zero padding)."""
    return (conv.padding_mode == "zeros" and all(s == 1 for s in conv.stride)
            and all(k % 2 == 1 and p == d * (k - 1) // 2
                    for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation)))


def _branch_nodes(operands: list) -> set:
    out = set()
    for a in operands:
        out.add(a)
        if a.op == "call_module" and a.args and isinstance(a.args[0], torch.fx.Node):
            out.add(a.args[0])
    return out


def exact_folds_left(gm: torch.fx.GraphModule) -> list[str]:
    """What the folding rule says must never be left, found structurally in ``gm``:

    1. a BatchNorm whose input is a plain conv used only by it (and called once): the
       BN's affine map always folds into the conv exactly, borders included;
    2. an **aligned multi-branch block**: a sum of two distinct branches read from
       one value, each an aligned conv (stride 1, odd kernel, centred zero padding;
       its output used only by the branch; the same ``groups`` in every branch),
       optionally followed by a BatchNorm, or a lone BatchNorm: its parallel sum is
       one conv exactly, no bigger than its largest branch. (A channel concat of
       plain convs is not required: its one conv would hold the zero-padded smaller
       kernels, more weights than the branches.)

    Whatever else is refused around them (a biased producer under zero padding, a
    ``ceil_mode`` pool with partial windows, a kernel that would grow), these fold.
    """
    calls: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    left = []
    for n in gm.graph.nodes:
        m = _module(gm, n)
        if isinstance(m, nn.BatchNorm2d) and calls[n.target] == 1 and _single_use_conv(gm, n.args[0], calls):
            left.append(f"conv -> BN: {n.args[0].target} -> {n.target}")
        if not (n.op == "call_function" and n.target in _SUMS):
            continue
        operands = list(n.args[:2])
        if not all(isinstance(a, torch.fx.Node) for a in operands) or len(set(operands)) < len(operands):
            continue
        groups = {_module(gm, a).groups for a in gm.graph.nodes if a in _branch_nodes(operands)
                  and type(_module(gm, a)) in _CONV_TYPES}
        if len(groups) > 1:
            continue  # a grouped and a dense branch: one dense conv would be bigger
        roots = []
        for a in operands:
            cur, ok = a, len(a.users) == 1
            mm = _module(gm, cur)
            if isinstance(mm, nn.BatchNorm2d):
                cur = cur.args[0]
                mm = _module(gm, cur)
                if type(mm) in _CONV_TYPES:
                    ok = ok and len(cur.users) == 1 and _aligned(mm)
                    cur = cur.args[0]
            elif type(mm) in _CONV_TYPES:
                ok = ok and _aligned(mm)
                cur = cur.args[0]
            else:
                ok = False
            roots.append(cur if ok else None)
        if None not in roots and len(set(roots)) == 1:
            left.append(f"aligned branch block: {n.name}")
    return left


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(dag_nets())
def test_fold_preserves_random_dags_and_reaches_a_fixpoint(case):
    net, c0 = case
    x = torch.randn(2, c0, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
    folded, report = repcompiler.fold(net, x, return_report=True)
    with torch.no_grad():
        got = folded(x)
        again = net(x)
    assert torch.equal(again, want), "fold modified the user's model"
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), report
    traced = trace_model(folded)
    rule = exact_folds_left(traced)
    assert not rule, f"folds the rule requires left undone: {rule}\n{report}\nprogram: {net.program}"
    left = undone_folds(traced)
    assert not left, f"exact folds left undone: {left}\n{report}\nprogram: {net.program}"


class DoubledConv(nn.Conv2d):
    """A conv subclass overriding ``_conv_forward`` (not ``forward``): not a plain conv."""

    def _conv_forward(self, x, w, b):
        return F.conv2d(x, 2.0 * w, b, self.stride, self.padding, self.dilation, self.groups)


def _insert(program: list, p: int, entry: tuple) -> list:
    """``program`` with ``entry`` inserted before position ``p`` (value indices after it
    shift by one; ``entry`` reads values before it)."""
    out = list(program[:p]) + [entry]
    for op, ins, name in program[p:]:
        out.append((op, tuple(i + 1 if i >= p + 1 else i for i in ins), name))
    return out


def _adversarial(net: DagNet, draw) -> DagNet:
    """``net`` with user-code patterns a fold must see: reads of conv weights and BN
    buffers outside their modules, in-place writes into values read again later, conv
    subclasses overriding ``_conv_forward``, a forward hook on a conv, a forward hook of
    the model reading a conv's weight."""
    program, mods = list(net.program), dict(net.ops.items())
    convs = [n for n, m in mods.items() if type(m) is nn.Conv2d]
    bns = [n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d)]
    for n in convs:
        if draw(st.integers(0, 3)) == 0:  # a subclass with the same parameters
            old = mods[n]
            new = DoubledConv(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding,
                              groups=old.groups, bias=old.bias is not None).double()
            new.load_state_dict(old.state_dict())
            mods[n] = new
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["mul_"] + (["readw"] if convs else []) + (["readbn"] if bns else [])
        kind = draw(st.sampled_from(kinds))
        p = draw(st.integers(0, len(program)))
        src = draw(st.integers(0, p))
        name = draw(st.sampled_from(convs if kind == "readw" else bns if kind == "readbn" else [""]))
        program = _insert(program, p, (kind, (src,), name))
    out = DagNet(program, mods).double().eval()
    if convs and draw(st.booleans()):
        out.ops[draw(st.sampled_from(convs))].register_forward_hook(lambda m, a, o: o * 1.25)
    if convs and draw(st.booleans()):
        name = draw(st.sampled_from(convs))
        out.register_forward_hook(lambda m, a, o, _n=name: o * (1.0 + m.ops[_n].weight.abs().mean()))
    return out


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(dag_nets(), st.data())
def test_fold_without_inputs_sees_reads_writes_overrides_and_hooks(case, data):
    """``fold`` without inputs (no numeric check of the whole model) never changes an
    output of random programs with reads of parameters and buffers, in-place writes into
    tensors read twice, conv subclasses overriding ``_conv_forward`` and hooks."""
    net, c0 = case
    net = _adversarial(net, data.draw)
    x = torch.randn(2, c0, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(net)(x.clone())
    folded, report = repcompiler.fold(net, return_report=True)
    with torch.no_grad():
        got = folded(x.clone())
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), f"{report}\nprogram: {net.program}"


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(dag_nets(), st.booleans())
def test_pass_pipeline_folds_random_dags_like_fold(case, merge_convs):
    """FindRegions + SqueezeRegions + Cleanup on the trace give fold()'s outputs, conv
    count and report entries (the pipeline fold is to switch to)."""
    net, c0 = case
    assert_pipeline_matches_fold(net, torch.randn(2, c0, SIZE, SIZE, dtype=torch.float64), merge_convs=merge_convs)


def test_nested_sums_fold_to_a_fixpoint():
    """The random test's failure, replayed: a sum whose branch is itself a sum, its
    result unused, and the skip branch's identity module also used by the output. The
    identity's outside use used to stop the outer sum's region, so one pass folded only
    the inner sum; the rewrite then dropped the identity call and left conv + identity
    foldable. find_regions now treats the identity as an alias of the entry."""
    bn = lambda: nn.BatchNorm2d(2)  # noqa: E731
    conv = lambda k: nn.Conv2d(2, 2, k, padding=k // 2, bias=False)  # noqa: E731
    mods = {"m0": bn(), "m1": bn(), "m2": bn(), "m3b0": conv(3), "m3b1": conv(3), "m3b1bn": bn(),
            "m3b2": nn.Identity(), "m4": bn(), "m5": conv(1), "m6": conv(1)}
    program = [("mod", (0,), "m0"), ("mod", (0,), "m1"), ("mod", (0,), "m2"), ("mod", (0,), "m3b0"),
               ("mod", (0,), "m3b1"), ("mod", (5,), "m3b1bn"), ("mod", (0,), "m3b2"), ("add", (4, 6), "m3"),
               ("add", (8, 7), "m3"), ("mod", (0,), "m4"), ("mod", (0,), "m5"), ("mod", (0,), "m6"),
               ("add", (0, 7), "m7")]
    net = DagNet(program, mods).double().eval()
    with torch.no_grad():
        net.ops["m3b1bn"].running_mean.uniform_(-1, 1)
        net.ops["m3b1bn"].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, SIZE, SIZE, dtype=torch.float64)
    folded, report = repcompiler.fold(net, x, return_report=True)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), rtol=1e-9, atol=1e-9)
    assert not [r for r in find_regions(trace_model(folded)) if r.foldable], report
    assert len({e.name for e in report.entries}) == len(report.entries)  # no entry twice


def _one_pass_reaches_a_fixpoint(program, mods) -> None:
    net = DagNet(program, mods).double().eval()
    x = torch.randn(2, 2, SIZE, SIZE, dtype=torch.float64)
    folded, report = repcompiler.fold(net, x, return_report=True)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), rtol=1e-9, atol=1e-9)
    assert [e.action for e in report.entries].count("folded") >= 1, report
    assert not [r for r in find_regions(trace_model(folded)) if r.foldable], report


_ID_CASES = {
    # conv(y) + Id(y), the identity also read by a ReLU: entry y, Id kept as an alias
    "alias used by a relu": (
        [("mod", (0,), "r0"), ("mod", (1,), "id"), ("mod", (1,), "c"), ("add", (3, 2), "s"),
         ("mod", (2,), "r1"), ("mod", (4,), "r2"), ("add", (5, 6), "o")],
        ("r0", "r1", "r2"), ("id",)),
    # a chain of two identities, the outer one used outside
    "chain of identities": (
        [("mod", (0,), "r0"), ("mod", (1,), "id"), ("mod", (2,), "id2"), ("mod", (1,), "c"), ("add", (4, 3), "s"),
         ("mod", (3,), "r1"), ("mod", (5,), "r2"), ("add", (6, 7), "o")],
        ("r0", "r1", "r2"), ("id", "id2")),
    # one nn.Identity called twice (no weights: not a sharing boundary); a second sum
    # region makes fold rewrite the forward
    "identity called twice": (
        [("mod", (0,), "id"), ("mod", (0,), "c"), ("add", (2, 1), "s"), ("mod", (0,), "id"),
         ("mod", (0,), "c2"), ("mod", (0,), "bn"), ("add", (5, 6), "t"),
         ("mod", (3,), "r1"), ("mod", (4,), "r2"), ("mod", (7,), "r3"), ("add", (8, 9), "o"), ("add", (11, 10), "o2")],
        ("r1", "r2", "r3"), ("id",)),
}


@pytest.mark.parametrize("case", sorted(_ID_CASES))
def test_identity_aliases_do_not_stop_a_region(case):
    """An identity of the entry's value used outside the region too does not stop it
    (fold drops identity calls, so it would be foldable after one pass)."""
    program, relus, ids = _ID_CASES[case]
    mods: dict[str, nn.Module] = {"c": nn.Conv2d(2, 2, 3, padding=1), "c2": nn.Conv2d(2, 2, 3, padding=1),
                                  "bn": nn.BatchNorm2d(2)}
    mods.update({r: nn.ReLU() for r in relus})
    mods.update({i: nn.Identity() for i in ids})
    _one_pass_reaches_a_fixpoint(program, mods)


class _BlockAfterConv(nn.Module):
    """A three-branch conv+BN block (3x3+BN, 1x1+BN, BN) whose input is a 1x1 conv's
    output."""

    def __init__(self, cin: int, c: int, bias: bool) -> None:
        super().__init__()
        self.pre = nn.Conv2d(cin, c, 1, bias=bias)
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.c = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.pre(x)
        return self.a(y) + self.b(y) + self.c(y)


@pytest.mark.parametrize("cin,c,bias,convs,why", [
    (8, 2, False, 2, "bigger"),         # merging with the producer would grow the kernel
    (8, 2, True, 2, "bias"),            # the producer's bias under the 3x3's zero padding
    (2, 8, False, 1, None),             # merging is exact and smaller: all one conv
])
def test_refused_block_folds_its_best_sub_region(cin, c, bias, convs, why):
    """The block ends as ONE conv (plus the producer when merging with it is refused),
    the refusal is reported with its reason and no exact fold is left undone."""
    torch.manual_seed(0)
    net = _BlockAfterConv(cin, c, bias).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(2, cin, SIZE, SIZE, dtype=torch.float64)
    assert undone_folds(trace_model(net))  # the check can fail: the unfolded block has some
    assert exact_folds_left(trace_model(net))  # so can the rule's
    folded, report = repcompiler.fold(net, x, return_report=True)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), rtol=1e-9, atol=1e-9)
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not undone_folds(trace_model(folded)), report
    assert not exact_folds_left(trace_model(folded)), report
    if why:
        assert any(why in e.reason for e in report.entries if e.action != "folded"), report


class _ConvBNIntoBlock(nn.Module):
    """conv (biased) -> BN, its output read only by a RepVGG-like block (3x3+BN, 1x1+BN):
    the whole region is refused (the BN's shift under the 3x3's zero padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.a(y) + self.b(y)


class _PatchEmbed(nn.Module):
    """``AvgPool2d(2, ceil_mode=True) -> conv1x1 -> BN`` (a downsampling shortcut / patch
    embedding): on an odd input the pool has partial windows and cannot merge."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.pool(x)))


@pytest.mark.parametrize("cls", [_ConvBNIntoBlock, _PatchEmbed])
def test_exact_folds_inside_a_refused_region(cls):
    """A refused maximal region still gets its conv -> BN pairs and its aligned block folded."""
    torch.manual_seed(0)
    net = cls().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded, report = repcompiler.fold(net, x, return_report=True)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), rtol=1e-9, atol=1e-9)
    assert report.refused, report  # the maximal region was refused ...
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), report  # ... its parts folded
    assert not exact_folds_left(trace_model(folded)), report
