"""pybpftune-sample: an outside tuner with its own BPF object (see sample_tuner.py)."""
