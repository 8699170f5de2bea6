#!/usr/bin/env bash
# Move ImageNet (ILSVRC2012) onto shared storage in the layout the pipeline reads:
#
#     DEST/train/<wnid>/*.JPEG      DEST/val/<wnid>/*.JPEG
#
# usage: stage_imagenet.sh SRC DEST
#   SRC   a folder, or an s3:// or gs:// prefix, holding the archives from image-net.org
#         (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) and Kaggle's LOC_val_solution.csv
#   DEST  the shared file system's ImageNet folder (/fsx/imagenet, /mnt/filestore/imagenet,
#         /mnt/imagenet on the Kubernetes volume)
#
# Safe to re-run: finished steps are skipped (a staged dataset is left alone). Set
# KEEP_ARCHIVES=1 to keep the ~150 GB of archives after unpacking. If PIPELINE_PIP_SPEC is
# set, the project is pip-installed from it first (without torch or DALI: the dataset tools
# need neither).
set -euo pipefail

src=${1:?usage: stage_imagenet.sh SRC DEST}
dest=${2:?usage: stage_imagenet.sh SRC DEST}
py=${PYTHON:-python}
stage="$dest/_archives"
jobs=$(nproc)

if [ -n "${PIPELINE_PIP_SPEC:-}" ]; then
  "$py" -m pip install --quiet --no-deps "$PIPELINE_PIP_SPEC"
  "$py" -m pip install --quiet "pyyaml>=6" "pillow>=10"
fi

if [ ! -d "$stage" ] && "$py" -m pipeline data check-layout "$dest" >/dev/null 2>&1; then
  echo "ImageNet is already staged at $dest"; exit 0
fi

mkdir -p "$stage"
for f in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar LOC_val_solution.csv; do
  [ -s "$stage/$f" ] && continue
  echo "copying $src/$f"
  case "$src" in
    # pyarrow (in the Ray image) reads S3 and GCS with the pod's or node's own credentials.
    *://*) "$py" -c 'import sys, pyarrow.fs as fs; fs.copy_files(sys.argv[1], sys.argv[2])' \
             "$src/$f" "$stage/$f.part" ;;
    *) cp "$src/$f" "$stage/$f.part" ;;
  esac
  mv "$stage/$f.part" "$stage/$f"
done

if [ ! -e "$stage/.train-done" ]; then
  echo "unpacking train (1000 class archives, $jobs at a time)"
  mkdir -p "$dest/train"
  tar -xf "$stage/ILSVRC2012_img_train.tar" -C "$dest/train"
  find "$dest/train" -maxdepth 1 -name 'n*.tar' -print0 |
    xargs -0 -P "$jobs" -I{} sh -c 'd="${1%.tar}"; mkdir -p "$d" && tar -xf "$1" -C "$d" && rm "$1"' _ {}
  touch "$stage/.train-done"
fi

# prepare-val's manifest marks a sorted val/ (unpacking again would leave loose copies).
if [ ! -e "$dest/val/.prepare-val-manifest.json" ]; then
  echo "unpacking val and sorting it into class folders"
  mkdir -p "$dest/val"
  tar -xf "$stage/ILSVRC2012_img_val.tar" -C "$dest/val"
  "$py" -m pipeline data prepare-val --val "$dest/val" --labels "$stage/LOC_val_solution.csv"
fi

"$py" -m pipeline data check-layout "$dest"
[ "${KEEP_ARCHIVES:-0}" = 1 ] || rm -rf "$stage"
echo "ImageNet is ready at $dest"
