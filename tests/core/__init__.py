"""Tests of steer_utils.core: the method (tiny random models built in the test, and the bundled models)."""
