"""Module semantics: parameter discovery and names, tied parameters, children/modules,
train/eval, zero_grad, state_dict round trips and load errors, to(), repr, ModuleList,
Sequential."""
from __future__ import annotations

import numpy as np
import pytest

from nn import MLP, Block, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter, Sequential
from tensor import Tensor


class Net(Module):
    """Embedding -> 2 Blocks -> LayerNorm, head tied to the embedding (like GPT)."""

    def __init__(self, V=11, C=8, n_layer=2, seed=0):
        rng = np.random.default_rng(seed)
        self.wte = Embedding(V, C, rng=rng)
        self.h = ModuleList(Block(C, 2, dropout=0.1, rng=rng) for _ in range(n_layer))
        self.ln_f = LayerNorm(C)
        self.head = Linear(C, V, bias=False, rng=rng)
        self.head.weight = self.wte.weight  # tied

    def forward(self, ids):
        x = self.wte(ids)
        for b in self.h:
            x = b(x)
        return self.head(self.ln_f(x))


BLOCK_NAMES = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias"]


def test_named_parameters_dotted_and_ordered():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    expect = ["wte.weight"] + [f"h.{i}.{n}" for i in range(2) for n in BLOCK_NAMES] + ["ln_f.weight", "ln_f.bias"]
    assert names == expect  # head.weight is the tied wte.weight: listed once, under the first name
    assert all(isinstance(p, Parameter) and p.requires_grad for p in net.parameters())
    assert [n for n, _ in net.named_parameters(prefix="model")] == ["model." + n for n in expect]
    C, V = 8, 11
    per_block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    assert net.num_parameters() == V * C + 2 * per_block + 2 * C
    assert len(net.parameters()) == len(set(map(id, net.parameters())))


def test_shared_parameter_gradient_accumulates_once_listed():
    lin = Linear(3, 3, bias=False, rng=np.random.default_rng(0))
    seq = Sequential(lin, lin)  # the same module twice
    assert [n for n, _ in seq.named_parameters()] == ["0.weight"]
    x = Tensor(np.ones((1, 3), np.float32))
    seq(x).sum().backward()
    W = lin.weight.numpy()
    # d/dW of sum(W W x): grad = (1^T W)^T x^T + 1 (W x)^T
    ones = np.ones((1, 3))
    ref = (ones @ W).T @ x.numpy() + ones.T @ (x.numpy() @ W.T)
    np.testing.assert_allclose(lin.weight.grad, ref, rtol=1e-5)


def test_children_and_modules():
    net = Net()
    assert [n for n, _ in net.named_children()] == ["wte", "h", "ln_f", "head"]
    assert list(net.children())[1] is net.h
    names = [n for n, _ in net.named_modules()]
    assert names[0] == "" and "h.0.attn.c_attn" in names and "h.1.mlp.dropout" in names
    assert len(list(net.modules())) == len(names)
    assert all(isinstance(m, Module) for m in net.modules())


def test_train_eval_propagate():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.h[1].train()
    assert net.h[1].mlp.dropout.training and not net.h[0].mlp.dropout.training
    net.train()
    assert all(m.training for m in net.modules())
    # eval mode is deterministic (dropout off), train mode with dropout is not
    ids = np.array([[1, 2, 3, 4]])
    net.eval()
    np.testing.assert_array_equal(net(ids).numpy(), net(ids).numpy())


