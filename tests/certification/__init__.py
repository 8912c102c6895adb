"""Tests of esper/certification/."""
