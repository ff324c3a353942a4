"""The VM test runner (vmtest.py) and its own tests."""
