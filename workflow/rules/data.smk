# Data phase: synthesize (synthetic only) -> fetch -> extract -> splits -> frames (-> flow for u/v).


rule synthesize:
    """Write the synthetic motion dataset as archives, served to `fetch` from file:// URLs."""
    output:
        layout.synthetic_source(SETTINGS) / sources.SYNTHETIC_SUMS,
    log:
        log_file("synthesize", "synthetic"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 2
    params:
        preset=preset_option,
        settings=result_settings("synthesize"),
        code=CODE["synthesize"],
    shell:
        "iicrepro synthesize --params params.yaml --preset {params.preset}"
        " --workers {threads} > {log} 2>&1"


rule fetch:
    """Download one archive of a dataset (resumable, checksummed); one job per archive."""
    input:
        fetch_inputs,
    output:
        download("{dataset}", "{archive}"),
    log:
        log_file("fetch", "{dataset}", "{archive}"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 1
    params:
        preset=preset_option,
        role=archive_role,
    shell:
        "iicrepro fetch --params params.yaml --preset {params.preset}"
        " {wildcards.dataset} --only {params.role} --no-progress > {log} 2>&1"


rule extract:
    """Safely extract a dataset's archives (zip, tar, rar, nested rar). The extracted videos are
    temporary: the frame store keeps what the pipeline reads, the archives stay in downloads/.
    """
    input:
        archives,
    output:
        temp(directory(raw("{dataset}"))),
    log:
        log_file("extract", "{dataset}"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 1
    params:
        preset=preset_option,
    shell:
        "iicrepro extract --params params.yaml --preset {params.preset}"
        " {wildcards.dataset} > {log} 2>&1"


rule splits:
    """Official split files -> split{1,2,3}.csv manifests."""
    input:
        ancient(raw("{dataset}")),
    output:
        manifests("{dataset}"),
    log:
        log_file("splits", "{dataset}"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 1
    params:
        preset=preset_option,
        settings=result_settings("splits"),
        code=CODE["splits"],
        videos=lambda w: sources.video_root(SETTINGS, w.dataset),
    shell:
        "iicrepro splits --params params.yaml --preset {params.preset}"
        " {wildcards.dataset} --videos {params.videos} > {log} 2>&1"


rule frames:
    """Decode every listed video once into the per-video frame store (resumes per video)."""
    input:
        ancient(raw("{dataset}")),
        manifests("{dataset}"),
    output:
        frame_index("{dataset}"),
    log:
        log_file("frames", "{dataset}"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 2
    params:
        preset=preset_option,
        settings=result_settings("frames"),
        code=CODE["frames"],
    shell:
        "iicrepro frames --params params.yaml --preset {params.preset}"
        " {wildcards.dataset} --workers {threads} > {log} 2>&1"


rule flow_chunk:
    """TV-L1 optical flow (u, v) of one chunk of the videos (the u and v views need it); the
    chunks are independent jobs (Snakefile `scattergather`, raised by the Slurm profile). With
    flow.engine torch the rule is named flow_chunk_gpu, so that profiles can give it a GPU.
    """
    name:
        "flow_chunk_gpu" if SETTINGS.flow.engine == "torch" else "flow_chunk"
    input:
        frame_index("{dataset}"),
    output:
        touch(flow_chunk_done("{dataset}")),
    log:
        log_file("flow", "{dataset}", "{scatteritem}"),
    conda:
        "../envs/iicrepro.yaml"
    threads: SETTINGS.flow.workers
    params:
        preset=preset_option,
        settings=result_settings("flow"),
        code=CODE["flow"],
        chunk=flow_chunk,
    shell:
        "iicrepro flow --params params.yaml --preset {params.preset}"
        " {wildcards.dataset} --workers {threads} --chunk {params.chunk} > {log} 2>&1"


rule flow:
    """The flow store's indexes, once every chunk is done."""
    input:
        gather.flow(flow_chunk_done("{{dataset}}")),
    output:
        flow_index("{dataset}"),
    log:
        log_file("flow", "{dataset}", "merge"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 1
    params:
        preset=preset_option,
        settings=result_settings("flow"),
        code=CODE["flow"],
    shell:
        "iicrepro flow --params params.yaml --preset {params.preset}"
        " {wildcards.dataset} --merge > {log} 2>&1"
