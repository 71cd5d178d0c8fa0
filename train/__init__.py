"""The trainer (train/main.py) and its parts."""

import logging

# bitsandbytes (the qlora extra), on CPUs with AVX512-BF16, tries to fetch a 4-bit matmul kernel from the Hugging Face
# Hub through the `kernels` package, which sftgo does not install (no downloads at run time), and warns on every import
# of peft that it is missing; its own CPU path runs instead. Nothing to act on, so below warnings only.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
