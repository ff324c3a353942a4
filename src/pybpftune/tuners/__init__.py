"""Built-in tuners; each module exposes its Tuner subclass as ``TUNER``."""
