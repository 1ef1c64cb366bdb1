# The grid's rules. Model-running rules declare resources: gpu=GPU (config gpu_per_job), so
# `snakemake --resources gpu=N` runs N of them at once on an N-GPU workstation and the Slurm executor asks for
# --gpus; the Slurm profile adds partitions, memory and time per rule.

SCORES = [f"{W}/scores/{p}__{d}.json" for p in POISONS for d in DEFENCES]


rule toy_concepts:
    output:
        touch(f"{W}/concepts/.done"),
    params:
        cmd=lambda w: f"{PYTHON} -m cloaklab.ops.toy.concepts {q(W + '/concepts')} --concepts {q(','.join(CONCEPTS))}",
    shell:
        "{params.cmd}"


rule poison:
    input:
        DATA_DEP,
    output:
        touch(f"{W}/poisoned/{{poison}}/{{concept}}/.done"),
    wildcard_constraints:
        poison=_alternatives([p for p in POISONS if p != "none"]) or "(?!)",
    resources:
        gpu=GPU,
    params:
        cmd=poison_cmd,
    shell:
        "{params.cmd}"


rule purify:
    input:
        DATA_DEP,
        lambda w: poison_done(w.poison, w.concept),
    output:
        touch(f"{W}/purified/{{poison}}/{{defence}}/{{concept}}/.done"),
    wildcard_constraints:
        defence=_alternatives(PURIFY) or "(?!)",
    resources:
        gpu=GPU,
    params:
        cmd=purify_cmd,
    shell:
        "{params.cmd}"


rule mask:
    input:
        DATA_DEP,
        lambda w: poison_done(w.poison, w.concept),
    output:
        touch(f"{W}/masks/{{poison}}/{{concept}}/.done"),
    resources:
        gpu=GPU if C["masks"] == "sam" else 0,
    params:
        cmd=mask_cmd,
    shell:
        "{params.cmd}"


rule train_ti:
    input:
        DATA_DEP,
        lambda w: poison_done(w.poison, w.concept),
        lambda w: [f"{W}/purified/{w.poison}/{w.defence}/{w.concept}/.done"] if w.defence in PURIFY else [],
        lambda w: [f"{W}/masks/{w.poison}/{w.concept}/.done"] if needs_masks(w.defence) else [],
    output:
        f"{W}/ti/{{poison}}/{{defence}}/{{concept}}/learned_embeds.safetensors",
    resources:
        gpu=GPU,
    params:
        cmd=train_ti_cmd,
    shell:
        "{params.cmd}"


rule generate:
    input:
        f"{W}/ti/{{poison}}/{{defence}}/{{concept}}/learned_embeds.safetensors",
    output:
        touch(f"{W}/gen/{{poison}}/{{defence}}/{{concept}}/.done"),
    resources:
        gpu=GPU,
    params:
        cmd=generate_cmd,
    shell:
        "{params.cmd}"


rule score:
    input:
        DATA_DEP,
        lambda w: [f"{W}/gen/{w.poison}/{w.defence}/{c}/.done" for c in CONCEPTS],
    output:
        f"{W}/scores/{{poison}}__{{defence}}.json",
    resources:
        gpu=GPU,
    params:
        cmd=score_cmd,
    shell:
        "{params.cmd}"


rule table:
    input:
        SCORES,
    output:
        TABLE_FILES,
    params:
        cmd=table_cmd(SCORES),
    shell:
        "{params.cmd}"


rule report:
    input:
        SCORES,
    output:
        REPORT,
    params:
        cmd=report_cmd(SCORES),
    shell:
        "{params.cmd}"
