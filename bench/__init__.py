"""Benchmarks: plain scripts (python bench/NAME.py) and the peer benchmark package (python -m bench.peers)."""
