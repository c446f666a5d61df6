#!/usr/bin/env bash
# The commands behind every results file in this folder (and so behind every number and
# figure in the README). Run from the repository root after `make setup`, with the real
# data in ../shared/data (or pass --data-dir). CPU times are for 2 cores; --bf16 is bf16
# autocast (this CPU supports it; drop it elsewhere). Each step resumes if cut off.
# --png (the README's images) needs the figures extra: .venv/bin/pip install -e '.[figures]'.
set -euo pipefail
LD=.venv/bin/lora-diffusion

# Learning rates: a sweep of lr x {0.3, 1, 3} per method on 2% of SST-2 train (never dev).
# (The first file predates compare recording the dtype: whether it ran in bf16 is not recorded.)
$LD compare --task sst2 --methods full,lora_diffusion,lora,dora,adapter,bitfit --lr-sweep 0.3,1,3 \
    --validation-fraction 0.02 --steps 600 --seed 0 --sweep-only --out runs/sweep-sst2 \
    --results results/lr_sweep_sst2.json
$LD compare --task sst2 --methods prefix --lr-sweep 0.3,1,3 --validation-fraction 0.02 --steps 600 --seed 0 \
    --sweep-only --out runs/sweep-prefix --results results/lr_sweep_sst2_prefix.json

# Issue 2: full fine-tuning of the shipped base on SST-2, 3 seeds, scored on the dev set.
$LD train --task sst2 --method full --steps 3000 --batch-size 16 --lr 1.5e-4 --bf16 --seed 0 1 2 \
    --eval-every 500 --checkpoint-every 500 --out runs/sst2-full --results results/sst2_full.json

# Issue 3: the seven methods, 3 seeds, equal budget (600 steps x 16), the swept learning rates
# (54 min on 2 cores with --jobs 2).
$LD compare --task sst2 --preset methods --steps 600 --bf16 --seed 0 1 2 --jobs 2 \
    --lr-from results/lr_sweep_sst2.json results/lr_sweep_sst2_prefix.json \
    --out runs/compare-sst2 --results results/compare_sst2.json
# Prefix tuning given five times the steps (its P-tuning v2 form: free prefixes, lr 1e-2), 3 seeds.
$LD compare --task sst2 --methods prefix --option reparam=false --option init=random --steps 3000 --bf16 \
    --seed 0 1 2 --jobs 2 --eval-every 500 --out runs/prefix-long-sst2 --results results/prefix_sst2_3000.json
$LD eval --adapter runs/prefix-long-sst2/prefix/seed-0 --out results/eval_check/prefix_3000.json
# Every saved adapter, reloaded by `eval --adapter`, scores what it scored at the end of training.
for m in full lora_diffusion lora dora adapter bitfit prefix; do
    $LD eval --adapter runs/compare-sst2/$m/seed-0 --out results/eval_check/$m.json
done
# Step time and peak memory of every method on one batch, each in a fresh process.
$LD profile --methods lora_diffusion,lora,dora,adapter,bitfit,prefix,full --batch-size 16 --prompt-length 40 \
    --response-length 2 --steps 20 --out results/profile_sst2_batch.json

# A sample of the base's text from an all-[MASK] start.
$LD sample --length 48 --steps 48 --temperature 0.8 --block-length 8 --n 5 --seed 0 > results/sample_base.txt

# Issue 4: adapters for the analyses (seed 0, the same budget as the methods table; the
# AG News topic LoRA adapter predates the sampler fixes, which do not touch weight LoRA's training).
for task in agnews agnews_title; do
    for method in lora_diffusion lora; do
        $LD train --task $task --method $method --steps 600 --bf16 --max-eval-examples 500 --out runs/$task-$method \
            --results results/$task-$method.json  # (the title results on file: with --threads 1)
    done
done
A=runs/compare-sst2

# Effective rank per denoising step on SST-2 (2-token answers: 2 sampler steps).
$LD analyze effective-rank --adapters $A/lora_diffusion/seed-0 $A/lora/seed-0 $A/dora/seed-0 $A/adapter/seed-0 \
    $A/full/seed-0 --examples 128 --sampler-steps 2 --out results/analysis/effective_rank --png
# The same on title generation: 29-token responses, so 29 sampler steps and a finer curve.
$LD analyze effective-rank --adapters runs/agnews_title-lora_diffusion runs/agnews_title-lora \
    --examples 64 --sampler-steps 32 --out results/analysis/effective_rank_title --png
