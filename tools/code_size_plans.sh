#!/usr/bin/env bash
# The sample plans `tools/code_sizes.py` measures (layer-based and patch plans with VDPC that
# together call every kernel kind, the patch stage's elementwise calls included), written to
# DIR; then it runs the tool on them, rewriting kernels/code_sizes.json (~20 min):
#
#     tools/code_size_plans.sh DIR
#
# Needs the shared models beside the repository (../shared/models) and the cross compiler.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: tools/code_size_plans.sh DIR}
PY=${PYTHON:-$REPO/.venv/bin/python}
SHARED=$REPO/../shared/models
EX=$REPO/examples/fashion
mkdir -p "$OUT" && cd "$OUT"
cp "$EX/fashion_cnn.onnx" fashion.onnx
cp "$SHARED/kws_ref_model_fp32.onnx" kws.onnx
cp "$SHARED/pretrainedResnet.onnx" resnet.onnx
PYTHONPATH=$REPO/tests:$REPO "$PY" - <<'P'
import numpy as np
import real_networks as R
import test_binary_ops as T
from mpq.frontend import load_model
from mpq.quant.calibrate import onnx_input_shape
for name, make in R.REAL_NETWORKS.items():
    open(f"{name}.onnx", "wb").write(make().SerializeToString())
    shape = onnx_input_shape(load_model(f"{name}.onnx"))
    np.savez(f"{name}_calib.npz", x=np.random.default_rng(7).random((48, *shape), dtype=np.float32))
np.savez("resnet_calib.npz", x=np.random.default_rng(3).random((32, 32, 32, 3), dtype=np.float32) * 255)
open("se.onnx", "wb").write(T.se_model().SerializeToString())
open("stage.onnx", "wb").write(T.stage_model().SerializeToString())
np.savez("se_calib.npz", x=T._x((3, 12, 12), 48))
np.savez("stage_calib.npz", x=T._x((3, 16, 16), 32))
P
s() { out=$1; shift; PYTHONPATH=$REPO "$PY" -m mpq.cli search "$@" -o "$out.plan.json" -q >/dev/null; }
# layer-based
s fashion fashion.onnx --board nano33ble --strategy qe --weight-bits 8,4,2 --patches none --flash 97000
s kws kws.onnx --board stm32h743 --strategy qe --weight-bits 8,4,2 --patches none
s fw4a4 fashion.onnx --board nano33ble --strategy qe --bits 4 --weights linear:4 --patches none
s rw4a4 resnet.onnx --board nano33ble --strategy qe --bits 4 --weights linear:4 --patches none
s rint8 resnet.onnx --board nano33ble --strategy int8 --patches none --data resnet_calib.npz
for n in mobilenet_v3_small blazeface yolo; do
  s "$n" "$n.onnx" --board nano33ble --data "${n}_calib.npz" --strategy int8 --patches none
done
s se se.onnx --board nano33ble --data se_calib.npz --strategy qe --patches none
# patch plans, most with VDPC (the stage's calls: conv, depthwise, activation, add, mul, sub, prelu)
s demo fashion.onnx --board nano33ble --strategy qe --sram 16000 --patches k=4,n=3 --data "$EX/calib.npz"
s demo_measured fashion.onnx --board nano33ble --sram 14000 --data "$EX/calib.npz"
s stagep stage.onnx --board nano33ble --data stage_calib.npz --strategy qe --patches k=6,n=2
s yolop yolo.onnx --board nano33ble --data yolo_calib.npz --strategy qe --patches k=4,n=2
s resp resnet.onnx --board nano33ble --strategy qe --patches k=4,n=2 --data resnet_calib.npz
# a stage ending in a global average pool, one row per patch (mpq_avgpool_accumulate/_finish)
s kwsp kws.onnx --board nano33ble --strategy qe --sram 6000 --patches k=10,n=25,m=1
s mbv3p mobilenet_v3_small.onnx --board nano33ble --data mobilenet_v3_small_calib.npz --strategy qe --patches k=2,n=2
cd "$REPO" && PYTHONPATH=$REPO "$PY" -m tools.code_sizes "$OUT"/*.plan.json
