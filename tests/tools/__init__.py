"""Tests of steer_utils.tools: bench, report, shards."""
