# cwdpo: regenerates the tables and figures of "Learning Dynamics of VLM Finetuning" (CW-DPO).
#   snakemake --cores all                       # the embedded tiny default (CPU, minutes)
#   snakemake --cores all --use-singularity     # GPU rules in the container image
#   snakemake --profile profiles/slurm          # on a Slurm cluster
# Thin on purpose: every rule calls the `cwdpo` CLI; paths come from cwdpo.paths, specs from cwdpo.plan
# (no torch here).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# The software stack of every rule when run with --use-singularity (see containers/README.md).
container: config["container"]


include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/negatives.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        P.final_outputs(),
        # the runs whose job failed or was killed: rerun, not left out ("Nothing to be done")
        [f for _, Q in PLANS for f in Q.unfinished_runs()],
