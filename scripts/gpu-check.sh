#!/usr/bin/env bash
# GPU check of iicrepro on one CUDA device, in under 8 minutes on an H100/H200:
#   0. the levers not yet measured, first: the torch TV-L1 engine (flow frames/s at 128x171 per
#      batch size, EPE against OpenCV's flow and the true motion; benchmarks/flow_bench.py, with
#      OpenCV's flow from benchmarks/data/flow-reference.npz where cv2 is missing); several
#      pretraining runs sharing the GPU (R3D, batch 16, bf16: 1, 2 and 4 processes, aggregate
#      samples/s; iicrepro.bench.share); torch.compile of R3D (bench --compile);
#   1. per backbone (c3d, r3d, r21d, r3d18): bf16 vs fp32 loss on the same batch, training
#      samples/s and MFU at batch 16, with channels-last 3D, and at the largest batch that fits
#      (doubling until out of memory);
#   2. input pipeline with 16 DataLoader workers (ours vs upstream-style JPEG files) and
#      retrieval feature extraction;
#   3. the DDP path: `iicrepro pretrain` under torchrun, one process, nccl, on the demo data
#      made by the real steps (synthesize, fetch, extract, splits, frames).
# Every part runs under its own time limit; a failed part is reported and the others go on;
# a part that no longer fits in BUDGET is skipped and listed as such.
#
# Usage (from the repository root):
#   scripts/gpu-check.sh               # the GPU check; results in $OUT (default ./results)
#   scripts/gpu-check.sh --cpu-smoke   # the same parts, tiny, on the CPU (a few minutes)
#   BUDGET=3000 TIME_SCALE=6 scripts/gpu-check.sh --cpu-smoke   # ... on a heavily shared CPU
#   PARTS="flow share compile" scripts/gpu-check.sh   # only part 0 (the levers not yet measured)
# Writes $OUT/bench-gpu.json (summary + every part's measurements) and $OUT/gpu-check/ (logs).
# Needs python3 with torch; PyAV and jsonschema come from .whl/*.whl when not importable
# (installed with pip --target into /tmp/site). MLflow is never used (tracking.enabled=false).
set -euo pipefail

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
OUT="${OUT:-./results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DIR="$OUT/gpu-check"
rm -rf "$DIR"
mkdir -p "$DIR"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-470}" # seconds for the whole script; each part gets at most what is left
TIME_SCALE="${TIME_SCALE:-1}" # multiplies each part's limit, e.g. for --cpu-smoke on a busy machine
# Parts to run, by name prefix (default all), e.g. PARTS="flow share compile" for part 0 only.
PARTS="${PARTS:-flow share compile train loader ddp}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=()

log() { echo "== gpu-check [$((SECONDS - START)) s] $*"; }

# part NAME LIMIT_S CMD...: run CMD under a time limit (capped by what is left of BUDGET),
# teeing its output to $DIR/NAME.log; a failure or timeout is recorded, the script goes on.
part() {
  local name=$1 limit=$(($2 * TIME_SCALE)) rc=0 p wanted=0
  shift 2
  for p in $PARTS; do [[ $name == "$p"* ]] && wanted=1; done
  if ((!wanted)); then
    log "$name: not in PARTS"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START) - 15))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    log "$name: skipped, no time left"
    FAILED+=("$name (no time left)")
    return 0
  fi
  log "$name (limit ${limit} s): $*"
  { timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"; } || rc=$?
  if ((rc != 0)); then
    ((rc == 124)) && log "$name: TIMED OUT after ${limit} s" || log "$name: FAILED (exit $rc)"
    FAILED+=("$name (exit $rc)")
  else
    log "$name: done"
  fi
}

# ---------------------------------------------------------------------------------- preflight
if ! "$PY" -c "import av, jsonschema" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  log "installing .whl/*.whl into /tmp/site (PyAV, jsonschema)"
  "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
log "environment"
"$PY" - <<'EOF'
import importlib, os, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| cpus", len(os.sched_getaffinity(0)))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "| bf16", torch.cuda.is_bf16_supported())
for name in ("iicrepro", "av", "cv2", "jsonschema", "PIL", "pandas", "yaml", "tqdm"):
    try:
        print(f"  {name:10s}", getattr(importlib.import_module(name), "__version__", "ok"))
    except Exception as exc:
        print(f"  {name:10s} MISSING ({type(exc).__name__}: {exc})")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true

