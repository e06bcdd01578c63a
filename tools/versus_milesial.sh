#!/usr/bin/env bash
# Side by side, in one invocation: this project's `python train.py` at its defaults against
# milesial/Pytorch-UNet's own `train.py --amp`, on the same photos, epochs and picture size, one
# after the other (never at once: two trainings on the same cores would slow each other), each
# timed by the wall clock. It prints both walls and the ratio ours / milesial's (issue 25's check
# wants <= 0.8).
#
#   MILESIAL_DIR=/path/to/Pytorch-UNet DATA_DIR=/path/to/carvana EPOCHS=3 \
#       bash tools/versus_milesial.sh [--also-no-amp | --only-no-amp]
#
# MILESIAL_DIR  a checkout of milesial/Pytorch-UNet whose data/imgs and data/masks hold the same
#               photos as DATA_DIR (its train.py reads ./data/imgs and ./data/masks, masks named
#               <id>_mask.*). Never inside this repository: its code is GPL and stays out of ours.
# DATA_DIR      Carvana layout (train/<id>.jpg, train_masks/<id>_mask.gif) of the same files.
# EPOCHS        epochs for both (default 3).
# Optional:
# MILESIAL_PYTHON  its interpreter (default MILESIAL_DIR/.venv/bin/python, else python).
# MILESIAL_PYTHONPATH  prepended to PYTHONPATH for milesial's run only (e.g. a folder of stubs for
#               a module it imports but never calls; its code itself stays unmodified).
# OUR_PYTHON    ours (default .venv/bin/python of this repository, else python).
# SCALE         milesial's --scale (default 0.1252: it resizes to int(SCALE*w) x int(SCALE*h), and
#               0.1252 is the scale that turns 1918x1280 into 240x160, the size our defaults train
#               at; 0.125 would give 239x160).
# BATCH         milesial's --batch-size (default 16).
# FRESH_CACHE=1 give our run an empty temporary --CACHE_DIR, so that decoding the photos into the
#               cache is counted as on a fresh checkout; by default our run uses the default cache/
#               of this repository, which a previous run on the same photos may have filled.
# --also-no-amp also time milesial without --amp: on a CPU, --amp is bfloat16 autocast, and a CPU
#               without native bfloat16 (no AVX512_BF16/AMX) emulates it, many times slower.
# --only-no-amp time milesial without --amp alone (such a CPU: about ten times faster there).
set -euo pipefail

amp=1
also_no_amp=0
for arg in "$@"; do
    case $arg in
        --also-no-amp) also_no_amp=1 ;;
        --only-no-amp) also_no_amp=1 amp=0 ;;
        *) echo "usage: MILESIAL_DIR=... DATA_DIR=... [EPOCHS=3] $0 [--also-no-amp | --only-no-amp]" >&2
           exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)  # our repository root: train.py's defaults are relative
: "${MILESIAL_DIR:?set MILESIAL_DIR to a checkout of milesial/Pytorch-UNet}"
: "${DATA_DIR:?set DATA_DIR to a Carvana-layout folder (train/ + train_masks/)}"
MILESIAL_DIR=$(cd "$MILESIAL_DIR" && pwd)
DATA_DIR=$(cd "$DATA_DIR" && pwd)
EPOCHS=${EPOCHS:-3}
SCALE=${SCALE:-0.1252}
BATCH=${BATCH:-16}
if [ -z "${MILESIAL_PYTHON:-}" ]; then
    MILESIAL_PYTHON=python
    [ -x "$MILESIAL_DIR/.venv/bin/python" ] && MILESIAL_PYTHON=$MILESIAL_DIR/.venv/bin/python
fi
if [ -z "${OUR_PYTHON:-}" ]; then
    OUR_PYTHON=python
    [ -x "$root/.venv/bin/python" ] && OUR_PYTHON=$root/.venv/bin/python
