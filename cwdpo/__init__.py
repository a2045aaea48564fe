"""cwdpo: a reproducibility suite for CW-DPO ("Learning Dynamics of VLM Finetuning", arXiv 2510.11978).

The package is imported by the Snakemake rules only through its CLI (`cwdpo <command>`). Importing
`cwdpo` itself is cheap: heavy modules (torch, transformers) are imported inside the submodules
that need them.
"""

__version__ = "0.1.0"
