#!/bin/bash
# The training experiments of the README's "Training: measured" section (issue 26), on the shipped tiny-shapes model:
#   length extension (Radial's recipe): 61-frame clips, twice the 31 frames the model was trained on;
#   sparse fine-tuning (VMoBA's recipe): 31-frame clips, moba with head-global threshold selection.
# Every run: 120 optimizer steps, LoRA rank 16, lr 1e-3, seed 0, one thread (two runs at a time on a 2-core machine).
# Usage: bash samples/training/run_experiment.sh WORKDIR      (about 1.5 h on this project's shared 2-core CPU)
# Then copy WORKDIR/arms*/arms.{json,png} here as arms61/arms31/arms61_ablation.* and run make_plots.py.
set -e
WORK=${1:?usage: run_experiment.sh WORKDIR}
mkdir -p "$WORK" && cd "$WORK"
export OMP_NUM_THREADS=1
S=120
train() { vidsparse finetune "$@" --steps $S --quiet; }
# Runs resume where they stopped: rerun the script after an interruption.
resume() { [ -e "$1/checkpoint.pt" ] && echo --resume; true; }
train dense61 --frames 61 $(resume dense61) &
train radial61 --method radial --density 0.25 --frames 61 $(resume radial61) &
wait
train dense31 $(resume dense31) &
train moba31 --method moba:threshold_pool=head $(resume moba31) &
wait
vidsparse eval arms --out arms61 --frames 61 --reference dense --arm base= --arm dense=dense61 \
  --arm radial=radial61@radial:density=0.25 --quiet
vidsparse eval arms --out arms31 --frames 31 --reference dense --arm base= --arm dense=dense31 \
  --arm moba=moba31@moba:threshold_pool=head --quiet
# Which part of the radial arm's motion is radial inference alone, which the radial-trained LoRA (red-circle prompts).
vidsparse eval arms --out arms61_ablation --frames 61 --prompts 4 --reference dense --arm dense=dense61 \
  --arm radial_untrained=@radial:density=0.25 --arm dense_lora_radial=dense61@radial:density=0.25 --quiet
# Step time in interleaved rounds, one process (the ratios the README reports).
vidsparse bench train --methods radial:density=0.25 --frames 61 --rounds 4 --threads 1 --json bench_train_61.json
vidsparse bench train --methods moba:threshold_pool=head --rounds 4 --threads 1 --json bench_train_31.json
