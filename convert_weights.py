"""Convert an official SAM v1 checkpoint to samref-jax (orbax) format.

    python convert_weights.py --checkpoint sam_vit_b_01ec64.pth --output checkpoints/vit_b

Needs the `torch` extra (`pip install -e '.[torch]'`). See samref_jax/sam/convert.py.
"""

import sys

from samref_jax.sam.convert import main

if __name__ == "__main__":
    sys.exit(main())
