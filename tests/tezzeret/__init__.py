"""Tests of esper/tezzeret/."""
