"""Interoperability with other frameworks' checkpoints: `from jaxlm.interop import hf` (Hugging Face)."""
