"""ONNX export and TensorRT engine build."""
