"""Three real MCU network shapes, built with onnx.helper (random weights, no PyTorch).

Issue 14 asks that the ops real detectors and mobile classifiers use work end to end. Each
builder reproduces the *structure* of a published network, scaled down so a test can search,
export and run it under QEMU in seconds, with the node patterns its usual exporter writes:

* :func:`mobilenet_v3_small_style` — torch.onnx's MobileNetV3-Small: HardSwish stem,
  inverted residuals with squeeze-excite (GlobalAveragePool or ReduceMean → 1×1 conv → Relu →
  1×1 conv → HardSigmoid/Sigmoid → Mul with the per-channel broadcast), a residual Add,
  HardSwish classifier.
* :func:`blazeface_style` — MediaPipe BlazeFace short-range: 5×5 stem, BlazeBlocks whose
  shortcut is widened by a **channel Pad** (TFLite's residual-widening idiom) and downsampled by
  MaxPool, two scales of anchors, two heads per scale (1×1 convs → Transpose NCHW→NHWC →
  Reshape [1, N, k]) concatenated along the anchor axis: **two outputs**, `classificators`
  [1, N, 1] and `regressors` [1, N, 16].
* :func:`yolo_style` — a YOLO-tiny head: LeakyRelu(0.1) backbone, a detection head at 1/8,
  a 1×1 conv → **Resize nearest ×2** → **Concat** with the 1/4 feature map → second head:
  **two outputs**, `yolo_8` and `yolo_16`.

Run ``python tests/real_networks.py`` to build each model and run it in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx_builders import IR_VERSION, _Builder, _input

#: HardSwish needs opset 14; ReduceMean keeps `axes` as an attribute until opset 18.
OPSET = 14


def _finish(b: _Builder, name: str, inputs: list[onnx.ValueInfoProto],
            outputs: list[str]) -> onnx.ModelProto:
    """Assemble at opset 14, fill the output shapes by inference and run the full checker."""
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(b.nodes, name, inputs, outs, initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="pytorch",
                              producer_version="2.1.0")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for declared, got in zip(model.graph.output, inferred.graph.output, strict=True):
        declared.type.CopyFrom(got.type)
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(b: _Builder, x: str, cin: int, cout: int, name: str, kernel: int = 1,
          stride: int = 1, group: int = 1, pads: tuple[int, int, int, int] | None = None,
          gain: float = 2.0) -> str:
    """Conv with He weights and a small bias; `pads` defaults to SAME for odd kernels."""
    p = kernel // 2
    w = b.init(f"{name}.weight", b.he((cout, cin // group, kernel, kernel), gain=gain))
    bias = b.init(f"{name}.bias", b.small(cout))
    return b.conv(x, w, bias, f"/{name}/Conv", kernel, stride,
                  pads if pads is not None else (p, p, p, p), group=group)


# --------------------------------------------------------------------------------------------
# MobileNetV3-Small
# --------------------------------------------------------------------------------------------


def _squeeze_excite(b: _Builder, x: str, channels: int, squeeze: int, name: str,
                    reduce_mean: bool, gate: str) -> str:
    """SE block: pool → 1×1 conv → Relu → 1×1 conv → gate → Mul(x, gate) (broadcast [N,C,1,1])."""
    if reduce_mean:
        s = b.node("ReduceMean", [x], f"/{name}/ReduceMean", axes=[2, 3], keepdims=1)
    else:
        s = b.node("GlobalAveragePool", [x], f"/{name}/avgpool/GlobalAveragePool")
    s = _conv(b, s, channels, squeeze, f"{name}.fc1")
    s = b.node("Relu", [s], f"/{name}/Relu")
    s = _conv(b, s, squeeze, channels, f"{name}.fc2")
    if gate == "hardsigmoid":
        # torch exports nn.Hardsigmoid as HardSigmoid(alpha=1/6, beta=0.5).
        s = b.node("HardSigmoid", [s], f"/{name}/scale_activation/HardSigmoid",
                   alpha=1.0 / 6.0, beta=0.5)
    else:
        s = b.node("Sigmoid", [s], f"/{name}/scale_activation/Sigmoid")
    return b.node("Mul", [s, x], f"/{name}/Mul")


def mobilenet_v3_small_style(resolution: int = 32, num_classes: int = 10,
                             seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-Small's building blocks at 1/4 width (input ``['batch', 3, R, R]``).

    stem 3×3/2 → 16, HardSwish;
    block 1: dw 3×3/2 16, Relu, SE(GlobalAveragePool, HardSigmoid), project 1×1 → 16;
    block 2: expand 1×1 → 48 Relu, dw 3×3/2, project → 24;
    block 3: expand 1×1 → 64 HardSwish, dw 5×5/1 HardSwish, SE(ReduceMean, Sigmoid),
             project → 24, residual Add;
    head: 1×1 → 64 HardSwish → GlobalAveragePool → Flatten → Gemm 64 → HardSwish → Gemm.
    """
    b = _Builder(seed)
    x = _conv(b, "input", 3, 16, "features.0.0", 3, 2)
    x = b.node("HardSwish", [x], "/features/features.0/features.0.2/HardSwish")
    # block 1
    x = _conv(b, x, 16, 16, "features.1.block.0.0", 3, 2, group=16)
    x = b.node("Relu", [x], "/features.1/block.0/Relu")
    x = _squeeze_excite(b, x, 16, 8, "features.1.block.1", reduce_mean=False,
                        gate="hardsigmoid")
    x = _conv(b, x, 16, 16, "features.1.block.2.0", 1, gain=1.0)
    # block 2
    x = _conv(b, x, 16, 48, "features.2.block.0.0")
    x = b.node("Relu", [x], "/features.2/block.0/Relu")
    x = _conv(b, x, 48, 48, "features.2.block.1.0", 3, 2, group=48)
    x = b.node("Relu", [x], "/features.2/block.1/Relu")
    x = _conv(b, x, 48, 24, "features.2.block.2.0", 1, gain=1.0)
    skip = x
    # block 3 (residual)
    x = _conv(b, x, 24, 64, "features.3.block.0.0")
    x = b.node("HardSwish", [x], "/features.3/block.0/HardSwish")
    x = _conv(b, x, 64, 64, "features.3.block.1.0", 5, 1, group=64)
    x = b.node("HardSwish", [x], "/features.3/block.1/HardSwish")
    x = _squeeze_excite(b, x, 64, 16, "features.3.block.2", reduce_mean=True, gate="sigmoid")
    x = _conv(b, x, 64, 24, "features.3.block.3.0", 1, gain=1.0)
    x = b.node("Add", [x, skip], "/features.3/Add")
    # head
    x = _conv(b, x, 24, 64, "features.4.0")
    x = b.node("HardSwish", [x], "/features/features.4/features.4.2/HardSwish")
    x = b.node("GlobalAveragePool", [x], "/avgpool/GlobalAveragePool")
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    w = b.init("classifier.0.weight", b.he((64, 64), gain=1.0))
    x = b.node("Gemm", [x, w, b.init("classifier.0.bias", b.small(64))],
               "/classifier/classifier.0/Gemm", alpha=1.0, beta=1.0, transB=1)
    x = b.node("HardSwish", [x], "/classifier/classifier.1/HardSwish")
    w = b.init("classifier.3.weight", b.he((num_classes, 64), gain=1.0))
    b.node("Gemm", [x, w, b.init("classifier.3.bias", b.small(num_classes))],
           "/classifier/classifier.3/Gemm", outputs=["logits"], alpha=1.0, beta=1.0, transB=1)
    return _finish(b, "main_graph", [_input("input", ["batch", 3, resolution, resolution])],
                   ["logits"])


