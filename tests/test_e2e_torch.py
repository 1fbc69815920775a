"""The torch pipelining reference test: split, run the pieces, compare to the whole.

Each PyTorch module (a residual CNN, a detector with an FPN neck and three outputs, a GRU,
a transformer encoder, and a module exported with a dynamic batch that ``shapes=`` fixes)
goes through the whole compiler: ``load_model`` (dynamo exporter) -> a plan (the solver on
a system whose memory caps force a split, or a hand-made ``ir.Plan`` that cuts through
residuals and skip connections) -> ``compile_bundle`` -> the stages chained by the
runtime's ``LocalExecutor`` (and the back end's ``run_chain``). The chained outputs must
match ONNX Runtime on the whole prepared model and the module's own eager output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from partitioner import ir
from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.system import load_system
from partitioner.backend import compile_bundle
from partitioner.backend.manifest import Bundle, load_bundle
from partitioner.backend.verify import run_chain
from partitioner.errors import UserError
from partitioner.frontend import PreparedModel, load_model
from partitioner.solver import solve
from runtime.executor import LocalExecutor

pytest.importorskip("torch")
import torch  # noqa: E402  (after the skip: the torch extra is optional)
from torch import nn  # noqa: E402

pytestmark = pytest.mark.torch

# Chained stages run the same ORT kernels as the whole model; only fusions across a cut
# may round differently. Against eager PyTorch the kernels differ: ~1e-4 relative.
ORT_RTOL = 1e-5
TORCH_RTOL = 1e-4
DEVICES = ("edge", "hub", "cloud")

# --------------------------------------------------------------------------- modules


class Block(nn.Module):
    """A ResNet basic block (BN folded by the exporter), projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.layer3 = Block(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyDetector(nn.Module):
    """Three-level backbone, top-down FPN neck (Upsample + Concat), one head per level."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.c3 = nn.Conv2d(16, 32, 3, 2, 1)
        self.lat3 = nn.Conv2d(32, 16, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse2 = nn.Conv2d(32, 16, 3, 1, 1)
        self.fuse1 = nn.Conv2d(24, 8, 3, 1, 1)
        self.head1 = nn.Conv2d(8, 6, 1)
        self.head2 = nn.Conv2d(16, 6, 1)
        self.head3 = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        p1 = torch.relu(self.c1(x))
        p2 = torch.relu(self.c2(p1))
        p3 = torch.relu(self.c3(p2))
        n3 = torch.relu(self.lat3(p3))
        n2 = torch.relu(self.fuse2(torch.cat([self.up(n3), p2], 1)))
        n1 = torch.relu(self.fuse1(torch.cat([self.up(n2), p1], 1)))
        return self.head1(n1), self.head2(n2), self.head3(n3)


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.gru = nn.GRU(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        y, _ = self.gru(torch.tanh(self.embed(x)))
        return self.head(y[:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            for _ in range(2)])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


class BatchNet(nn.Module):
    """Conv -> pool -> MLP; exported with a symbolic batch.

    The offset is expanded to the symbolic batch, so the export carries a shape
    sub-graph (Shape -> Concat -> Expand) that fixing the batch must fold away.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 7)
        self.offset = nn.Parameter(torch.randn(1, 7))

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        y = y.reshape(y.shape[0], -1)
        return self.fc2(torch.relu(self.fc1(y))) + self.offset.expand(x.shape[0], -1)


# --------------------------------------------------------------------------- helpers


def _system_file(tmp_path: Path, graph: ir.LayerGraph) -> tuple[Path, int]:
    """Three devices, each holding at most ~45 % of the weights, so one cannot run it all.

    The cloud is the fastest, so the solver wants as many layers there as its memory takes;
    the raw input is captured on the edge and the result goes back there.
    """
    total = sum(layer.weight_bytes for layer in graph.layers)
    cap = max(max(layer.weight_bytes for layer in graph.layers), int(total * 0.45))
    assert cap < total, "the memory cap must rule out a single stage"
    text = ""
    for name, cls, flops in zip(DEVICES, ("edge", "hub", "cloud"), (1e9, 2e10, 4e11),
                                strict=True):
        text += (f'[[device]]\nname = "{name}"\nclass = "{cls}"\nflops = {flops}\n'
                 f"memory_bandwidth = 1e9\nnetwork_bandwidth = 1e8\nmemory = {cap}\n\n")
    for a, b in (("edge", "hub"), ("edge", "cloud"), ("hub", "cloud")):
        text += f'[[link]]\nbetween = ["{a}", "{b}"]\nbandwidth = 1e8\nlatency = 1e-4\n\n'
    text += '[application]\nsource = "edge"\ndestination = "edge"\n'
    path = tmp_path / "system.toml"
    path.write_text(text, encoding="utf-8")
    return path, cap


