"""The hardware side: export, build and measure models on a target device.

`deploy` never imports `compressor`; it knows about ONNX files, backends,
profiles and measurements, not about pruning.
"""
