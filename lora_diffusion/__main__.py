"""`python -m lora_diffusion ...` is the `lora-diffusion` command (e.g. under `torchrun -m`)."""

import sys

from .cli import main

sys.exit(main())
