"""Convolutional classifiers in the torchvision layouts, plus a tiny CNN for fast tests.

Module paths, channel counts, kernel sizes and parameter counts follow torchvision
(``torchvision.models.alexnet``, ``vgg11``/``vgg16``, ``resnet18``/``resnet50`` (v1.5:
stride on the 3x3 conv), ``mobilenet_v2``), so the trainable-parameter counts equal the
published ones exactly. Dropout is left out: it is the identity at inference, and
torch.onnx drops it too.
"""

from __future__ import annotations

from models.builder import Dim, GraphBuilder

__all__ = ["alexnet", "vgg11", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "tiny_cnn"]


def _image_input(g: GraphBuilder, batch: Dim, size: int, name: str = "input") -> str:
    return g.input(name, (batch, 3, size, size))


def _classify(g: GraphBuilder, x: str) -> str:
    return g.output(x, "logits")


def alexnet(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """torchvision AlexNet (61,100,840 parameters at 1000 classes)."""
    g = GraphBuilder("alexnet", seed=seed)
    x = _image_input(g, batch, image_size)
    # (index in features, out channels, kernel, stride, padding, max-pool after)
    spec = [(0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
            (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True)]
    for idx, cout, k, s, p, pool in spec:
        x = g.conv(x, cout, k, stride=s, padding=p, name=f"features.{idx}")
        x = g.relu(x, name=f"features.{idx + 1}")
        if pool:
            x = g.maxpool(x, 3, 2, name=f"features.{idx + 2}")
    x = g.adaptive_avgpool(x, 6, name="avgpool") or x
    x = g.flatten(x, name="flatten")
    x = g.relu(g.gemm(x, 4096, name="classifier.1"), name="classifier.2")
    x = g.relu(g.gemm(x, 4096, name="classifier.4"), name="classifier.5")
    _classify(g, g.gemm(x, num_classes, name="classifier.6"))
    return g.build(doc="AlexNet (torchvision layout), random weights")


_VGG_CFG: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


def _vgg(name: str, batch: Dim, image_size: int, seed: int, num_classes: int):
    g = GraphBuilder(name, seed=seed)
    x = _image_input(g, batch, image_size)
    idx = 0
    for item in _VGG_CFG[name]:
        if item == "M":
            x = g.maxpool(x, 2, 2, name=f"features.{idx}")
            idx += 1
        else:
            x = g.conv(x, int(item), 3, padding=1, name=f"features.{idx}")
            x = g.relu(x, name=f"features.{idx + 1}")
            idx += 2
    x = g.adaptive_avgpool(x, 7, name="avgpool") or x
    x = g.flatten(x, name="flatten")
    x = g.relu(g.gemm(x, 4096, name="classifier.0"), name="classifier.1")
    x = g.relu(g.gemm(x, 4096, name="classifier.3"), name="classifier.4")
    _classify(g, g.gemm(x, num_classes, name="classifier.6"))
    return g.build(doc=f"{name.upper()} (torchvision layout, no batch norm), random weights")


def vgg11(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """torchvision VGG11 (132,863,336 parameters)."""
    return _vgg("vgg11", batch, image_size, seed, num_classes)


def vgg16(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """torchvision VGG16 (138,357,544 parameters)."""
    return _vgg("vgg16", batch, image_size, seed, num_classes)


#: Scale of the last BN of a residual branch (see ``GraphBuilder.bn``).
_RESIDUAL_GAMMA = 0.3


def _conv_bn(g: GraphBuilder, x: str, cout: int, k: int, *, stride: int = 1, conv: str,
             bn: str, relu: str | None, gamma: float = 1.0) -> str:
    x = g.bn(g.conv(x, cout, k, stride=stride, bias=False, name=conv), name=bn, gamma=gamma)
    return g.relu(x, name=relu) if relu else x


def _basic_block(g: GraphBuilder, x: str, planes: int, stride: int, p: str) -> str:
    cin = g.shape(x)[1]
    y = _conv_bn(g, x, planes, 3, stride=stride, conv=f"{p}.conv1", bn=f"{p}.bn1",
                 relu=f"{p}.relu")
    y = _conv_bn(g, y, planes, 3, conv=f"{p}.conv2", bn=f"{p}.bn2", relu=None,
                 gamma=_RESIDUAL_GAMMA)
    if stride != 1 or cin != planes:
        x = _conv_bn(g, x, planes, 1, stride=stride, conv=f"{p}.downsample.0",
                     bn=f"{p}.downsample.1", relu=None)
    return g.relu(g.add(y, x, name=f"{p}.add"), name=f"{p}.relu")


def _bottleneck(g: GraphBuilder, x: str, planes: int, stride: int, p: str) -> str:
    cin, cout = g.shape(x)[1], planes * 4
    y = _conv_bn(g, x, planes, 1, conv=f"{p}.conv1", bn=f"{p}.bn1", relu=f"{p}.relu")
    # ResNet v1.5 (torchvision): the stride sits on the 3x3 conv.
    y = _conv_bn(g, y, planes, 3, stride=stride, conv=f"{p}.conv2", bn=f"{p}.bn2",
                 relu=f"{p}.relu")
    y = _conv_bn(g, y, cout, 1, conv=f"{p}.conv3", bn=f"{p}.bn3", relu=None,
                 gamma=_RESIDUAL_GAMMA)
    if stride != 1 or cin != cout:
        x = _conv_bn(g, x, cout, 1, stride=stride, conv=f"{p}.downsample.0",
                     bn=f"{p}.downsample.1", relu=None)
    return g.relu(g.add(y, x, name=f"{p}.add"), name=f"{p}.relu")


def _resnet(name: str, blocks: list[int], bottleneck: bool, batch: Dim, image_size: int,
            seed: int, num_classes: int):
    g = GraphBuilder(name, seed=seed)
    x = _image_input(g, batch, image_size)
    x = _conv_bn(g, x, 64, 7, stride=2, conv="conv1", bn="bn1", relu="relu")
    x = g.maxpool(x, 3, 2, padding=1, name="maxpool")
    block = _bottleneck if bottleneck else _basic_block
    for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            x = block(g, x, planes, stride, f"layer{i + 1}.{j}")
    x = g.flatten(g.global_avgpool(x, name="avgpool"), name="flatten")
    _classify(g, g.gemm(x, num_classes, name="fc"))
    return g.build(doc=f"{name} (torchvision layout, v1.5), random weights")


def resnet18(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """torchvision ResNet-18 (11,689,512 parameters)."""
    return _resnet("resnet18", [2, 2, 2, 2], False, batch, image_size, seed, num_classes)


def resnet50(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """torchvision ResNet-50 (25,557,032 parameters)."""
    return _resnet("resnet50", [3, 4, 6, 3], True, batch, image_size, seed, num_classes)


def _conv_bn_relu6(g: GraphBuilder, x: str, cout: int, k: int, p: str, *, stride: int = 1,
                   groups: int = 1) -> str:
    """torchvision ``Conv2dNormActivation``: ``p.0`` conv, ``p.1`` BN, ``p.2`` ReLU6."""
    x = g.conv(x, cout, k, stride=stride, groups=groups, bias=False, name=f"{p}.0")
    return g.relu6(g.bn(x, name=f"{p}.1"), name=f"{p}.2")


def mobilenet_v2(batch: Dim = 1, image_size: int = 224, *, seed: int = 0,
                 num_classes: int = 1000):
    """torchvision MobileNetV2, width 1.0 (3,504,872 parameters)."""
    g = GraphBuilder("mobilenet_v2", seed=seed)
    x = _image_input(g, batch, image_size)
    x = _conv_bn_relu6(g, x, 32, 3, "features.0", stride=2)
    # (expansion t, out channels c, repeats n, first stride s), from the MobileNetV2 paper.
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]
    idx = 1
    for t, c, n, s in settings:
        for j in range(n):
            p = f"features.{idx}.conv"
            cin = int(g.shape(x)[1])
            stride = s if j == 0 else 1
            hidden = cin * t
            y, k = x, 0
            if t != 1:
                y = _conv_bn_relu6(g, y, hidden, 1, f"{p}.0")
                k = 1
            # Depthwise 3x3 (groups = channels), then the linear 1x1 projection.
            y = _conv_bn_relu6(g, y, hidden, 3, f"{p}.{k}", stride=stride, groups=hidden)
            y = g.conv(y, c, 1, bias=False, name=f"{p}.{k + 1}")
            residual = stride == 1 and cin == c
            y = g.bn(y, name=f"{p}.{k + 2}", gamma=_RESIDUAL_GAMMA if residual else 1.0)
            # Inverted residual: identity shortcut only when shape is preserved.
            x = g.add(x, y, name=f"features.{idx}.add") if residual else y
            idx += 1
    x = _conv_bn_relu6(g, x, 1280, 1, f"features.{idx}")
    x = g.flatten(g.global_avgpool(x, name="avgpool"), name="flatten")
    _classify(g, g.gemm(x, num_classes, name="classifier.1"))
    return g.build(doc="MobileNetV2 (torchvision layout), random weights")


def tiny_cnn(batch: Dim = 1, image_size: int = 32, *, seed: int = 0, num_classes: int = 10):
    """A four-layer chain CNN (24,234 parameters) for fast end-to-end tests.

    conv(3->16) ReLU MaxPool, conv(16->32) ReLU MaxPool, conv(32->64) ReLU, global average
    pool, Linear(64->classes): four major layers, a single path, tiny tensors.
    """
    g = GraphBuilder("tiny_cnn", seed=seed)
    x = _image_input(g, batch, image_size)
    x = g.maxpool(g.relu(g.conv(x, 16, 3, name="conv1"), name="relu1"), 2, 2, name="pool1")
    x = g.maxpool(g.relu(g.conv(x, 32, 3, name="conv2"), name="relu2"), 2, 2, name="pool2")
    x = g.relu(g.conv(x, 64, 3, name="conv3"), name="relu3")
    x = g.flatten(g.global_avgpool(x, name="avgpool"), name="flatten")
    _classify(g, g.gemm(x, num_classes, name="fc"))
    return g.build(doc="tiny chain CNN for fast tests, random weights")
