"""Run in a fresh process by the performance suite: time one blueprint's first use and print JSON.

``kasmina``: Kasmina load + guard check + first call (after ``import esper.kasmina``, which P5 measures).
``compile``: ``torch.compile(module, dynamic=True)`` + first call, with whatever Inductor cache
TORCHINDUCTOR_CACHE_DIR points at (an empty one: cold; a used one: warm).
"""

import json
import sys
import time
from pathlib import Path

import torch

mode, urza, folder_arg, name, sizes_json = sys.argv[1:6]
folder = Path(folder_arg)
sizes = json.loads(sizes_json)
from esper.catalog import load_catalog  # noqa: E402
from esper.numerics.inputs import example_inputs  # noqa: E402

bp = load_catalog([folder]).get(name)
args = example_inputs(bp, sizes)
if mode == "kasmina":
    from esper.kasmina import Kasmina

    kasmina = Kasmina(urza, catalog=load_catalog([folder]))
    with torch.no_grad():
        t0 = time.perf_counter()
        kernel = kasmina.load(name)
        kernel(*args)
        seconds = time.perf_counter() - t0
    path = kernel.last_path
else:
    module = bp.build().eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled = torch.compile(module, dynamic=True)
        compiled(*args)
        seconds = time.perf_counter() - t0
    path = "torch.compile"
compiler = sorted(m for m in sys.modules if m.split(".")[:2] in (["torch", "_dynamo"], ["torch", "_inductor"]))
print(json.dumps({"ms": seconds * 1e3, "path": path, "compiler_imported": bool(compiler)}))
