# Pretraining phase: one IIC model per backbone x view x intra-negative x seed.


rule pretrain:
    """Self-supervised IIC pretraining. The step resumes from ckpt/last.pt by itself; that file
    is deliberately not an output, so Snakemake keeps it when it reruns an interrupted job.
    """
    input:
        pretrain_inputs,
    output:
        checkpoint=pretrain_file("checkpoint.pt"),
        init=pretrain_file("init.pt"),
        record=pretrain_file("metrics.json"),
    log:
        log_file("pretrain", RUN),
    wildcard_constraints:
        neg=INTRA_NEGATIVES,
    conda:
        "../envs/iicrepro.yaml"
    threads: 4
    params:
        preset=preset_option,
        settings=result_settings("pretrain"),
        code=CODE["pretrain"],
    shell:
        job("pretrain")
        + "iicrepro pretrain --params params.yaml --preset {params.preset}"
        " --backbone {wildcards.backbone} --view {wildcards.view}"
        " --intra-negative {wildcards.neg} --seed {wildcards.seed} > {log} 2>&1"