def test_zero_grad():
    net = Net()
    net.train(False)
    net(np.array([[1, 2]])).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_state_dict_round_trip():
    a, b = Net(seed=0), Net(seed=1)
    sd = a.state_dict()
    assert list(sd) == [n for n, _ in a.named_parameters()]
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    # a copy: changing the model later does not change the dict
    a.ln_f.weight.data[...] = 7.0
    assert np.all(sd["ln_f.weight"] == 1.0)
    a.ln_f.weight.data[...] = 1.0
    missing, unexpected = b.load_state_dict(sd)
    assert missing == [] and unexpected == []
    for (n1, x), (n2, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2
        np.testing.assert_array_equal(x, y)
    b.eval(), a.eval()
    ids = np.array([[0, 3, 5]])
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    assert b.head.weight is b.wte.weight  # tying survives loading
    # the loaded arrays are copies: editing the dict afterwards leaves the model alone
    sd["ln_f.bias"][...] = 3.0
    assert np.all(b.ln_f.bias.numpy() == 0.0)
    # dtype follows the model (float64 checkpoint into float32 model)
    b.load_state_dict({k: v.astype(np.float64) for k, v in a.state_dict().items()})
    assert all(p.dtype == np.float32 for p in b.parameters())


def test_load_state_dict_strict_errors_list_everything_and_change_nothing():
    net = Net()
    before = net.state_dict()
    bad = dict(before)
    del bad["ln_f.bias"], bad["h.0.ln_1.weight"]
    bad["extra.weight"] = np.zeros(3)
    bad["h.1.mlp.c_fc.weight"] = np.zeros((5, 5), np.float32)
    bad["wte.weight"] = before["wte.weight"] + 1  # a valid key that would load
    with pytest.raises(KeyError) as e:
        net.load_state_dict(bad)
    msg = str(e.value)
    for key in ("ln_f.bias", "h.0.ln_1.weight", "extra.weight", "h.1.mlp.c_fc.weight"):
        assert key in msg
    assert "missing" in msg and "unexpected" in msg and "shape" in msg
    assert "(5, 5)" in msg and "(32, 8)" in msg
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # only a shape mismatch: still an error, also with strict=False
    with pytest.raises(KeyError, match="shape"):
        net.load_state_dict({"ln_f.weight": np.ones(3, np.float32)}, strict=False)
    np.testing.assert_array_equal(net.ln_f.weight.numpy(), before["ln_f.weight"])


def test_load_state_dict_non_strict():
    net = Net()
    new = np.full(8, 2.0, np.float32)
    missing, unexpected = net.load_state_dict({"ln_f.weight": new, "lm_head.weight": np.zeros((11, 8))},
                                              strict=False)
    assert unexpected == ["lm_head.weight"]
    assert set(missing) == set(net.state_dict()) - {"ln_f.weight"}
    np.testing.assert_array_equal(net.ln_f.weight.numpy(), new)


def test_to_cpu_and_bad_device():
    net = Net()
    before = net.state_dict()
    assert net.to("cpu") is net
    assert all(isinstance(p.data, np.ndarray) and p.device == "cpu" for p in net.parameters())
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ValueError, match="unknown device"):
        net.to("tpu")


def test_to_cuda_round_trip():
    pytest.importorskip("cupy")
    try:
        import cupy
        cupy.zeros(1)
    except Exception:  # cupy installed but no usable GPU
        pytest.skip("no CUDA device")
    net = Net()
    before = net.state_dict()
    net.to("cuda")
    assert all(p.device == "cuda" for p in net.parameters()) and net.head.weight is net.wte.weight
    for k, v in net.state_dict().items():  # state_dict returns host arrays
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, before[k])
    net.to("cpu")
    assert all(p.device == "cpu" for p in net.parameters())


def test_repr_shows_structure_and_counts():
    m = MLP(4, rng=np.random.default_rng(0))
    r = repr(m)
    assert r.startswith("MLP(")
    assert "(c_fc): Linear(4, 16, bias=True)" in r and "(c_proj): Linear(16, 4, bias=True)" in r
    assert "(dropout): Dropout(p=0.0)" in r
    assert f"{4 * 16 + 16 + 16 * 4 + 4:,} parameters" in r
    net = Net()
    assert f"{net.num_parameters():,} parameters" in repr(net)
    assert "(0): Block(" in repr(net) and "n_head=2" in repr(net)
    assert repr(Parameter(np.zeros(2, np.float32))).startswith("Parameter(")


def test_module_list():
    ml = ModuleList([Linear(2, 2), Linear(2, 3)])
    assert len(ml) == 2
    assert ml[1].out_features == 3 and ml[-1] is ml[1] and ml[-2] is ml[0]
    with pytest.raises(IndexError):
        ml[2]
    ml.append(LayerNorm(3))
    assert len(ml) == 3 and isinstance(list(ml)[2], LayerNorm)
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias",
                                                     "2.weight", "2.bias"]
    assert len(ModuleList()) == 0 and list(ModuleList()) == []


def test_sequential():
    rng = np.random.default_rng(0)
    seq = Sequential(Linear(3, 4, rng=rng), Dropout(0.5), Linear(4, 2, rng=rng))
    seq.eval()
    x = rng.standard_normal((5, 3)).astype(np.float32)
    l0, l2 = seq[0], seq[2]
    ref = (x @ l0.weight.numpy().T + l0.bias.numpy()) @ l2.weight.numpy().T + l2.bias.numpy()
    np.testing.assert_allclose(seq(Tensor(x)).numpy(), ref, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_forward_not_defined():
    with pytest.raises(NotImplementedError, match="forward"):
        Module()(1)
