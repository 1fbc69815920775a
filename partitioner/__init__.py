"""ONNX graph-partitioning compiler for distributed DNN inference (edge, hub, cloud)."""

__version__ = "0.1.0"
