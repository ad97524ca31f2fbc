"""Converters from public PyTorch checkpoints to Orbax checkpoints of cgn-jax models."""
