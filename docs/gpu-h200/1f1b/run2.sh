#!/bin/bash
# Ablation on one GPU: the 1f1b schedule's penalty weight, M at K = 8, pure-parallel seeds, tick M = 2.
set -u
bash .device/device-setup.sh >/dev/null && . /tmp/hpl-env
mkdir -p data && cp .device/data/*.h5 data/
C="--datasets fashion --subset 15000 --epochs fashion=5 --no-early --simulate --set parallel.partition=macs --set run.device=cuda"
F="--set parallel.schedule=1f1b"
go() { local out=$1; shift; timeout 400 $PY benchmarks/sph_accuracy.py $C --out /tmp/r/$out "$@" > $OUT/$out.txt 2>&1 & }
go f1b-b1-k4 --ks 4 --seeds 0,1,2 --jobs 3 $F --set parallel.beta=1 --set parallel.micro_batches=1 --only "SPH penalty"
go f1b-b1-k8m2 --ks 8 --seeds 0,1,2 --jobs 3 $F --set parallel.beta=1 --set parallel.micro_batches=2 --only "SPH penalty"
go f1b-b10-k4 --ks 4 --seeds 0,1,2 --jobs 3 $F --set parallel.beta=10 --set parallel.micro_batches=1 --only "SPH penalty"
go f1b-b10-k8m2 --ks 8 --seeds 0,1,2 --jobs 3 $F --set parallel.beta=10 --set parallel.micro_batches=2 --only "SPH penalty"
go f1b-b3-k8m1 --ks 8 --seeds 0,1,2 --jobs 3 $F --set parallel.beta=3 --set parallel.micro_batches=1 --only "SPH penalty"
go f1b-b3-k8m4 --ks 8 --seeds 0,1,2 --jobs 3 $F --set parallel.beta=3 --set parallel.micro_batches=4 --only "SPH penalty"
go tick-b3-k4m2 --ks 4 --seeds 0,1,2 --jobs 3 --set parallel.beta=3 --set parallel.micro_batches=2 --only "SPH penalty"
for s in 1 2; do
  go pure-s$s-k24 --ks 2,4 --seeds $s --jobs 2 $F --set parallel.beta=3 --set parallel.micro_batches=1 --only "pure parallel penalty"
  go pure-s$s-k8 --ks 8 --seeds $s --jobs 1 $F --set parallel.beta=3 --set parallel.micro_batches=2 --only "pure parallel penalty"
done
wait
cd /tmp/r && tar czf $OUT/runs2.tgz --exclude=report . ; ls $OUT
