#!/usr/bin/env bash
# Write BOTH ImageNet splits to FFCV, as in the paper's README (the authors' script wrote only val):
#
#   IMAGENET_DIR=/data/imagenet WRITE_DIR=/data/ffcv ./write_imagenet.sh 500 0.50 90
#
# Built-in data (after prepare_fashion_mnist.py; what `make demo` runs, lossless):
#
#   IMAGENET_DIR=.cache/fmnist/images WRITE_DIR=.cache/fmnist/ffcv train/write_imagenet.sh 500 0.50 90 --write_mode raw
#
# Arguments: max resolution (px), JPEG compress probability, JPEG quality; anything after them is passed to
# write_imagenet.py (e.g. --subset 5000 --overwrite). Reads $IMAGENET_DIR/{train,val}/<class>/<image>, writes
# $WRITE_DIR/{train,val}_<res>_<prob>_<quality>.beton plus a .json sidecar each. Works from train/ or from the
# repository root (train/write_imagenet.sh); uses $PYTHON, else the repository's .venv, else python3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python3; fi
fi

if [ $# -lt 3 ]; then
    echo "usage: IMAGENET_DIR=... WRITE_DIR=... $0 MAX_RESOLUTION COMPRESS_PROBABILITY JPEG_QUALITY [write_imagenet.py flags]" >&2
    echo "  e.g. $0 500 0.50 90" >&2
    exit 2
fi
: "${IMAGENET_DIR:?set IMAGENET_DIR to the folder holding train/ and val/}"
: "${WRITE_DIR:?set WRITE_DIR to the folder for the .beton files}"
res="$1"; prob="$2"; quality="$3"; shift 3

for split in train val; do
    if [ ! -d "$IMAGENET_DIR/$split" ]; then
        echo "error: $IMAGENET_DIR/$split: split folder not found (IMAGENET_DIR must hold train/ and val/)" >&2
        exit 2
    fi
done
mkdir -p "$WRITE_DIR"

written=()
for split in train val; do
    out="$WRITE_DIR/${split}_${res}_${prob}_${quality}.beton"
    "$PYTHON" "$here/write_imagenet.py" --data_dir "$IMAGENET_DIR/$split" --write_path "$out" --split "$split" \
        --max_resolution "$res" --compress_probability "$prob" --jpeg_quality "$quality" --write_mode proportion "$@"
    written+=("$out")
done
echo "FFCV files written:"
for f in "${written[@]}"; do echo "  $f"; done
