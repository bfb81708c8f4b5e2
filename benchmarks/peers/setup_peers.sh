#!/usr/bin/env bash
# Create the peer-framework virtual environments used by benchmarks/peers/bench_peers.py.
#
# They live OUTSIDE the project's dependencies, by default under
#   ~/.cache/secure-inference-peers/{spu,crypten}
# (override the folder with SECURE_PEERS_DIR=/some/where). Idempotent: an environment whose
# check import already works is left alone; FORCE=1 rebuilds both.
#
#   bash benchmarks/peers/setup_peers.sh            # both
#   bash benchmarks/peers/setup_peers.sh spu        # only SPU
#   bash benchmarks/peers/setup_peers.sh crypten    # only CrypTen
#
# SPU 0.9.5: CPython 3.10/3.11 only (Requires-Python <3.12), numpy<2, jax[cpu]<=0.4.34.
# CrypTen 0.4.1: declares torchvision, tensorboard and the dead 'sklearn' package as
# dependencies, so it is installed with --no-deps and its real runtime deps are added by
# hand; torch is pinned (torch==2.13.0 resolves to the machine's local CPU wheel -- an
# unpinned torch would pull several GB of CUDA wheels). On torch >= 2.5 CrypTen's import of
# torch.onnx._internal.registration fails; a one-line stub module is written into the venv.
set -u -o pipefail

PEERS_DIR="${SECURE_PEERS_DIR:-$HOME/.cache/secure-inference-peers}"
PYTHON="${PEERS_PYTHON:-python3}"
FORCE="${FORCE:-0}"
TORCH_PIN="${PEERS_TORCH_PIN:-torch==2.13.0}"
WHICH="${1:-all}"

log() { printf '[setup_peers] %s\n' "$*"; }
run() { log "+ $*"; "$@"; }

pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    log "ERROR: no usable Python at '$PYTHON' (set PEERS_PYTHON)"; exit 2; }
log "peer environments under $PEERS_DIR (Python $pyver from $(command -v "$PYTHON"))"
mkdir -p "$PEERS_DIR"

make_venv() {  # make_venv DIR
    local dir="$1"
    if [[ "$FORCE" == 1 && -d "$dir" ]]; then run rm -rf "$dir"; fi
    if [[ ! -x "$dir/bin/python" ]]; then
        run "$PYTHON" -m venv "$dir" || return 1
        run "$dir/bin/python" -m pip install --quiet --upgrade "pip<25" || return 1
    else
        log "venv $dir exists"
    fi
}

status=0

# ---- SPU -------------------------------------------------------------------------------
setup_spu() {
    local dir="$PEERS_DIR/spu" py
    py="$dir/bin/python"
    log "== SPU 0.9.5 (jax 0.4.34, numpy<2) in $dir"
    case "$pyver" in
        3.10|3.11) ;;
        *) log "ERROR: spu 0.9.5 has wheels for CPython 3.10/3.11 only, $PYTHON is $pyver;" \
               "set PEERS_PYTHON to a python3.11"; return 1 ;;
    esac
    if [[ "$FORCE" != 1 && -x "$py" ]] && "$py" -c 'import spu, jax, spu.utils.simulation' 2>/dev/null; then
        log "SPU environment already works: $("$py" -c 'from importlib.metadata import version as v; print("spu", v("spu"), "jax", v("jax"), "jaxlib", v("jaxlib"), "numpy", v("numpy"))')"
        return 0
    fi
    make_venv "$dir" || return 1
    # jaxlib must equal jax; numpy<2 because spu 0.9.5's extension is built against numpy 1.
    run "$py" -m pip install "spu==0.9.5" "jax==0.4.34" "jaxlib==0.4.34" "numpy<2" || {
        log "ERROR: pip could not install spu==0.9.5 (see above)."
        log "       check what the index offers: $py -m pip index versions spu ; $py -m pip download --no-deps spu==0.9.5 -d /tmp/x"
        return 1; }
    "$py" -c 'import spu, jax, spu.utils.simulation, spu.libspu' || { log "ERROR: spu installed but does not import"; return 1; }
    log "SPU ready: $("$py" -c 'from importlib.metadata import version as v; print("spu", v("spu"), "jax", v("jax"), "jaxlib", v("jaxlib"), "numpy", v("numpy"))')"
}

# ---- CrypTen ---------------------------------------------------------------------------
crypten_stub() {  # write torch.onnx._internal.registration (registry = None) if torch lacks it
    local py="$1" target
    if "$py" -c 'import torch.onnx._internal.registration' 2>/dev/null; then
        log "torch.onnx._internal.registration exists, no stub needed"; return 0; fi
    target=$("$py" -c 'import os, torch.onnx._internal as m; print(os.path.join(os.path.dirname(m.__file__), "registration.py"))') || return 1
    log "writing stub $target (registry = None): CrypTen imports it, torch >= 2.5 removed it"
    printf '# Stub written by setup_peers.sh: CrypTen 0.4.1 imports this module (removed from torch).\nregistry = None\n' > "$target"
}

setup_crypten() {
    local dir="$PEERS_DIR/crypten" py
    py="$dir/bin/python"
    log "== CrypTen 0.4.1 ($TORCH_PIN) in $dir"
    if [[ "$FORCE" != 1 && -x "$py" ]] && "$py" -c 'import crypten' 2>/dev/null; then
        log "CrypTen environment already works: $("$py" -c 'from importlib.metadata import version as v; print("crypten", v("crypten"), "torch", v("torch"), "numpy", v("numpy"))' 2>/dev/null | tail -1)"
        return 0
    fi
    make_venv "$dir" || return 1
    run "$py" -m pip install "$TORCH_PIN" || {
        log "ERROR: could not install $TORCH_PIN (it should come from a local wheel in seconds;"
        log "       do NOT install an unpinned torch: it downloads several GB)"; return 1; }
    run "$py" -m pip install --no-deps "crypten==0.4.1" || return 1
    run "$py" -m pip install omegaconf onnx pandas pyyaml scipy future numpy || return 1
    crypten_stub "$py" || return 1
    "$py" -c 'import crypten' || { log "ERROR: crypten installed but does not import"; return 1; }
    log "CrypTen ready: $("$py" -c 'from importlib.metadata import version as v; print("crypten", v("crypten"), "torch", v("torch"), "numpy", v("numpy"))' 2>/dev/null | tail -1)"
}

if [[ "$WHICH" == all || "$WHICH" == spu ]]; then
    setup_spu || { status=1; log "SPU setup FAILED"; }
fi
if [[ "$WHICH" == all || "$WHICH" == crypten ]]; then
    setup_crypten || { status=1; log "CrypTen setup FAILED"; }
fi
log "done (status $status)"
exit $status
