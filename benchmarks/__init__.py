"""Speed benchmarks against the PyTorch reference on the same weights (`launch/bench.py`).

Each benchmark measures ours and the reference in the same invocation, one after the other, each in its own
subprocess (absolute CPU times swing about 2x from run to run), and reports a small table and,
as the last line, one JSON object (`ours_s`, `torch_s`, `speedup`, `peak_fraction`, ...).
"""
