"""Tests of esper/urza/."""
