"""Whether a graph is being recorded (``torch.jit.trace``, ``torch.export`` / the dynamo ONNX exporter, the
legacy ONNX exporter), so eager-only input checks can step aside.

A check such as "every code lies in ``[0, K)``" reads tensor values into Python (``int(codes.max())``): in eager
mode it turns a device-side assert into a readable error, but a traced graph would bake the example's outcome
into the graph (``jit.trace``) or stop on the data-dependent branch (``torch.export``). The checks skip while
tracing; the exported graphs get inputs the runtime built itself (codes from the encoder graph, restored codes
drawn from the transformer's own distribution), so they need no such check.
"""

from __future__ import annotations

import torch


def is_tracing() -> bool:
    """True while ``torch.jit.trace``, ``torch.compile`` / ``torch.export`` or ``torch.onnx.export`` records."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.6
    return bool(
        torch.jit.is_tracing() or exporting or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
    )
