"""Compression of trained parameters: pruning masks (`pruning`); quantization lives in `jaxlm.models.quantize`."""
