"""PyTorch modules through the dynamo exporter: a residual, an LSTM, an attention block."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from partitioner.frontend import load_model

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


class Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.conv2(a) + a
        return self.fc(b.mean((2, 3)))


class Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 10, batch_first=True)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


class Attention(torch.nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y) + x


def _check_runs(prepared, module, x):
    want = module(x).detach().numpy()
    session = ort.InferenceSession(prepared.model.SerializeToString())
    got = session.run(None, {prepared.graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_residual_module():
    torch.manual_seed(0)
    module, x = Residual().eval(), torch.randn(1, 3, 16, 16)
    prepared = load_model(module, example_inputs=(x,))
    g = prepared.graph
    assert prepared.path is None and len(g.sha256) == 64
    # Names come from the exporter's module scopes, not its generic node names; the Conv
    # that BatchNorm was fused into is still named after the conv.
    assert [layer.name for layer in g.layers] == ["conv1", "conv2", "fc"]
    assert g.layers[1].ops[:2] == ("Conv", "Add")
    assert g.layers[0].weight_count == 8 * 27 + 8
    assert g.cut_after(0).nbytes == 8 * 16 * 16 * 4
    _check_runs(prepared, module, x)


def test_lstm_module():
    torch.manual_seed(0)
    module, x = Recurrent().eval(), torch.randn(2, 7, 6)
    prepared = load_model(module, example_inputs=x)
    lstm = next(layer for layer in prepared.graph.layers if "LSTM" in layer.ops)
    assert lstm.name == "lstm"
    params = sum(p.numel() for p in module.lstm.parameters())
    # The exporter adds the zero initial states (1 x batch x H, shared by h0 and c0).
    assert params <= lstm.weight_count <= params + 2 * 2 * 10
    macs = 7 * 2 * 4 * 10 * (6 + 10)  # steps * batch * gates * H * (I + H)
    assert prepared.stats.macs[lstm.index] == macs
    _check_runs(prepared, module, x)


def test_attention_module():
    torch.manual_seed(0)
    module, x = Attention().eval(), torch.randn(2, 5, 16)
    prepared = load_model(module, example_inputs=(x,))
    g = prepared.graph
    names = [layer.name for layer in g.layers]
    assert names[0] == "qkv" and names[-1] == "proj" and len(set(names)) == len(names)
    assert sum(1 for layer in g.layers if layer.ops[0] == "MatMul") == 4
    # The input x is live across every cut up to the residual add in the last layer.
    assert all("x" in g.cut_after(k).tensors for k in range(len(g.layers) - 1))
    assert not {"Shape", "Gather", "Concat"} & {n.op_type for n in prepared.model.graph.node}
    _check_runs(prepared, module, x)


def test_export_failure_is_a_user_error():
    from partitioner.errors import UserError

    class Broken(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x * 2
            return x

    with pytest.raises(UserError, match="PyTorch module Broken"):
        load_model(Broken(), example_inputs=torch.randn(2))
    with pytest.raises(UserError, match="example_inputs are required"):
        load_model(Residual())
