"""A Fashion-MNIST CNN trained by the benchmark suite itself, on the CPU, in numpy.

Table II of the suite needs a model nobody here tuned: this trains one from the 60,000 training
images of Debian's `dataset-fashion-mnist` in a few minutes on two cores (plain numpy: im2col
convolutions, softmax cross-entropy, Adam; fixed seed, so the same weights every run on the same
numpy/BLAS), and writes it as an ONNX file that `mpq` imports like any exported model.

Network (NCHW in ONNX, 28×28×1 input scaled to [0, 1]):
    conv 3×3/2 1→16 ReLU → conv 3×3/1 16→16 ReLU → conv 3×3/2 16→32 ReLU
    → conv 3×3/1 32→32 ReLU → flatten (7·7·32) → fully connected → 10 logits
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SEED = 20261122
# (out channels, stride) of the 3×3 convolutions, all padded by 1.
CONVS = ((16, 2), (16, 1), (32, 2), (32, 1))


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 NHWC in [0, 1] and int64 labels, from the Debian package's IDX files."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        _, n, h, w = struct.unpack(">IIII", f.read(16))
        x = np.frombuffer(f.read(), np.uint8).reshape(n, h, w, 1)
    with gzip.open(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        f.read(8)
        y = np.frombuffer(f.read(), np.uint8).astype(np.int64)
    return x.astype(np.float32) / 255.0, y


def _im2col(x: np.ndarray, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """NHWC → [N·Ho·Wo, 9·C] columns of a 3×3 window, padding 1 (tap order ky, kx, c)."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    taps = [xp[:, ky:ky + stride * ho:stride, kx:kx + stride * wo:stride, :]
            for ky in range(3) for kx in range(3)]
    return np.concatenate(taps, axis=3).reshape(n * ho * wo, 9 * c), (ho, wo)


def _col2im(cols: np.ndarray, shape: tuple[int, ...], stride: int) -> np.ndarray:
    """The adjoint of `_im2col`: column gradients summed back onto the input."""
    n, h, w, c = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g = np.zeros((n, h + 2, w + 2, c), np.float32)
    cols = cols.reshape(n, ho, wo, 9, c)
    for k in range(9):
        ky, kx = divmod(k, 3)
        g[:, ky:ky + stride * ho:stride, kx:kx + stride * wo:stride, :] += cols[:, :, :, k, :]
    return g[:, 1:-1, 1:-1, :]


