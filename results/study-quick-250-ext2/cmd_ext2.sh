#!/bin/bash
cd /work/wt/experiments
source /work/venv/bin/activate
export PYTHONPATH=$PWD/src
exec nice -n 10 htmuon compare --preset quick --optimizers muon,htmuon \
  --lr-grid muon=0.005,0.01,0.02 htmuon=0.04,0.08,0.16 \
  --adamw-lr-grid muon=0.003,0.01 htmuon=0.003,0.01 \
  --tune-seeds 10 --seeds 0,1,2 --extend-edges 2 --progress log \
  --out-dir runs/study-quick-250
