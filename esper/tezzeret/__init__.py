"""Tezzeret: compiles blueprints ahead of time into Urza, one pipeline for every artifact kind.

- :mod:`~esper.tezzeret.compiler`: :class:`~esper.tezzeret.compiler.Tezzeret`, the pipeline's skeleton
  (content hash -> reuse -> stages -> fallback -> publish) and the one eager-route writer;
- :mod:`~esper.tezzeret.pipeline`: what the skeleton asks of an artifact kind, and the stage helpers;
- :mod:`~esper.tezzeret.inference`: the inference kind's stages (export -> guards -> one AOTInductor package);
- :mod:`~esper.tezzeret.training_compile`: the training kind's stages (trace joint -> plan -> export forward
  and backward -> two packages in one artifact), with :mod:`~esper.tezzeret.joint` (the traced graphs) and
  :mod:`~esper.tezzeret.joint_plan` (the artifact's layout, a pure function of them);
- :mod:`~esper.tezzeret.export`, :mod:`~esper.tezzeret.aoti`, :mod:`~esper.tezzeret.content`: torch.export and
  guards, AOTInductor with its persistent cache, and the content hash;
- :mod:`~esper.tezzeret.object_store`: the objects ``g++`` built for packages, kept for an identical build.

Only this package imports torch's compiler; Kasmina loads what it produced without it.
"""
