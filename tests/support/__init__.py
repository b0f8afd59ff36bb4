"""Helpers shared by tests and benchmarks (tiny synthetic models and vocabularies); not the library."""
