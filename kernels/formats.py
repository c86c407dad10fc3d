"""The weight storage formats the kernels read, by code (see `kernels/linear.py` for the layouts).

Kept apart from linear.py so the integer kernels it calls (qgemm, qmatvec) can name them too."""
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5, Q6 = 0, 1, 2, 3, 4, 5, 6, 7
# The same three block formats repacked into tiles of 16 interleaved rows for the decode matvec
# (kernels/qtile.py). A loaded model holds them; no file does.
Q8_0T, Q4_0T, Q4_1T = 8, 9, 10
TILED = {Q8_0: Q8_0T, Q4_0: Q4_0T, Q4_1: Q4_1T}
UNTILED = {v: k for k, v in TILED.items()}
KIND_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5: "Q5", Q6: "Q6",
              Q8_0T: "Q8_0", Q4_0T: "Q4_0", Q4_1T: "Q4_1"}  # tiling changes the layout, not the format
BLOCK_KINDS = (Q8_0, Q4_0, Q4_1, Q5, Q6, Q8_0T, Q4_0T, Q4_1T)  # integer values with per-group scales: 8-bit activations apply
QK = 32  # elements per quantization block
GROUP = {Q8_0: 32, Q4_0: 32, Q4_1: 32, Q5: 32, Q6: 16}  # elements per scale (s) and offset (m)
STRETCH = 64  # elements per unit of Q5 and Q6 rows: their high-bit planes come in 8 and 16 bytes per 64


def row_bytes(kind: int, cols: int) -> int:
    """Bytes of q per row: values (and for Q5, Q6 their high-bit planes after the nibbles)."""
    return {F32: 0, F16: 2 * cols, BF16: 2 * cols, Q8_0: cols, Q4_0: cols // 2, Q4_1: cols // 2,
            Q5: cols // 2 + cols // 8, Q6: cols // 2 + cols // 4}[kind]
