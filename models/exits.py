"""Classifiers with early-exit heads (BranchyNet; DISS §6.4), random weights.

Each model has several outputs: the main classifier's ``logits`` first, then one output per
exit head (``exit1``, ...). The nodes of an exit branch come right after the layer they
fork from, so the layer order the front end keeps is: trunk up to the fork, the branch
(ending in the exit head), then the rest of the trunk. A stage can then end in the exit
head without computing any of the continuation first (see docs/EXITS.md).

* :func:`branchy_alexnet`: torchvision AlexNet plus BranchyNet's exit after conv2 (after
  ``features.5``, the max-pool that follows conv2): a branch of two 3x3 convolutions and
  one fully connected layer (``exit1.conv1``, ``exit1.conv2``, ``exit1.fc``), about 46
  MFLOPs against AlexNet's 1.43 GFLOPs;
* :func:`resnet18_exit`: torchvision ResNet-18 plus an exit after ``layer2`` (a strided
  3x3 convolution with batch norm, global average pooling and a fully connected layer);
* :func:`tiny_branchy`: ``tiny_cnn`` with an exit after conv1, for fast tests.
"""

from __future__ import annotations

from models.builder import Dim, GraphBuilder
from models.cnn import _basic_block, _conv_bn

__all__ = ["branchy_alexnet", "resnet18_exit", "tiny_branchy", "EXIT_PROBABILITY"]

#: DISS §6.4: the share of inputs that leave BranchyNet AlexNet at its first exit.
EXIT_PROBABILITY = 0.656


def branchy_alexnet(batch: Dim = 1, image_size: int = 224, *, seed: int = 0,
                    num_classes: int = 1000):
    """AlexNet (torchvision layout) with one BranchyNet exit after conv2."""
    g = GraphBuilder("branchy_alexnet", seed=seed)
    x = g.input("input", (batch, 3, image_size, image_size))
    spec = [(0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
            (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True)]
    exit_out = None
    for idx, cout, k, s, p, pool in spec:
        x = g.conv(x, cout, k, stride=s, padding=p, name=f"features.{idx}")
        x = g.relu(x, name=f"features.{idx + 1}")
        if pool:
            x = g.maxpool(x, 3, 2, name=f"features.{idx + 2}")
        if idx == 3:  # the exit branch forks after conv2 (its ReLU and max-pool)
            b = g.relu(g.conv(x, 64, 3, padding=1, name="exit1.conv1"), name="exit1.relu1")
            b = g.relu(g.conv(b, 32, 3, padding=1, name="exit1.conv2"), name="exit1.relu2")
            b = g.flatten(g.maxpool(b, 3, 2, name="exit1.pool"), name="exit1.flatten")
            exit_out = g.gemm(b, num_classes, name="exit1.fc")
    x = g.adaptive_avgpool(x, 6, name="avgpool") or x
    x = g.flatten(x, name="flatten")
    x = g.relu(g.gemm(x, 4096, name="classifier.1"), name="classifier.2")
    x = g.relu(g.gemm(x, 4096, name="classifier.4"), name="classifier.5")
    g.output(g.gemm(x, num_classes, name="classifier.6"), "logits")
    assert exit_out is not None
    g.output(exit_out, "exit1")
    return g.build(doc="BranchyNet AlexNet: exit after conv2, random weights")


def resnet18_exit(batch: Dim = 1, image_size: int = 224, *, seed: int = 0,
                  num_classes: int = 1000):
    """ResNet-18 (torchvision layout) with one exit after ``layer2``."""
    g = GraphBuilder("resnet18_exit", seed=seed)
    x = g.input("input", (batch, 3, image_size, image_size))
    x = _conv_bn(g, x, 64, 7, stride=2, conv="conv1", bn="bn1", relu="relu")
    x = g.maxpool(x, 3, 2, padding=1, name="maxpool")
    exit_out = None
    for i, planes in enumerate((64, 128, 256, 512)):
        for j in range(2):
            x = _basic_block(g, x, planes, 2 if (i > 0 and j == 0) else 1, f"layer{i + 1}.{j}")
        if i == 1:  # the exit branch forks after layer2
            b = _conv_bn(g, x, 128, 3, stride=2, conv="exit1.conv", bn="exit1.bn",
                         relu="exit1.relu")
            b = g.flatten(g.global_avgpool(b, name="exit1.avgpool"), name="exit1.flatten")
            exit_out = g.gemm(b, num_classes, name="exit1.fc")
    x = g.flatten(g.global_avgpool(x, name="avgpool"), name="flatten")
    g.output(g.gemm(x, num_classes, name="fc"), "logits")
    assert exit_out is not None
    g.output(exit_out, "exit1")
    return g.build(doc="ResNet-18 with an exit after layer2, random weights")


def tiny_branchy(batch: Dim = 1, image_size: int = 32, *, seed: int = 0, num_classes: int = 10):
    """``tiny_cnn`` with one exit after conv1 (a 3x3 convolution, global average pooling and
    a fully connected layer): three trunk stages' worth of layers, tiny tensors."""
    g = GraphBuilder("tiny_branchy", seed=seed)
    x = g.input("input", (batch, 3, image_size, image_size))
    x = g.maxpool(g.relu(g.conv(x, 16, 3, name="conv1"), name="relu1"), 2, 2, name="pool1")
    b = g.relu(g.conv(x, 8, 3, name="exit1.conv"), name="exit1.relu")
    b = g.flatten(g.global_avgpool(b, name="exit1.avgpool"), name="exit1.flatten")
    exit_out = g.gemm(b, num_classes, name="exit1.fc")
    x = g.maxpool(g.relu(g.conv(x, 32, 3, name="conv2"), name="relu2"), 2, 2, name="pool2")
    x = g.relu(g.conv(x, 64, 3, name="conv3"), name="relu3")
    x = g.flatten(g.global_avgpool(x, name="avgpool"), name="flatten")
    g.output(g.gemm(x, num_classes, name="fc"), "logits")
    g.output(exit_out, "exit1")
    return g.build(doc="tiny chain CNN with an exit after conv1, random weights")
