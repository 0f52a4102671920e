"""Tests of steer_utils.experiments: the notebooks' backends, the judges and the benchmark data."""
