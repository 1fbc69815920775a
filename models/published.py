"""Published reference figures of the torchvision models the zoo rebuilds.

Source: the torchvision model documentation, "Table of all available classification
weights" (https://pytorch.org/vision/stable/models.html), columns "Params" and "GFLOPS",
for the IMAGENET1K_V1 weights at 224x224, batch 1. torchvision computes "GFLOPS" with
fvcore-style counting, in which one fused multiply-add counts once: the column is giga
*MACs*, which is how it is stored here (``macs``). Parameter counts are exact; MACs are
rounded to the two decimals the table gives.
"""

from __future__ import annotations

__all__ = ["PUBLISHED"]

#: name -> {"params": exact parameter count, "macs": multiply-accumulates per image,
#: "image_size": input side the figures refer to, "source": where they come from}
PUBLISHED: dict[str, dict[str, int | float | str]] = {
    name: {"params": params, "macs": gmacs * 1e9, "image_size": 224,
           "source": "torchvision models docs, Params / GFLOPS columns (IMAGENET1K_V1)"}
    for name, params, gmacs in (
        ("alexnet", 61_100_840, 0.71),
        ("vgg11", 132_863_336, 7.61),
        ("vgg16", 138_357_544, 15.47),
        ("resnet18", 11_689_512, 1.81),
        ("resnet50", 25_557_032, 4.09),
        ("mobilenet_v2", 3_504_872, 0.30),
        ("vit_b_16", 86_567_656, 17.56),
    )
}
