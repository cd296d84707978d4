"""lsaq: Layer-Specific Adaptive Quantization. One base LLM, one quantized artifact per target device."""

__version__ = "0.1.0"