# Our frame store's codec: jpeg (the paper-size setting) needs OpenCV to read; raw otherwise.
CODEC=jpeg
if ! "$PY" -c "import cv2" 2>/dev/null; then
  CODEC=raw
  log "OpenCV (cv2) is not importable: our loader reads the raw (uint8) store instead of jpeg"
fi

SETS=(--set tracking.enabled=false)
if ((SMOKE)); then
  DEVICE=cpu
  BACKBONES=(r3d)
  TRAIN=(--quick --steps 1)
  LOADER=(--quick --videos 2 --frames 20 --workers 1 --loader-batches 2 --loader-batch-size 2)
  DDP=(--max-steps 2)
  LIMITS=(60 120 240)
  FLOW=(--device cpu --threads 1 --pairs 2 --reference benchmarks/data/flow-reference.npz)
  SHARE=(--device cpu --backbone r3d --batch-size 2 --amp none --width 0.25 --clip 4 32 32
    --bank 16 --k 4 --warmup 1 --threads 1 --seconds 2 --processes 1 2)
  COMPILE=()
  FLOW_LIMIT=120 SHARE_LIMIT=180
else
  DEVICE=cuda
  BACKBONES=(c3d r3d r21d r3d18)
  TRAIN=(--amp bf16 --batch-size 16 --channels-last --max-batch --max-batch-seconds 15)
  LOADER=(--workers 16 --loader-batches 100)
  DDP=(--epochs 2 --set pretrain.amp=bf16 --set pretrain.workers=4)
  LIMITS=(65 150 120)
  FLOW=(--device cuda --threads 1 --batches 64 256 1024 --seconds 4)
  SHARE=(--device cuda --backbone r3d --batch-size 16 --amp bf16 --channels-last --seconds 10
    --processes 1 2 4)
  COMPILE=(--amp bf16 --batch-size 16 --channels-last --compile --steps 20)
  FLOW_LIMIT=90 SHARE_LIMIT=150
fi

