"""Token-local fusion: consecutive steps whose row t depends only on row t of what they read
become one step (a kernel group). A group's threads share the tokens, and each thread runs every
member for its tokens in turn, so there is no barrier inside a group and a token's rows stay in
cache from one member to the next (residual ADD + RMS_NORM + weight + the quantization of the
next product's activations; Q/K norm + RoPE + the KV-cache writes; router softmax + top-k +
weight normalization; the weighted sum of the experts + residual).

Which ops qualify is the op table's word (OpDef.rowwise); whether a use keeps rows aligned is a
property of the views in between (the token axis must stay first). The rules are written in the
pattern language, so a user's op or view joins groups by the same rule."""
from __future__ import annotations

from moegraph.ir import F32, OPS, Kind, Node
from moegraph.quants import vec_dot_type
from moegraph.passes.pattern import Pat

TOKENS = "T"


def _rows(n: Node) -> Node:
    """The value whose rows a node's kernel walks: its output; SET_ROWS walks its source rows."""
    return n.inputs[1] if n.op == "SET_ROWS" else n


def _token_first(n: Node) -> bool:
    """The rows its kernel walks have the tokens first, and it does not work along that axis.
    (What it reads from inside its group is checked by `joins`.)"""
    axis = n.attrs.get("axis")
    rows = _rows(n)
    return rows.shape[:1] == (TOKENS,) and (not isinstance(axis, int) or axis % rows.rank != 0)


# A step may join a group when its op computes row t from rows t (the op table's `rowwise`) with
# the tokens as the first axis of what it writes and reads.
ROWWISE = Pat(where=lambda n: OPS[n.op].rowwise and _token_first(n), any_inputs=True)


def token_axis_kept(view: Node) -> bool:
    """Whether the view maps its first axis onto its input's first axis (rows stay aligned)."""
    if view.op == "PERMUTE":
        return tuple(view.attrs["axes"])[0] == 0
    if view.op == "SLICE":
        return view.attrs["axis"] % view.rank != 0
    if view.op == "RESHAPE":
        return view.shape[:1] == view.inputs[0].shape[:1] == (TOKENS,)
    return False


def storage_of(x: Node) -> tuple[Node, bool]:
    """The node that computed x's bytes (through views) and whether rows stay aligned on the way."""
    aligned = True
    while OPS[x.op].kind == Kind.VIEW:
        aligned = aligned and token_axis_kept(x)
        x = x.inputs[0]
    return x, aligned


def joins(n: Node, members: set[int]) -> bool:
    """n may run in the group made of `members` (node ids of the steps already in it)."""
    if ROWWISE.match(n) is None:
        return False
    for x in n.inputs:
        if x is None:
            continue
        src, aligned = storage_of(x)
        if src.id in members and not aligned:
            return False    # row t of x would be computed by another thread, or later
    return True


def activations(n: Node) -> Node:
    """The activation input of a product (MUL_MAT b; MUL_MAT_ID / MOE_SWIGLU b)."""
    return n.inputs[1] if n.op == "MUL_MAT" else n.inputs[-2]


def has_prelude(n: Node) -> bool:
    """A product whose activations are first converted to its weight's vec_dot type (MUL_MAT's
    numerics in the op table): a row-wise prelude, which may run in the group before it."""
    return (is_product(n) and n.inputs[0].op == "WEIGHT"
            and vec_dot_type(n.inputs[0].dtype) != F32)


def prelude_joins(n: Node, members: set[int]) -> bool:
    b = activations(n)
    src, aligned = storage_of(b)
    return b.shape[:1] == (TOKENS,) and (src.id not in members or aligned)


def is_product(n: Node) -> bool:
    return n.op in ("MUL_MAT", "MUL_MAT_ID", "MOE_SWIGLU")


def act_key(n: Node) -> tuple:
    """What a product's converted activations are: the activation node and the vec_dot type;
    two products with the same key can share them."""
    return activations(n).id, vec_dot_type(n.inputs[0].dtype)