# Trajectory maps: one LoRA-Diffusion adapter per task, each on its own held-out prompts.
$LD analyze tsne --adapters $A/lora_diffusion/seed-0 runs/agnews-lora_diffusion runs/agnews_title-lora_diffusion \
    --examples 48 --sampler-steps 16 --out results/analysis/tsne --png
# Forgetting: held-out WikiText-2 / TinyStories under every SST-2 model of the methods table.
$LD analyze forgetting --adapters $A/full/seed-0 $A/lora_diffusion/seed-0 $A/lora/seed-0 $A/dora/seed-0 \
    $A/adapter/seed-0 $A/bitfit/seed-0 $A/prefix/seed-0 --examples 128 --out results/analysis/forgetting --png
# Composition: router over the three LoRA-Diffusion adapters, and peft merges of the weight-LoRA ones.
$LD analyze composition --adapters $A/lora_diffusion/seed-0 runs/agnews-lora_diffusion runs/agnews_title-lora_diffusion \
    --lora-adapters $A/lora/seed-0 runs/agnews-lora runs/agnews_title-lora --examples 200 --sampler-steps 16 \
    --out results/analysis/composition --png
# Data efficiency: held-out SST-2 accuracy against training-set size, 2 seeds, the swept lrs.
$LD analyze data-efficiency --task sst2 --sizes 100,1000,8000 --methods lora_diffusion,lora,full --seeds 0 1 \
    --steps 300 --bf16 --max-eval-examples 400 --lr-from results/lr_sweep_sst2.json --jobs 2 \
    --out results/analysis/data_efficiency --png
# Rank scaling of memory and speed (alone on the machine: it times things).
# (Responses of 16, 64 and 128 tokens, the default: 26 minutes on 2 cores.)
$LD analyze scaling --out results/analysis/scaling --png

# LoRA-Diffusion's default injection was `final` up to commit 0f0432e (now `blocks` on every
# position). The methods preset pins `final`, so the table above, its sweep and the analyses of
# its adapters reproduce as they are; `bench` below measured LoRA-Diffusion with its defaults
# of that time: rerun it with the code of 0f0432e (`analyze mixed-batch` was rerun at blocks).

# Issue 14: does knowing the step help an adapter? Weight LoRA r=16 against NaRA- and
# T-LoRA-style LoRA and LoRA-Diffusion at each injection site, at about LoRA's parameter
# count (compare --preset stepaware). Learning rates: LoRA's and LoRA-Diffusion final's
# from the methods table's sweep; every other row swept (x0.3, 1, 3 of its default) on the
# same 2% validation split of train, seed 0, 600 steps. fp32 (this CPU runs bf16 slower).
$LD compare --task sst2 --preset stepaware --lr-sweep 0.3,1,3 --validation-fraction 0.02 \
    --lr-from results/lr_sweep_sst2.json --steps 600 --seed 0 --sweep-only --jobs 2 \
    --out runs/stepaware-sst2 --results results/stepaware_sst2_sweep.json
# (The weights row was swept around its default of the time, 2e-3: 6e-4, 2e-3, 6e-3. Its
# default is now 6e-4, so this command sweeps 1.8e-4, 6e-4, 1.8e-3 for it today.)
# Both LoRA-Diffusion rows peaked at an edge of that sweep: one more rate each, beyond it.
$LD compare --task sst2 --preset stepaware --rows "LD blocks all 12/6/1" --lr-sweep 1,3,9 \
    --validation-fraction 0.02 --steps 600 --seed 0 --sweep-only --threads 1 \
    --out runs/stepaware-sst2 --results results/stepaware_sst2_sweep_blocks_all.json
$LD compare --task sst2 --preset stepaware --rows "LD weights 6/3/1 k=1" --lr-sweep 0.3,1 \
    --validation-fraction 0.02 --steps 600 --seed 0 --sweep-only --threads 1 \
    --out runs/stepaware-sst2 --results results/stepaware_sst2_sweep_weights.json
# The 3-seed table on all 872 dev examples at the chosen rates (later files win), the key
# rows first (results/stepaware_sst2_key_rows.json is that run's results.json), then the rest.
LR="results/lr_sweep_sst2.json results/stepaware_sst2_sweep.json results/stepaware_sst2_sweep_blocks_all.json results/stepaware_sst2_sweep_weights.json"
$LD compare --task sst2 --preset stepaware --rows lora "LD blocks all 12/6/1" "LD weights 6/3/1 k=1" \
    --steps 600 --seed 0 1 2 --jobs 2 --lr-from $LR --out runs/stepaware-sst2-dev
