"""`BlockSparse`: the block-sparse attention pattern a session can run with (`attention=`).

Positions are cut into blocks of `block` tokens. A query in block qb attends, causally, to

    the first `global_blocks` blocks            (sinks: the start of the text)
    its own block and the `local_blocks` before it
    with `stride`, every stride-th block back from its own: qb - stride, qb - 2 stride, ...

except that the last `dense_last` tokens of every call (prefill, append, decode step) attend to
every earlier position. The default, 1, is the token whose logits choose what comes next: the last
token of a prompt and every generated token see the whole context, and only the bulk of a long
prefill is thinned (MInference likewise keeps its last queries dense). Generating a token after a
long prompt then costs a dense decode step. dense_last=0 applies the pattern everywhere.

The kernel (kernels/attention.py) visits only those blocks, so prefill and decoding cost
O(T (global + local + T / stride) block) instead of O(T^2). It is an approximation for models
trained with dense attention; `BlockSparse()` is the setting measured as the best trade-off on
SmolLM2 (docs/performance.md, "Block-sparse attention"; chosen with bench/sparse_screen.py: a wider local
window buys more quality per visited key than more sink blocks or strided ones).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockSparse:
    block: int = 64
    global_blocks: int = 1
    local_blocks: int = 9
    stride: int | None = None
    dense_last: int = 1

    def __post_init__(self):
        for name, least in (("block", 1), ("global_blocks", 0), ("local_blocks", 0), ("dense_last", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"BlockSparse {name} must be an integer >= {least}; got {v!r}")
        s = self.stride
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"BlockSparse stride must be None (no strided blocks) or an integer >= 1; got {s!r}")

    def pattern(self) -> tuple[int, int, int, int]:
        """(block, global_blocks, local_blocks, stride) for the kernel; stride 0 = no strided blocks."""
        return (self.block, self.global_blocks, self.local_blocks, self.stride or 0)


def check_attention(attention) -> "BlockSparse | None":
    """None (dense) or a BlockSparse; anything else is a clear error."""
    if attention is None or isinstance(attention, BlockSparse):
        return attention
    raise ValueError(f"attention must be None (dense) or a fastinfer.BlockSparse(...); got {attention!r}")
