"""Reasoning tasks and their measurement: problem data, prompts, generation, metrics, calibration batches."""
