"""Tests of esper/kasmina/."""
