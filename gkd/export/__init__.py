"""Deployment: ONNX (fp32 / fp16 / int8 QDQ), TensorRT engines, AOTInductor packages, runtimes and latency."""
