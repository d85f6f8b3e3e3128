"""qtool: a compiler-style quantization toolkit for knowledge-distillation anomaly-detection models."""

__version__ = "0.1.0"
