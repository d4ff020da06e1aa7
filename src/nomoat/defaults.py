"""One source for each default that several commands, the server and the Python API share.

Torch-free, so that the command line can show them in --help without importing the model code.
"""

MAX_NEW_TOKENS = 256
TEMPERATURE = 0.8
TOP_K = 40
TOP_P = 0.95
REPETITION_PENALTY = 1.0
QUANT = "auto"  # keep a quantized file quantized (int4/int8 kernels), a float file float
