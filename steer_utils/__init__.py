"""steer_utils: attention-guided feature learning for steering LLMs (arXiv 2602.00333).

One module per pipeline stage; notebooks in `notebooks/` only call these and plot.
"""
__version__ = "0.1.0"
