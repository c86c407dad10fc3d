"""The weight storage formats the kernels read, by code (see `kernels/linear.py` for the layouts).

Kept apart from linear.py so the integer kernels it calls (qgemm, qmatvec) can name them too."""
F32, F16, BF16, Q8_0, Q4_0, Q4_1 = 0, 1, 2, 3, 4, 5
KIND_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1"}
QK = 32  # elements per quantization block