def _solved(prepared: PreparedModel, tmp_path: Path) -> tuple[ir.Plan, ir.System]:
    """Plan ``prepared`` with the solver on the memory-capped system; check the split."""
    system_path, cap = _system_file(tmp_path, prepared.graph)
    system = load_system(system_path)
    table = build_cost_table(prepared.graph, system)
    plan = solve(table, ir.Objective(kind="latency"))
    assert plan.status == "optimal"
    assert 2 <= len(plan.stages) <= 5, plan.stages
    layers = prepared.graph.layers
    held = dict.fromkeys(DEVICES, 0)
    for s in plan.stages:
        held[s.device] += sum(layer.weight_bytes for layer in layers[s.first:s.last + 1])
    assert max(held.values()) <= cap, held
    return plan, system


def _hand_plan(*stages: tuple[str, int, int]) -> ir.Plan:
    est = ir.Estimate(latency=0.0, compute=0.0, communication=0.0, weight_loading=0.0,
                      bottleneck=0.0)
    return ir.Plan(status="feasible", objective="latency",
                   stages=tuple(ir.Stage(d, None, a, b) for d, a, b in stages),
                   estimate=est, solve_seconds=0.0)


def _scaled_close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    # Relative to the output's scale, as the back end's verification does.
    scale = max(1.0, float(np.max(np.abs(want))))
    assert got.shape == want.shape and got.dtype == want.dtype, what
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def _torch_outputs(module: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _pipeline(prepared: PreparedModel, plan: ir.Plan, system: ir.System | None,
              tmp_path: Path, module: nn.Module, batches: Sequence[np.ndarray],
              name: str = "bundle") -> Bundle:
    """Compile ``plan``, chain its stages on every batch, compare with ORT and torch.

    Returns the loaded bundle (for model-specific checks of its routing).
    """
    out = compile_bundle(prepared, plan, system, tmp_path / name)
    bundle = load_bundle(out)
    assert [(s.device, s.first, s.last) for s in bundle.stages] == \
        [(s.device, s.first, s.last) for s in plan.stages]
    (input_name,) = [t.name for t in prepared.graph.inputs]
    outputs = [t.name for t in prepared.graph.outputs]
    whole = ort.InferenceSession(prepared.model.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    with LocalExecutor(out) as executor:
        # All requests in flight at once: request k+1 enters stage 0 while k is further on.
        futures = [executor.submit({input_name: x}) for x in batches]
        chained = [f.result(timeout=60) for f in futures]
    for x, got in zip(batches, chained, strict=True):
        assert set(got) == set(outputs)
        reference = dict(zip(outputs, whole.run(outputs, {input_name: x}), strict=True))
        for k in outputs:
            _scaled_close(got[k], reference[k], ORT_RTOL, f"{k}: chained vs whole model")
        for k, want in zip(outputs, _torch_outputs(module, x), strict=True):
            _scaled_close(got[k], want, TORCH_RTOL, f"{k}: chained vs PyTorch")
    # The back end's own chain (manifest routing, one session at a time) agrees too.
    again = run_chain(bundle.path, bundle.stages, {input_name: batches[0]})
    for k in outputs:
        np.testing.assert_array_equal(again[k], chained[0][k])
    return bundle


def _inputs(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


# --------------------------------------------------------------------------- tests


def test_resnet_split_by_memory_caps(tmp_path):
    torch.manual_seed(0)
    module = SmallResNet().eval()
    # Non-trivial BatchNorm statistics, so folding them into the convs is exercised.
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    batches = _inputs((1, 3, 32, 32))
    prepared = load_model(module, example_inputs=(torch.from_numpy(batches[0]),))
    # Every block's residual Add is carried by the block's last conv layer.
    assert sum("Add" in layer.ops for layer in prepared.graph.layers) == 3
    plan, system = _solved(prepared, tmp_path)
    _pipeline(prepared, plan, system, tmp_path, module, batches)


def test_detector_fpn_three_outputs(tmp_path):
    torch.manual_seed(1)
    module = TinyDetector().eval()
    batches = _inputs((1, 3, 32, 32), seed=1)
    prepared = load_model(module, example_inputs=(torch.from_numpy(batches[0]),))
    g = prepared.graph
    assert len(g.outputs) == 3
    assert any("Resize" in layer.ops for layer in g.layers)
    assert any(n.op_type == "Concat" for n in prepared.model.graph.node)
    plan, system = _solved(prepared, tmp_path)
    _pipeline(prepared, plan, system, tmp_path, module, batches, "solved")
    # A hand-made plan that cuts the neck: p1 and p2 (the FPN skips) cross every cut
    # between the backbone and their Concat, and head3's output is produced early.
    names = [layer.name for layer in g.layers]
    c3, fuse2 = names.index("c3"), names.index("fuse2")
    hand = _hand_plan(("edge", 0, c3 - 1), ("hub", c3, fuse2 - 1),
                      ("cloud", fuse2, len(names) - 1))
    for k in range(c3 - 1, fuse2):
        assert len(g.cut_after(k).tensors) >= 2  # a skip rides along every cut here
    bundle = _pipeline(prepared, hand, system, tmp_path, module, batches, "hand")
    # direct sends: the FPN skips go straight from the backbone to the neck's stage, no
    # stage relays them
    assert not bundle.stages[1].forward
    skips = {p.name for s in bundle.stages[0].sends if s.to == "2" for p in s.tensors}
    assert skips, "an FPN skip must go direct from stage 0 to stage 2"


def test_gru_split(tmp_path):
    torch.manual_seed(2)
    module = GRUNet().eval()
    batches = _inputs((2, 10, 6), seed=2)
    prepared = load_model(module, example_inputs=(torch.from_numpy(batches[0]),))
    assert sum("GRU" in layer.ops for layer in prepared.graph.layers) == 2
    plan, system = _solved(prepared, tmp_path)
    _pipeline(prepared, plan, system, tmp_path, module, batches)


def test_transformer_encoder_hand_plan(tmp_path):
    torch.manual_seed(3)
    module = Encoder().eval()
    batches = _inputs((2, 12, 8), seed=3)
    prepared = load_model(module, example_inputs=(torch.from_numpy(batches[0]),))
    names = [layer.name for layer in prepared.graph.layers]
    # Module paths, not the exporter's repeated cumulative scopes.
    assert "blocks.0.linear1" in names and "blocks.1.self_attn.out_proj" in names
    assert not any("blocks.0.blocks.0" in n for n in names)
    # Four stages, back and forth, each cut inside a block so the residual stream crosses
    # cuts next to the attention's intermediates.
    attn1, ff1 = names.index("blocks.0.self_attn_1"), names.index("blocks.0.linear2")
    attn2 = names.index("blocks.1.self_attn_1")
    plan = _hand_plan(("edge", 0, attn1 - 1), ("cloud", attn1, ff1 - 1),
                      ("hub", ff1, attn2), ("cloud", attn2 + 1, len(names) - 1))
    _pipeline(prepared, plan, None, tmp_path, module, batches)


def test_dynamic_batch_fixed_by_shapes(tmp_path):
    torch.manual_seed(4)
    module = BatchNet().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(module, (torch.randn(2, 3, 8, 8),), dynamo=True,
                                dynamic_shapes=({0: batch},), verbose=False)
    model = program.model_proto
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.HasField("dim_value")  # really symbolic
    assert any(n.op_type == "Shape" for n in model.graph.node)
    (input_name,) = [i.name for i in model.graph.input]
    with pytest.raises(UserError, match=input_name):  # the batch must be fixed
        load_model(model)
    # The batch the exporter saw (2) is not the one we fix (3).
    prepared = load_model(model, shapes={input_name: (3, 3, 8, 8)})
    assert prepared.graph.inputs[0].shape == (3, 3, 8, 8)
    assert prepared.graph.outputs[0].shape == (3, 7)
    assert prepared.folded > 0
    assert not any(n.op_type == "Shape" for n in prepared.model.graph.node)
    plan, system = _solved(prepared, tmp_path)
    _pipeline(prepared, plan, system, tmp_path, module, _inputs((3, 3, 8, 8), seed=4))
