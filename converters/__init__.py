"""Turns things into what travels or deploys: ONNX files, wire messages, tensor codecs, data files.

Heavy pieces (torch, onnx) are imported lazily by the modules that need them, so the
wire codecs and dataset loaders stay usable on a torch-free device.
"""

__edgesplit__ = True

__all__: list[str] = []
