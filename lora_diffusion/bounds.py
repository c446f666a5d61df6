"""Numeric bounds that the command line's argument types and the library's checks share.

Torch-free, so the CLI can use them and `lora-diffusion --help` stays quick. Each is far
above any useful value; the lr and the temperature also stop where float32 arithmetic
would stop being finite, the seed where generators' 32-bit seeds end.
"""

MAX_LR = 10.0               # beyond ~1e38 AdamW's float32 state overflows
MAX_TEMPERATURE = 100.0     # beyond, the sampler's scaled logits overflow
MAX_EPOCHS = 10_000
MAX_SEED = 2**31 - 1
CACHE_MB = 2048             # the default cap of train --cache-base (a default, not a bound: shared likewise)
