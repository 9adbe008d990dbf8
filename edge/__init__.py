"""On-device runtime: onnxruntime inference and the MQTT agent. Imports without torch."""

__edgesplit__ = True

__all__: list[str] = []
