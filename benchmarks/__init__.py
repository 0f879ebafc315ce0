"""lit-qft benchmark suite: accuracy, throughput, memory and size of every recipe (``python benchmarks/run.py``)."""
