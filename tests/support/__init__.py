"""Helpers shared by the tests (on pytest's pythonpath)."""