cp runs/stepaware-sst2-dev/results.json results/stepaware_sst2_key_rows.json
cp runs/stepaware-sst2-dev/results.md results/stepaware_sst2_key_rows.md
$LD compare --task sst2 --preset stepaware --rows nara tlora --steps 600 --seed 0 1 2 --jobs 2 \
    --lr-from $LR --out runs/stepaware-sst2-dev --no-profile
cp runs/stepaware-sst2-dev/results.json results/stepaware_sst2_nara_tlora.json
cp runs/stepaware-sst2-dev/results.md results/stepaware_sst2_nara_tlora.md
# The two blocks rows on dev at 3e-4 (every position: its default rate and the sweep's second
# best, picked by hand after the 9e-4 runs stalled on seed 1 of the dev table above).
printf '{"rows": [{"label": "LD blocks all 12/6/1", "lr": 0.0003}]}\n' > runs/lr_blocks_all_3e-4.json
$LD compare --task sst2 --preset stepaware --rows "LD blocks 12/6/1" "LD blocks all 12/6/1" --steps 600 \
    --seed 0 1 2 --jobs 2 --lr-from $LR runs/lr_blocks_all_3e-4.json --out runs/stepaware-sst2-blocks --no-profile \
    --results results/stepaware_sst2_blocks.json
# The same two rows of the headline table on AG News topic (rates carried from SST-2; a seeded
# 1,000 of the 7,600 test examples).
$LD compare --task agnews --preset stepaware --rows lora "LD blocks all 12/6/1" --steps 600 --seed 0 1 2 --jobs 2 \
    --max-eval-examples 1000 --lr-from results/lr_sweep_sst2.json runs/lr_blocks_all_3e-4.json \
    --out runs/stepaware-agnews --no-profile --results results/stepaware_agnews.json
# Does a learning-rate sweep on AG News itself close that gap? Both rows swept on a 10% validation
# split of AG News train (1,000 examples), seed 0: LoRA-Diffusion at x1 and x3 of its default
# (x0.3 lost 13 points on SST-2), weight LoRA at x0.3 and x1 (x3 diverged on SST-2).
C="--task agnews --preset stepaware --validation-fraction 0.1 --steps 600 --seed 0 --sweep-only --max-eval-examples 1000 --out runs/stepaware-agnews-sweep"
$LD compare $C --rows "LD blocks all 12/6/1" --lr-sweep 1,3 --jobs 2 --results results/stepaware_agnews_sweep_blocks_all.json
$LD compare $C --rows lora --lr-sweep 0.3,1 --jobs 2 --results results/stepaware_agnews_sweep_lora.json
# Is it capacity? LoRA-Diffusion's default size (64/32/8, k = 2: 5x weight LoRA's parameters) on AG News.
$LD compare --task agnews --methods lora_diffusion --steps 600 --seed 0 1 --jobs 2 --max-eval-examples 1000 \
    --no-profile --out runs/agnews-ld-default --results results/stepaware_agnews_ld_default.json
# Is it the split by phase? The same 12/6/1 budget as one shared module set of rank 19 (2 seeds).
$LD compare --task agnews --methods lora_diffusion --option injection=blocks --option blocks_positions=all \
    --option ranks=12,6,1 --option phases=shared --steps 600 --seed 0 1 --jobs 2 --max-eval-examples 1000 \
    --no-profile --out runs/agnews-shared --results results/stepaware_agnews_shared.json
# Effective rank per step and per layer for the new default's site, on AG News topic (seed-0
# adapters of the command above; 2-token answers: 2 sampler steps).
$LD analyze effective-rank --adapters runs/stepaware-agnews/lora/seed-0 runs/stepaware-agnews/LD_blocks_all_12_6_1/seed-0 \
    --examples 128 --sampler-steps 2 --per-layer --out results/analysis/effective_rank_agnews_blocks
# The generation task: every stepaware row on suite_struct, a short budget (300 steps saturates
# weight LoRA at ROUGE-L 100, the first command), the rates carried from SST-2.
$LD compare --task suite_struct --preset stepaware --rows lora --steps 300 --seed 0 --threads 1 \
    --out runs/gen/probe --results results/stepaware_struct_lora_300steps.json
