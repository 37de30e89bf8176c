"""`python -m signround_export` is the `signround` command; torchrun launches it so:
`torchrun --nproc-per-node N -m signround_export tune MODEL --out OUT ...`."""

import sys

from .cli import main

sys.exit(main())
