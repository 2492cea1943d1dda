"""Inference on either backend: loading a model with its adapter, sampling, fusing."""
