"""Certification: the checks ``pytest --certify`` runs on every artifact kind of every blueprint.

- :mod:`.plan`: what is certified per kind (profiles, variants, candidates, parity cases, latency cases), pure
  functions.
- :mod:`.run`: :class:`~esper.certification.run.Certification`, the one skeleton (compile, parity, guards,
  latency, select, budgets, publish), and the per-blueprint :class:`~esper.certification.run.BlueprintCertification`.
- :mod:`.kinds`: what an artifact kind changes in that skeleton (inference: a forward pass; training: a step).
- :mod:`.cases`: the inputs guards must refuse; :mod:`.strategies`: hypothesis strategies over guards.
- :mod:`.session`: one pytest run (generation, outcomes, summary); :mod:`.extras`: the harness's dependencies.
- :mod:`.gate`: the release gate, this run's per-round latency ratios against a stored baseline's.
"""