class Net:
    """The parameters and one forward/backward pass."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.params: dict[str, np.ndarray] = {}
        cin = 1
        for i, (cout, _) in enumerate(CONVS):
            fan_in = 9 * cin
            self.params[f"w{i}"] = (rng.standard_normal((fan_in, cout)) *
                                    np.sqrt(2.0 / fan_in)).astype(np.float32)
            self.params[f"b{i}"] = np.zeros(cout, np.float32)
            cin = cout
        feat = 7 * 7 * cin
        self.params["wf"] = (rng.standard_normal((feat, 10)) * np.sqrt(1.0 / feat)).astype(
            np.float32)
        self.params["bf"] = np.zeros(10, np.float32)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list]:
        cache = []
        for i, (_, stride) in enumerate(CONVS):
            cols, (ho, wo) = _im2col(x, stride)
            z = cols @ self.params[f"w{i}"] + self.params[f"b{i}"]
            cache.append((x.shape, cols, z, stride))
            x = np.maximum(z, 0).reshape(x.shape[0], ho, wo, -1)
        flat = x.reshape(x.shape[0], -1)
        cache.append(flat)
        return flat @ self.params["wf"] + self.params["bf"], cache

    def backward(self, dlogits: np.ndarray, cache: list) -> dict[str, np.ndarray]:
        grads = {}
        flat = cache.pop()
        grads["wf"] = flat.T @ dlogits
        grads["bf"] = dlogits.sum(0)
        d = dlogits @ self.params["wf"].T
        for i in reversed(range(len(CONVS))):
            shape, cols, z, stride = cache[i]
            dz = d.reshape(z.shape) * (z > 0)
            grads[f"w{i}"] = cols.T @ dz
            grads[f"b{i}"] = dz.sum(0)
            if i > 0:
                d = _col2im(dz @ self.params[f"w{i}"].T, shape, stride)
        return grads


def train(epochs: int = 2, batch: int = 128, lr: float = 2e-3) -> tuple[Net, float]:
    """Adam on softmax cross-entropy; returns the network and its float test accuracy."""
    rng = np.random.default_rng(SEED)
    x, y = load_split("train")
    net = Net(rng)
    m = {k: np.zeros_like(v) for k, v in net.params.items()}
    v = {k: np.zeros_like(p) for k, p in net.params.items()}
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        rate = lr * (0.3 ** epoch)
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            logits, cache = net.forward(x[idx])
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            grads = net.backward(p / len(idx), cache)
            step += 1
            for k, g in grads.items():
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                mh = m[k] / (1 - 0.9 ** step)
                vh = v[k] / (1 - 0.999 ** step)
                net.params[k] -= rate * mh / (np.sqrt(vh) + 1e-8)
    xt, yt = load_split("test")
    pred = np.concatenate([net.forward(xt[i:i + 1000])[0].argmax(1)
                           for i in range(0, len(xt), 1000)])
    return net, float((pred == yt).mean())


def to_onnx(net: Net, path: Path) -> None:
    """NCHW ONNX (opset 13): Conv+Relu ×4, Transpose to NHWC order, Flatten, Gemm."""
    inits, nodes = [], []
    prev, cin = "input", 1
    for i, (cout, stride) in enumerate(CONVS):
        w = net.params[f"w{i}"].reshape(3, 3, cin, cout).transpose(3, 2, 0, 1)
        inits += [numpy_helper.from_array(np.ascontiguousarray(w), f"conv{i}.weight"),
                  numpy_helper.from_array(net.params[f"b{i}"], f"conv{i}.bias")]
        nodes += [helper.make_node("Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"],
                                   [f"conv{i}"], name=f"/conv{i}/Conv", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"/relu{i}/Relu")]
        prev, cin = f"relu{i}", cout
    # The trained FC reads features in NHWC order: transpose before flattening.
    nodes += [helper.make_node("Transpose", [prev], ["nhwc"], name="/Transpose", perm=[0, 2, 3, 1]),
              helper.make_node("Flatten", ["nhwc"], ["flat"], name="/Flatten", axis=1),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"],
                               name="/fc/Gemm", transB=1)]
    inits += [numpy_helper.from_array(np.ascontiguousarray(net.params["wf"].T), "fc.weight"),
              numpy_helper.from_array(net.params["bf"], "fc.bias")]
    graph = helper.make_graph(
        nodes, "fashion_numpy_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="mpq-benchmarks")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def build(out_dir: Path, epochs: int = 2) -> dict:
    """Train, write `fashion_numpy_cnn.onnx`, `calib.npz` (256 training images) and
    `test.npz` (the 10,000 test images, NCHW like the model's input). Returns a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    net, acc = train(epochs)
    to_onnx(net, out_dir / "fashion_numpy_cnn.onnx")
    x, y = load_split("train")
    pick = np.random.default_rng(SEED + 1).choice(len(x), 256, replace=False)
    np.savez(out_dir / "calib.npz", x=x[pick].transpose(0, 3, 1, 2), y=y[pick])
    xt, yt = load_split("test")
    np.savez(out_dir / "test.npz", x=xt.transpose(0, 3, 1, 2), y=yt)
    return {"float_accuracy": acc, "epochs": epochs, "train_images": len(x)}


if __name__ == "__main__":
    import sys
    import time

    t0 = time.time()
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fashion_numpy")),
          f"{time.time() - t0:.1f} s")
