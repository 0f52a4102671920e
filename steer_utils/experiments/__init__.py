"""One backend per notebook and what they share: the benchmark data, the judges, evaluation, plots, run profiles
and parameter checks. Built on `steer_utils.core`."""
