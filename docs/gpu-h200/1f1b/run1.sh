#!/bin/bash
# The accuracy protocol on one GPU, many simulated runs at once (benchmarks/sph_accuracy.py --simulate).
set -u
bash .device/device-setup.sh >/dev/null && . /tmp/hpl-env
mkdir -p data && cp .device/data/*.h5 data/
nvidia-smi --query-gpu=name,memory.used --format=csv | tee $OUT/gpu.txt
C="--subset 15000 --epochs mnist=5,fashion=5 --seeds 0,1,2 --no-early --set parallel.partition=macs --set run.device=cuda"
SIM=--simulate
# smoke: one simulated run of 2 epochs on 1000 images; without a working simulator, fall back to MPI ranks
if ! timeout 90 $PY benchmarks/sph_accuracy.py --datasets fashion --ks 2 --seeds 0 --subset 1000 --epochs fashion=2 \
     --no-early --simulate --jobs 1 --only "SPH penalty" --set run.device=cuda --out /tmp/smoke > $OUT/smoke.txt 2>&1 \
   || ! grep -q "| SPH penalty | 2 | 1 | [0-9]" $OUT/smoke.txt; then
  tail -30 /tmp/smoke/*.log >> $OUT/smoke.txt; SIM=""; echo "simulator failed: MPI ranks" >> $OUT/smoke.txt
fi
F1="--set parallel.schedule=1f1b --set parallel.beta=3"
timeout 400 $PY benchmarks/sph_accuracy.py --datasets fashion,mnist --ks 2,4 $C $SIM --jobs 9 $F1 \
  --set parallel.micro_batches=1 --only "serial BP,serial-only control,SPH penalty,pure parallel penalty" \
  --out /tmp/r/a > $OUT/a.txt 2>&1 &
timeout 400 $PY benchmarks/sph_accuracy.py --datasets fashion,mnist --ks 8 $C $SIM --jobs 4 $F1 \
  --set parallel.micro_batches=2 --only "SPH penalty,pure parallel penalty" --out /tmp/r/b > $OUT/b.txt 2>&1 &
timeout 400 $PY benchmarks/sph_accuracy.py --datasets fashion --ks 4 $C $SIM --jobs 2 \
  --set parallel.micro_batches=1 --only "SPH penalty" --out /tmp/r/c > $OUT/c.txt 2>&1 &
wait
cd /tmp/r && tar czf $OUT/runs.tgz --exclude=report . ; ls -la $OUT
