"""Tests of certify/: the pytest plugin and the module generator."""
