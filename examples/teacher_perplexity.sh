#!/usr/bin/env bash
# The embedded teacher end to end on CPU. Run from the repository root after `make install`.
set -euo pipefail
NM=.venv/bin/nemo-minitron
$NM prepare-data conf/prepare_data/shakespeare.yaml
$NM import-hf conf/import_hf/teacher.yaml overwrite=true
$NM eval conf/eval/teacher.yaml model=runs/checkpoints/smollm2-135m-instruct max_windows=8
$NM eval conf/eval/teacher.yaml model=runs/checkpoints/smollm2-135m-instruct max_windows=8 \
    parallel.pipeline_model_parallel_size=2 micro_batch_size=2
$NM export-hf conf/export_hf/teacher.yaml overwrite=true
$NM eval conf/eval/teacher.yaml model=runs/export/smollm2-135m-instruct-hf max_windows=8 backend=hf
