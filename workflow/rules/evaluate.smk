# Evaluation phase: nearest-neighbour retrieval and fine-tuned recognition of every model,
# the random-init baseline included (its checkpoint is the epoch-0 init.pt of the same seed).


rule retrieve:
    """Retrieval top-k of a pretrained model, or of the random init with BN as initialised."""
    input:
        retrieval_inputs,
        checkpoint=model_checkpoint,
        record=model_record,
    output:
        retrieval_metrics("{dataset}", RUN),
    log:
        log_file("retrieve", "{dataset}", RUN),
    conda:
        "../envs/iicrepro.yaml"
    threads: 4
    params:
        preset=preset_option,
        settings=result_settings("retrieve"),
        code=CODE["retrieve"],
        out=retrieval_dir("{dataset}", RUN),
    shell:
        job("retrieve")
        + "iicrepro retrieve --params params.yaml --preset {params.preset}"
        " --checkpoint {input.checkpoint} --dataset {wildcards.dataset}"
        " --view {wildcards.view} --out {params.out} > {log} 2>&1"


rule retrieve_bnrecal:
    """The stronger random-init baseline: BatchNorm statistics recalibrated on the pretraining
    dataset's training clips."""
    input:
        recalibration_inputs,
        checkpoint=model_checkpoint,
        record=model_record,
    output:
        retrieval_metrics("{dataset}", BNRECAL_RUN),
    log:
        log_file("retrieve", "{dataset}", BNRECAL_RUN),
    wildcard_constraints:
        neg="random",
    conda:
        "../envs/iicrepro.yaml"
    threads: 4
    params:
        preset=preset_option,
        settings=result_settings("retrieve_bnrecal"),
        code=CODE["retrieve_bnrecal"],
        out=retrieval_dir("{dataset}", BNRECAL_RUN),
    shell:
        job("retrieve_bnrecal")
        + "iicrepro retrieve --params params.yaml --preset {params.preset}"
        " --checkpoint {input.checkpoint} --dataset {wildcards.dataset}"
        " --view {wildcards.view} --bn recalibrate --out {params.out} > {log} 2>&1"


rule finetune:
    """Fine-tune for action recognition on one split and test (video-level top-1); resumes
    from its own ckpt/last.pt."""
    input:
        finetune_inputs,
        checkpoint=model_checkpoint,
        record=model_record,
    output:
        finetune_metrics("{dataset}", "{split}", RUN),
    log:
        log_file("finetune", "{dataset}", "split{split}", RUN),
    conda:
        "../envs/iicrepro.yaml"
    threads: 4
    params:
        preset=preset_option,
        settings=result_settings("finetune"),
        code=CODE["finetune"],
        init=init_name,
        out=finetune_dir("{dataset}", "{split}", RUN),
    shell:
        job("finetune")
        + "iicrepro finetune --params params.yaml --preset {params.preset}"
        " --backbone {wildcards.backbone} --view {wildcards.view} --init {params.init}"
        " --checkpoint {input.checkpoint} --dataset {wildcards.dataset}"
        " --split {wildcards.split} --seed {wildcards.seed} --out {params.out} > {log} 2>&1"
