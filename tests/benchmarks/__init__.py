"""Tests of benchmarks/ (the studies' bookkeeping and reports, measuring nothing)."""