$LD compare --task suite_struct --preset stepaware --steps 100 --seed 0 1 2 --jobs 2 \
    --lr-from results/lr_sweep_sst2.json results/stepaware_sst2_sweep.json results/stepaware_sst2_sweep_weights.json \
    results/stepaware_sst2_blocks.json --out runs/gen/struct100 --results results/stepaware_struct.json
# ... and three rows at 300 steps (do the body sites catch up?), 2 seeds.
$LD compare --task suite_struct --preset stepaware --rows lora "LD blocks all 12/6/1" "LD weights 6/3/1 k=1" \
    --steps 300 --seed 0 1 --jobs 2 --no-profile \
    --lr-from results/lr_sweep_sst2.json results/stepaware_sst2_sweep.json results/stepaware_sst2_sweep_weights.json \
    results/stepaware_sst2_blocks.json --out runs/gen/struct300 --results results/stepaware_struct_300steps.json
# Forgetting of the new default (the ablations' default row, seed 0) beside a weight LoRA trained
# with the same budget and precision (fp32, seed 0).
$LD compare --task sst2 --preset stepaware --rows lora --steps 600 --seed 0 --no-profile --max-eval-examples 200 \
    --lr-from results/lr_sweep_sst2.json --out runs/forget-lora --results results/forgetting_lora_sst2.json
$LD analyze forgetting --adapters runs/ablations-sst2/default/seed-0 runs/forget-lora/lora/seed-0 --examples 128 \
    --out results/analysis/forgetting_blocks
# Not yet run: the whole headline table in one command.
# $LD compare --task sst2 --preset stepaware --steps 600 --seed 0 1 2 --jobs 2 --lr-from $LR \
#     --out runs/stepaware-sst2-dev --results results/stepaware_sst2.json
# Issue 15: parallel decoding against the fixed sampler, on the seed-0 adapters above.
for row in lora LD_weights_6_3_1_k_1; do
    name=$(echo $row | tr 'A-Z' 'a-z')
    $LD eval --adapter runs/stepaware-sst2-dev/$row/seed-0 --out results/parallel_decoding/sst2_${name}_fixed.json
    for p in 0.5 0.7 0.9; do
        $LD eval --adapter runs/stepaware-sst2-dev/$row/seed-0 --threshold $p \
            --out results/parallel_decoding/sst2_${name}_threshold_$p.json
    done
done
# ... and on the generation task (suite_struct, the 300-step seed-0 adapters above; answers up to 12
# tokens): the fixed sampler at T = 12 (one call per position) down to 1, and the threshold decoder.
for spec in "struct_lora lora" "struct_ld_blocks_all_12_6_1 LD_blocks_all_12_6_1"; do
    set -- $spec
    for T in 12 6 4 3 2 1; do
        $LD eval --adapter runs/gen/struct300/$2/seed-0 --steps $T --out results/parallel_decoding/$1_fixed_T$T.json
    done
    for p in 0.5 0.7 0.9; do
        $LD eval --adapter runs/gen/struct300/$2/seed-0 --threshold $p --out results/parallel_decoding/$1_threshold_$p.json
    done
done
# ... and on SST-2 with today's adapters (weight LoRA of runs/forget-lora, LoRA-Diffusion blocks of
# runs/stepaware-sst2-blocks): the fixed sampler at T = 2 and 1, and the threshold decoder.
for spec in "sst2_lora_600 runs/forget-lora/lora/seed-0" \
            "sst2_ld_blocks_all_12_6_1 runs/stepaware-sst2-blocks/LD_blocks_all_12_6_1/seed-0"; do
    set -- $spec
    for T in 2 1; do $LD eval --adapter $2 --steps $T --out results/parallel_decoding/$1_fixed_T$T.json; done
    $LD eval --adapter $2 --threshold 0.5 --out results/parallel_decoding/$1_threshold_0.5.json
done
# ... and on AG News topic (the seed-0 adapters of runs/stepaware-agnews; the fixed sampler's
# scores are those runs' own results.json: the same 1,000 test examples at T = 64).
for spec in "agnews_lora lora" "agnews_ld_blocks_all_12_6_1 LD_blocks_all_12_6_1"; do
    set -- $spec
    $LD eval --adapter runs/stepaware-agnews/$2/seed-0 --max-eval-examples 1000 --threshold 0.5 \
        --out results/parallel_decoding/$1_threshold_0.5.json
    $LD eval --adapter runs/stepaware-agnews/$2/seed-0 --max-eval-examples 1000 --steps 1 \
        --out results/parallel_decoding/$1_fixed_T1.json
