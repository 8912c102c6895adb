"""Tezzeret: compiles blueprints ahead of time (export -> guards -> AOTInductor package) into Urza.

Only this package imports torch's compiler; Kasmina loads what it produced without it.
"""
