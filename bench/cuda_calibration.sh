#!/usr/bin/env bash
# The CUDA calibration (issue #13, docs/validation.md §1b) on a lent GPU machine, in one call of the device tool:
#
#   run(command="bash bench/cuda_calibration.sh", timeout_s=420)
#
# The machine's python3 has torch (CUDA), transformers and peft but not the simulator's pydantic, so it records the
# measured side only (--measure-only); the comparison is made afterwards on the development machine from the JSON:
#
#   python -m sim calibrate --device cuda --measurements validation/cuda/cuda-measured.json \
#       --json validation/cuda/cuda-calibration.json --markdown validation/cuda/cuda-calibration.md
#
# Writes under $OUT (or the folder given as $1 elsewhere): cuda-measured.json (rewritten after every configuration,
# so a run cut short keeps what it measured), calibrate.log, environment.txt (nvidia-smi, versions) and
# snapshots.tar.xz (one torch.cuda.memory._snapshot() pickle per configuration, for pytorch.org/memory_viz),
# split into 15 MiB parts snapshots.tar.xz.part-NN where larger (the tool returns files up to 16 MiB, 8 files).
# The calibration itself stops after 330 s (estimated 271 s on one H100: `python -m sim calibrate --device cuda
# --list`), inside the call's 420 s; a configuration it did not reach is run again alone with --config NAME.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-${1:?give an output folder}}"
mkdir -p "$out"
snapshots=/tmp/cuda-calibration-snapshots
rm -rf "$snapshots" && mkdir -p "$snapshots"
export PYTHONUNBUFFERED=1

{
    nvidia-smi
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name(), torch.cuda.mem_get_info())"
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|flash.attn) '
} >"$out/environment.txt" 2>&1

timeout 330 python3 -m sim calibrate --device cuda --measure-only --json "$out/cuda-measured.json" \
    --snapshot-dir "$snapshots" 2>&1 | tee "$out/calibrate.log"
status=${PIPESTATUS[0]}

tar -C "$(dirname "$snapshots")" -cf - "$(basename "$snapshots")" | xz -T0 -6 >/tmp/snapshots.tar.xz
if [ "$(stat -c %s /tmp/snapshots.tar.xz)" -le $((15 * 1024 * 1024)) ]; then
    cp /tmp/snapshots.tar.xz "$out/"
else
    split -b 15M -d /tmp/snapshots.tar.xz "$out/snapshots.tar.xz.part-"
fi
ls -l "$out"
exit "$status"