done
# Issue 15: many LoRA-Diffusion adapters in one batch (alone on the machine: it times things).
$LD analyze mixed-batch --adapter-counts 8,32 --threads 2 --out results/analysis/mixed_batch
# Issue 15: the frozen base computed once (--cache-base) for LoRA-Diffusion final, beside the uncached
# row and weight LoRA, on 1,000 SST-2 training examples (each seen ~10 times), alone on the machine.
$LD compare --task sst2 --preset cache --steps 600 --seed 0 1 2 --max-train-examples 1000 --no-profile \
    --threads 2 --out runs/cache-sst2 --results results/base_cache_sst2.json
# ... and the control: the cache on but keeping nothing (the base runs every step, without dropout).
$LD train --task sst2 --max-train-examples 1000 --method lora_diffusion --option injection=final --cache-base \
    --cache-base-mb 0 --steps 600 --seed 0 1 2 --eval-every 0 --threads 1 --out runs/cache-sst2-nokeep \
    --results results/base_cache_sst2_nokeep.json
# Issue 15: DDP, FSDP and DeepSpeed ZeRO-2 on 2 CPU processes (gloo, 1 thread each; alone on the machine), the
# shipped base, the same global batch (8 per process) and seeds: parameter bytes each process holds,
# optimiser bytes each process holds, step time, final train loss, held-out accuracy.
for engine in ddp fsdp deepspeed; do
    for method in full lora; do
        OMP_NUM_THREADS=1 .venv/bin/accelerate launch --config_file configs/accelerate/$engine.yaml \
            -m lora_diffusion train --task sst2 --max-train-examples 1000 --method $method --steps 100 \
            --batch-size 8 --seed 0 1 --eval-every 0 --checkpoint-every 0 --out runs/engines/$engine-$method \
            --results results/engines/$engine-$method.json
    done
done
# Issue 15: the bench on this CPU (alone on the machine).
$LD bench --methods lora_diffusion,lora,full --batch-size 16 --threads 2 --out results/bench_cpu.json
# Issue 14: every stepaware row's training step, memory and generation overhead in one run (alone on the machine).
$LD bench --preset stepaware --generation --batch-size 16 --threads 2 --out results/bench_stepaware_cpu.json

# Issue 14: the paper's ablations at the blocks default, one seed, each row at its site's
# default rate: every row of the six presets once (20 runs; 2 at a time), then each preset's
# table read back from the same folder.
$LD compare --task sst2 --preset ablations --steps 600 --seed 0 --jobs 2 --no-profile --out runs/ablations-sst2
for p in ranks modules regularizers schedule injection phases; do
    $LD compare --task sst2 --preset $p --steps 600 --seed 0 --no-profile --out runs/ablations-sst2 \
        --results results/ablation_$p.json
done
# Issue 16: the app's default run at 150 steps (LoRA-Diffusion 77.5 +- 5.3: too few steps; the default stays 200).
$LD compare --task suite_sentiment --methods lora_diffusion,lora --steps 150 --seed 0 1 --jobs 2 --sampler-steps 8 \
    --no-profile --out runs/app-default-150 --results results/app_default_150steps.json
# Issue 14: effective rank per step and per layer on the multi-token task (seed-0 suite_struct adapters above).
S=runs/gen/struct100
$LD analyze effective-rank --adapters $S/lora/seed-0 $S/LD_blocks_all_12_6_1/seed-0 $S/LD_weights_6_3_1_k_1/seed-0 \
    --examples 64 --sampler-steps 12 --per-layer --out results/analysis/effective_rank_struct_body
# Data efficiency of the new default beside weight LoRA (300 steps: LoRA-Diffusion is still on its plateau there).
$LD analyze data-efficiency --task sst2 --sizes 100,1000,8000 --methods lora_diffusion,lora --seeds 0 1 \
    --steps 300 --max-eval-examples 400 --jobs 2 --quiet --out results/analysis/data_efficiency_blocks
# ... and at 600 steps, where it has left the plateau.
$LD analyze data-efficiency --task sst2 --sizes 100,1000,8000 --methods lora_diffusion,lora --seeds 0 1 \
    --steps 600 --max-eval-examples 400 --jobs 2 --quiet --out results/analysis/data_efficiency_blocks_600