fi
case $MILESIAL_DIR/ in
    "$root"/*) echo "error: MILESIAL_DIR is inside this repository; keep it outside" >&2; exit 2 ;;
esac

# The same photos on both sides, or the comparison means nothing: compare the sets of ids.
ids() { find -L "$1" -maxdepth 1 -type f ! -name '.*' -printf '%f\n' | sed 's/\.[^.]*$//' | sort; }
ours_ids=$(ids "$DATA_DIR/train")
theirs_ids=$(ids "$MILESIAL_DIR/data/imgs")
if [ "$ours_ids" != "$theirs_ids" ]; then
    echo "error: DATA_DIR/train and MILESIAL_DIR/data/imgs hold different photos" >&2
    exit 2
fi
count=$(printf '%s\n' "$ours_ids" | grep -c . || true)
size=$(awk -v s="$SCALE" 'BEGIN { printf "%dx%d", int(s * 1918), int(s * 1280) }')

work=$(mktemp -d)
stamp=$work/started  # milesial's checkpoints newer than this are this run's, removed at the end
touch "$stamp"
cleanup() {
    # Our run's pictures land in saved_images/elsewhere/<temp path> (settings.pictures_folder).
    rm -rf "$root/saved_images/elsewhere${work}"
    local dir=$root/saved_images/elsewhere${work%/*}  # and its parents, where left empty
    while [ "$dir" != "$root/saved_images" ] && rmdir "$dir" 2>/dev/null; do dir=${dir%/*}; done
    find "$MILESIAL_DIR/checkpoints" -maxdepth 1 -name 'checkpoint_epoch*.pth' -newer "$stamp" \
        -delete 2>/dev/null || true
    rmdir "$MILESIAL_DIR/checkpoints" 2>/dev/null || true  # only where that left it empty
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

echo "photos: $count in both; epochs: $EPOCHS; ours 240x160 at its defaults," \
    "milesial --scale $SCALE ($size per 1918x1280 photo), --batch-size $BATCH"
echo "logs: $work/*.log (removed at exit unless KEEP_LOGS=1 copies them to ./versus_logs)"

# (a) ours: only the data, the epochs and a fresh checkpoint folder set; every other default.
our_args=(--DATA_DIR="$DATA_DIR" --NUM_EPOCHS="$EPOCHS" --CHECKPOINT_DIR="$work/ours")
[ "${FRESH_CACHE:-0}" = 1 ] && our_args+=(--CACHE_DIR="$work/cache")
echo "== ours: $OUR_PYTHON train.py ${our_args[*]}"
t0=$(now)
(cd "$root" && "$OUR_PYTHON" train.py "${our_args[@]}") >"$work/ours.log" 2>&1 \
    || { tail -20 "$work/ours.log"; echo "error: our run failed" >&2; exit 1; }
t1=$(now)
ours=$(elapsed "$t0" "$t1")
echo "ours: $ours s"

# (b) milesial's own train.py, unmodified, run where it expects ./data; wandb switched off from
# the outside (its maintainer's advice: WANDB_MODE=disabled), since there is no login or network.
milesial() {  # milesial NAME ARGS...: one timed run; sets $wall
    local name=$1
    shift
    echo "== milesial: $MILESIAL_PYTHON train.py $*"
    local a b
    a=$(now)
    (cd "$MILESIAL_DIR" \
        && WANDB_MODE=disabled PYTHONPATH="${MILESIAL_PYTHONPATH:-}${PYTHONPATH:+:$PYTHONPATH}" \
           "$MILESIAL_PYTHON" train.py "$@") >"$work/$name.log" 2>&1 \
        || { tail -20 "$work/$name.log"; echo "error: milesial's run failed" >&2; exit 1; }
    b=$(now)
    wall=$(elapsed "$a" "$b")
    echo "milesial $name: $wall s"
}
common=(--epochs "$EPOCHS" --batch-size "$BATCH" --scale "$SCALE")
if [ "$amp" = 1 ]; then
    milesial amp --amp "${common[@]}"
    amp_wall=$wall
fi
if [ "$also_no_amp" = 1 ]; then
    milesial no_amp "${common[@]}"
    no_amp=$wall
fi

if [ "${KEEP_LOGS:-0}" = 1 ]; then
    mkdir -p versus_logs && cp "$work"/*.log versus_logs/
fi
echo
echo "ours:                 $ours s"
if [ "$amp" = 1 ]; then
    echo "milesial --amp:       $amp_wall s"
    awk -v o="$ours" -v m="$amp_wall" 'BEGIN { printf "ratio ours/milesial --amp: %.3f\n", o / m }'
fi
if [ "$also_no_amp" = 1 ]; then
    echo "milesial (no --amp):  $no_amp s"
    awk -v o="$ours" -v m="$no_amp" 'BEGIN { printf "ratio ours/milesial no-amp: %.3f\n", o / m }'
fi
