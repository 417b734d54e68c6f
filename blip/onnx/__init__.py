"""ONNX export (`blip export-onnx`) and an onnxruntime runner for the exported graphs."""