# --------------------------------------------------------------------------------------------
# BlazeFace
# --------------------------------------------------------------------------------------------


def _channel_pad(b: _Builder, x: str, extra: int, name: str) -> str:
    """Zero Pad of the channel axis (NCHW pads [0, 0, 0, 0, 0, extra, 0, 0])."""
    pads = b.init(f"{name}.pads", np.array([0, 0, 0, 0, 0, extra, 0, 0], dtype=np.int64))
    return b.node("Pad", [x, pads], f"/{name}/Pad", mode="constant")


def _blaze_block(b: _Builder, x: str, cin: int, cout: int, stride: int, name: str) -> str:
    """BlazeBlock: dw 3×3 (stride s) → 1×1 conv; shortcut MaxPool 2×2 (s = 2) and channel Pad
    to `cout`; Add; Relu.  Stride 2 pads the depthwise input [0, 0, 1, 1] as TF SAME does."""
    pads = (0, 0, 1, 1) if stride == 2 else (1, 1, 1, 1)
    y = _conv(b, x, cin, cin, f"{name}.dw", 3, stride, group=cin, pads=pads)
    y = _conv(b, y, cin, cout, f"{name}.pw", 1, gain=1.0)
    s = x
    if stride == 2:
        s = b.node("MaxPool", [s], f"/{name}/MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    if cout > cin:
        s = _channel_pad(b, s, cout - cin, f"{name}.channel_padding")
    y = b.node("Add", [y, s], f"/{name}/Add")
    return b.node("Relu", [y], f"/{name}/Relu")


def _head(b: _Builder, x: str, cin: int, anchors: int, k: int, name: str) -> str:
    """1×1 conv → Transpose NCHW→NHWC → Reshape [1, H·W·anchors, k]."""
    y = _conv(b, x, cin, anchors * k, name, 1, gain=1.0)
    y = b.node("Transpose", [y], f"/{name}/Transpose", perm=[0, 2, 3, 1])
    shape = b.init(f"{name}.shape", np.array([1, -1, k], dtype=np.int64))
    return b.node("Reshape", [y, shape], f"/{name}/Reshape")


def blazeface_style(resolution: int = 64, seed: int = 0) -> onnx.ModelProto:
    """BlazeFace short-range at 1/2 resolution and reduced width (input ``[1, 3, R, R]``).

    stem 5×5/2 → 24 Relu; BlazeBlocks 24→24, 24→28 (channel Pad), 28→32 /2 (MaxPool + Pad),
    32→32, 32→48 /2 (R/8: 2 anchors per cell), 48→48 /2 (R/16: 6 anchors per cell);
    heads: classificators [1, N, 1] and regressors [1, N, 16], N = 2·(R/8)² + 6·(R/16)².
    """
    b = _Builder(seed)
    x = _conv(b, "input", 3, 24, "backbone1.0", 5, 2, pads=(1, 1, 2, 2))
    x = b.node("Relu", [x], "/backbone1/Relu")
    x = _blaze_block(b, x, 24, 24, 1, "backbone1.2")
    x = _blaze_block(b, x, 24, 28, 1, "backbone1.3")
    x = _blaze_block(b, x, 28, 32, 2, "backbone1.4")
    x = _blaze_block(b, x, 32, 32, 1, "backbone1.5")
    f8 = _blaze_block(b, x, 32, 48, 2, "backbone1.6")
    f16 = _blaze_block(b, f8, 48, 48, 2, "backbone2.0")
    c8 = _head(b, f8, 48, 2, 1, "classifier_8")
    c16 = _head(b, f16, 48, 6, 1, "classifier_16")
    r8 = _head(b, f8, 48, 2, 16, "regressor_8")
    r16 = _head(b, f16, 48, 6, 16, "regressor_16")
    b.node("Concat", [c8, c16], "/classificators/Concat", outputs=["classificators"], axis=1)
    b.node("Concat", [r8, r16], "/regressors/Concat", outputs=["regressors"], axis=1)
    return _finish(b, "blazeface", [_input("input", [1, 3, resolution, resolution])],
                   ["classificators", "regressors"])


# --------------------------------------------------------------------------------------------
# YOLO-tiny head
# --------------------------------------------------------------------------------------------


def yolo_style(resolution: int = 64, num_classes: int = 4, seed: int = 0) -> onnx.ModelProto:
    """YOLOv3-tiny's two-scale head (input ``[1, 3, R, R]``, 3 anchors per cell).

    3×3/2 → 16, 3×3/2 → 32 (R/4, kept for the route), 3×3/2 → 64 (R/8), LeakyRelu(0.1) after
    each; head 1: 3×3 → 64 LeakyRelu → 1×1 → 3·(5 + classes) = `yolo_8`;
    route: 1×1 → 32 LeakyRelu → Resize nearest ×2 → Concat with the R/4 map (64 channels) →
    3×3 → 32 LeakyRelu → 1×1 → 3·(5 + classes) = `yolo_16`.
    """
    b = _Builder(seed)
    leaky = dict(alpha=0.1)
    x = _conv(b, "input", 3, 16, "conv0", 3, 2)
    x = b.node("LeakyRelu", [x], "/act0/LeakyRelu", **leaky)
    f4 = _conv(b, x, 16, 32, "conv1", 3, 2)
    f4 = b.node("LeakyRelu", [f4], "/act1/LeakyRelu", **leaky)
    f8 = _conv(b, f4, 32, 64, "conv2", 3, 2)
    f8 = b.node("LeakyRelu", [f8], "/act2/LeakyRelu", **leaky)
    out = 3 * (5 + num_classes)
    h = _conv(b, f8, 64, 64, "head1.conv", 3)
    h = b.node("LeakyRelu", [h], "/head1/LeakyRelu", **leaky)
    w = b.init("head1.out.weight", b.he((out, 64, 1, 1), gain=1.0))
    b.conv(h, w, b.init("head1.out.bias", b.small(out)), "/head1/out/Conv", 1, output="yolo_8")
    r = _conv(b, f8, 64, 32, "route.conv", 1)
    r = b.node("LeakyRelu", [r], "/route/LeakyRelu", **leaky)
    roi = b.init("route.roi", np.zeros(0, dtype=np.float32))
    scales = b.init("route.scales", np.array([1, 1, 2, 2], dtype=np.float32))
    r = b.node("Resize", [r, roi, scales], "/route/Resize", mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    x = b.node("Concat", [r, f4], "/route/Concat", axis=1)
    x = _conv(b, x, 64, 32, "head2.conv", 3)
    x = b.node("LeakyRelu", [x], "/head2/LeakyRelu", **leaky)
    w = b.init("head2.out.weight", b.he((out, 32, 1, 1), gain=1.0))
    b.conv(x, w, b.init("head2.out.bias", b.small(out)), "/head2/out/Conv", 1,
           output="yolo_16")
    return _finish(b, "yolo_tiny", [_input("input", [1, 3, resolution, resolution])],
                   ["yolo_8", "yolo_16"])


REAL_NETWORKS = {
    "mobilenet_v3_small": mobilenet_v3_small_style,
    "blazeface": blazeface_style,
    "yolo": yolo_style,
}


def _main() -> None:
    import onnxruntime as ort

    for name, build in REAL_NETWORKS.items():
        model = build()
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        outs = sess.run(None, {inp.name: np.random.default_rng(0).random(shape,
                                                                         dtype=np.float32)})
        print(name, [o.name for o in sess.get_outputs()], [o.shape for o in outs])


if __name__ == "__main__":
    _main()
