"""Hugging Face <-> Megatron-Core conversion: model families, sliced loading, streamed export."""
