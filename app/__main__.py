"""`python -m lora_diffusion.app ARGS` is `lora-diffusion app ARGS`: one parser checks them."""

import sys

from lora_diffusion.cli import main

sys.exit(main(["app", *sys.argv[1:]]))