# ---------------------------------------------- 0. flow engine, runs sharing the GPU, compile
part flow "$FLOW_LIMIT" "$PY" benchmarks/flow_bench.py --engines "${FLOW[@]}" --json "$DIR/flow.json"
part share "$SHARE_LIMIT" "$PY" -m iicrepro.bench.share "${SHARE[@]}" --out "$DIR/share.json"
if ((${#COMPILE[@]})); then # torch.compile needs minutes on the CPU: GPU only
  part compile-r3d 120 "$PY" -m iicrepro.cli bench "${SETS[@]}" --device "$DEVICE" \
    --parts train --backbones r3d "${COMPILE[@]}" --out "$DIR/compile-r3d.json"
fi

# ------------------------------------------------------- 1. amp agreement, train samples/s, MFU
for b in "${BACKBONES[@]}"; do
  part "train-$b" "${LIMITS[0]}" "$PY" -m iicrepro.cli bench "${SETS[@]}" --device "$DEVICE" \
    --parts amp train --backbones "$b" "${TRAIN[@]}" --out "$DIR/train-$b.json"
done

# ------------------------------------------------------------------- 2. loader and retrieval
part loader "${LIMITS[1]}" "$PY" -m iicrepro.cli bench "${SETS[@]}" --device "$DEVICE" \
  --parts loader retrieval --backbones "${BACKBONES[@]}" --codec "$CODEC" "${LOADER[@]}" \
  --out "$DIR/loader.json"

# ------------------------------------------------------ 3. DDP: torchrun, one process, nccl/gloo
ddp_smoke() {
  set -euo pipefail
  local w
  w="$(mktemp -d)" # data and run folder outside $OUT; only the metrics are kept
  trap "rm -rf '$w'" EXIT
  local s=(--preset demo --set "paths.data=$w/data" --set "paths.results=$w/results" "${SETS[@]}")
  "$PY" -m iicrepro.cli synthesize "${s[@]}"
  for step in fetch extract splits frames; do
    "$PY" -m iicrepro.cli "$step" synthetic "${s[@]}"
  done
  "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m iicrepro.cli pretrain \
    "${s[@]}" "${DDP[@]}" --device "$DEVICE" --out "$w/run"
  cp "$w/run/metrics.json" "$DIR/ddp.json"
  cp "$w/run/metrics.csv" "$DIR/ddp-metrics.csv"
}
export -f ddp_smoke
export DIR PY DEVICE
export SETS_STR="${SETS[*]}" DDP_STR="${DDP[*]}"
part ddp "${LIMITS[2]}" bash -c 'SETS=($SETS_STR); DDP=($DDP_STR); ddp_smoke'

# -------------------------------------------------------------------------------- summary
log "summary"
FAILED_STR="$(printf '%s\n' "${FAILED[@]+"${FAILED[@]}"}")"
export FAILED_STR OUT SMOKE CODEC
export ELAPSED=$((SECONDS - START))
"$PY" - <<'EOF'
import json, os
from pathlib import Path

d = Path(os.environ["DIR"])
parts = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
summary = {"device": None, "codec": os.environ["CODEC"], "train": {}}
for name, r in parts.items():
    summary["device"] = summary["device"] or r.get("device_name")
    if name.startswith("train-"):
        b = name[len("train-"):]
        t = r.get("train", {}).get(b, {})
        big = (t.get("max_batch") or {}).get("largest") or {}
        cl = t.get("channels_last") or {}
        summary["train"][b] = {
            "samples_per_s_b16": t.get("train_samples_per_s"), "mfu_b16": t.get("mfu"),
            "peak_cuda_mib_b16": t.get("peak_cuda_mib"),
            "channels_last_speedup": cl.get("speedup"),
            "max_batch": big.get("batch_size"), "samples_per_s_max": big.get("train_samples_per_s"),
            "mfu_max": big.get("mfu"), "peak_cuda_mib_max": big.get("peak_cuda_mib"),
            "max_batch_stopped_by": (t.get("max_batch") or {}).get("stopped_by"),
            "amp": r.get("amp_agreement", {}).get(b), "error": t.get("error"),
        }
def train_of(part, b):
    return (parts.get(part) or {}).get("train", {}).get(b, {})


plain, comp = train_of("train-r3d", "r3d"), train_of("compile-r3d", "r3d")
if comp:
    speed = comp.get("train_samples_per_s")
    cl = (comp.get("channels_last") or {}).get("train_samples_per_s")
    summary["compile_r3d"] = {
        "samples_per_s_b16": speed, "samples_per_s_b16_channels_last": cl,
        "speedup": speed / plain["train_samples_per_s"] if speed and plain.get("train_samples_per_s") else None,
        "error": comp.get("error"),
    }
flow = parts.get("flow")
summary["flow"] = flow and {k: flow.get(k) for k in (
    "device_name", "torch_gpu_frames_per_s", "torch_gpu", "epe_torch_gpu_vs_opencv",
    "epe_torch_gpu_vs_true", "epe_torch_vs_opencv", "epe_opencv_vs_true", "torch_cpu",
    "gpu_hours_ucf101", "gpu_hours_hmdb51")}
share = parts.get("share")
summary["share"] = share and {"best": share.get("best"), "runs": share.get("runs")}
loader = parts.get("loader", {})
for k in ("loader_samples_per_s", "loader_flow_samples_per_s", "baseline_loader_samples_per_s",
          "loader_speedup_vs_jpeg", "retrieval_videos_per_s"):
    summary[k] = loader.get(k)
ddp = parts.get("ddp")
summary["ddp"] = ddp and {k: ddp.get(k) for k in ("processes", "device", "epochs", "steps",
                                                 "final_loss", "chance_loss", "samples_per_s")}
failed = [f for f in os.environ["FAILED_STR"].splitlines() if f]
result = {"summary": summary, "failed": failed, "cpu_smoke": os.environ["SMOKE"] == "1",
          "seconds": int(os.environ["ELAPSED"]), "parts": parts}
out = Path(os.environ["OUT"]) / "bench-gpu.json"
out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
print(json.dumps(summary, indent=2, default=str))
print("failed parts:", failed or "none")
print("wrote", out)
EOF
log "finished in $((SECONDS - START)) s"
((${#FAILED[@]} == 0))
