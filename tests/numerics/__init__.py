"""Tests of esper/numerics/."""
