"""Tests of esper/artifacts/."""
