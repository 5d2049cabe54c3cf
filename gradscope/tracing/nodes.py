"""The traced node record: the one representation of a graph node that every stage reads.

Torch-free, so that the rule families and the report can name nodes without
loading torch; the tracers (``gradscope.tracing.graph``) create the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradscope.tracing import ops

if TYPE_CHECKING:  # networkx is not needed to read a record, and costs `gradscope rules`
    import networkx as nx


@dataclass(frozen=True)
class NodeRecord:
    """One traced node: the one representation every stage reads (never a string-keyed dict).

    Frozen so that a stage cannot change what another stage sees; a what-if copy of
    the graph (``gradscope.rules.fixes.Variant``) replaces a node's record with
    :func:`dataclasses.replace` instead. ``family`` is the op family from
    :data:`gradscope.tracing.ops.FAMILIES` that the estimate, the rules and the
    fixes dispatch on; ``key`` the estimator's finer key within it.
    """

    name: str
    #: Creation order, which is topological; a what-if insert takes a fractional index.
    index: float
    kind: str
    role: str
    op: str
    key: str
    target: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    module: str | None = None
    module_class: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    is_tensor: bool = False
    is_float: bool = False
    multi_output: bool = False
    file: str | None = None
    line: int | None = None
    params: tuple[str, ...] = ()
    num_params: int = 0
    depth: int = 0

    @property
    def family(self) -> str:
        """The op family of :data:`gradscope.tracing.ops.FAMILIES` (``other`` when unlisted)."""
        return ops.family_of(self.key, self.role)

    @property
    def activation(self) -> str | None:
        """The canonical activation name for ``activation:<name>`` keys, else None."""
        return self.key.split(":", 1)[1] if self.key.startswith("activation:") else None

    @property
    def is_compute(self) -> bool:
        return self.role == "compute"

    @property
    def trainable(self) -> bool:
        """Owns floating-point weights: where a starved gradient actually hurts."""
        return self.role == "compute" and self.num_params > 0 and self.is_float

    @property
    def is_dense(self) -> bool:
        """A trainable linear or convolution layer: what depth counts and skips go around."""
        return self.trainable and self.key in ops.DENSE_KEYS

    def label(self) -> str:
        """``module (op)`` as findings name a node."""
        return f"{self.module or self.name} ({self.op})"


def node_record(graph: nx.DiGraph, name: str) -> NodeRecord:
    """The record of node ``name`` in a traced graph (or a what-if copy of one)."""
    rec: NodeRecord = graph.nodes[name]["rec"]
    return rec


def set_record(graph: nx.DiGraph, record: NodeRecord) -> None:
    """Replace a node's record (what-if copies and the tracers' late facts, such as depth)."""
    graph.nodes[record.name]["rec"] = record
