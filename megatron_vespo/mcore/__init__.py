"""Megatron-Core integration: CPU support, model building, weights, parallel layouts."""
