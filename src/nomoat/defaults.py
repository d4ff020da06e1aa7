"""One source for each default that several commands, the server and the Python API share.

Torch-free, so that the command line can show them in --help without importing the model code.
"""

MAX_NEW_TOKENS = 256
TEMPERATURE = 0.8
TOP_K = 40
TOP_P = 0.95
REPETITION_PENALTY = 1.0
QUANT = "auto"  # keep a quantized file quantized (int4/int8 kernels), a float file float

# Sampling values beyond these overflow the logits to inf (temperature 1e-300, repetition penalty 1e-40) or the
# generator's 64-bit seed: the server and the command line refuse them by name.
MIN_TEMPERATURE = 1e-5  # the smallest temperature above 0 (which means greedy)
MAX_TEMPERATURE = 2.0
PENALTY_RANGE = (1e-2, 1e2)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
MAX_TOP_K = 1 << 24
