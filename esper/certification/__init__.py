"""Certification: the checks run on every artifact kind of every blueprint, by ``pytest --certify`` (the plugin
in ``certify/``) or ``esper certify``; nothing here imports pytest or ``certify``.

- :mod:`.plan`: what is certified per kind (profiles, variants, candidates, parity cases, latency cases), pure
  functions.
- :mod:`.run`: :class:`~esper.certification.run.Certification`, the one skeleton (compile, parity, guards,
  latency, select, budgets, publish), and the per-blueprint :class:`~esper.certification.run.BlueprintCertification`.
- :mod:`.results`: what each check returns and records, a typed
  :class:`~esper.certification.results.CheckResult` (outcome, check, Esper's reason, figures).
- :mod:`.kinds`: what an artifact kind changes in that skeleton (inference: a forward pass; training: a step).
- :mod:`.cases`: the inputs guards must refuse; :mod:`.strategies`: hypothesis strategies over guards.
- :mod:`.session`: one certification run (selection, compile workers, summary); :mod:`.shard`: one shard of a
  catalog; :mod:`.extras`: the harness's dependencies.
- :mod:`.gate`: the release gate, this run's per-round latency ratios against a stored baseline's.
"""
